"""Unmerged LoRA layers at pruned sites: what a PEFT adapter adds to a projection, and what it reads.

PEFT's LoRA replaces a projection by a layer that computes
``base_layer(x) + sum_a lora_B[a](lora_A[a](dropout[a](x))) * scaling[a]`` over its active
adapters ``a`` (nothing is added when the adapters are disabled or merged into the base weight).
Pruning the input of such a layer prunes the adapters' input too, so the executed path reads the
kept rows of each active ``lora_A`` (transposed, like the base weight) and all of ``lora_B``.

PEFT's layers are recognised by their attributes, so sol_hf imports ``peft`` only when it is given
a ``PeftModel``. Other PEFT layer types, and LoRA variants that change the forward (DoRA, aLoRA,
...), are refused at the sites SOL prunes: their executed path would not be the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = [
    "LoraBranch", "is_peft_model", "peft_inner_model", "is_tuner_layer", "base_layer", "active_branches", "adapter_state",
    "idle_adapter_parameters", "applied_adapter_tensors",
]

SUPPORTED_PEFT_TYPES = ("LORA",)


@dataclass(frozen=True)
class LoraBranch:
    """One active adapter of one LoRA layer.

    Attributes:
        lora_A: (r, Din) weight of the down projection.
        lora_B: the up projection module, (r -> Dout), bias included where ``lora_bias`` is set.
        scaling: the adapter's ``alpha / r`` (or rsLoRA's) factor.
    """

    lora_A: torch.Tensor
    lora_B: nn.Module
    scaling: float


def is_peft_model(model: object) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (checked without importing peft)."""
    return type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def peft_inner_model(peft_model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a ``PeftModel`` (its LoRA layers in place), after
    checking that every adapter is a LoRA adapter, the one PEFT method whose model forward is
    the inner model's forward (prompt-learning methods add virtual tokens in ``PeftModel.forward``)."""
    configs = getattr(peft_model, "peft_config", {}) or {}
    for name, config in configs.items():
        kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None)))
        if kind not in SUPPORTED_PEFT_TYPES:
            raise TypeError(
                f"adapter {name!r} of this PeftModel is a {kind} adapter; sol_hf supports PEFT models whose adapters "
                f"are LoRA ({', '.join(SUPPORTED_PEFT_TYPES)}). Merge it into the base (merge_and_unload()) and "
                f"wrap the merged model, or use a LoRA adapter."
            )
    inner = peft_model.get_base_model()
    if is_peft_model(inner) or not hasattr(inner, "get_output_embeddings"):
        raise TypeError(f"the PeftModel's base model is a {type(inner).__name__}, not a transformers *ForCausalLM")
    return inner


def is_tuner_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT tuner layer (it wraps a ``base_layer``)."""
    return hasattr(module, "get_base_layer") and hasattr(module, "active_adapters") and hasattr(module, "merged")


def _is_lora_layer(module: nn.Module) -> bool:
    return is_tuner_layer(module) and all(hasattr(module, name) for name in ("lora_A", "lora_B", "scaling"))


def base_layer(module: nn.Module) -> nn.Module:
    """The projection a PEFT layer wraps, or ``module`` itself."""
    return module.get_base_layer() if is_tuner_layer(module) else module


def _describe(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


def active_branches(module: nn.Module) -> list[LoraBranch]:
    """The adapters a forward of ``module`` adds to its base projection (empty for a plain
    projection, or for a LoRA layer whose adapters are disabled or merged).

    Raises ``TypeError`` for PEFT layers sol_hf cannot execute pruned: non-LoRA methods, LoRA
    variants (DoRA, aLoRA, ...), non-linear LoRA layers."""
    if not is_tuner_layer(module):
        return []
    if not _is_lora_layer(module) or not isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
        raise TypeError(
            f"{_describe(module)} is a PEFT layer sol_hf cannot prune: sol_hf supports unmerged LoRA adapters "
            f"(LoraConfig) on linear projections. Merge this adapter into the base (merge_and_unload()) first, "
            f"or leave this projection's site out of SolConfig.sparse_inputs."
        )
    if module.disable_adapters or module.merged:
        return []
    branches = []
    variants = getattr(module, "lora_variant", {}) or {}
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in variants or bool(getattr(module, "use_dora", {}).get(name, False)):
            variant = type(variants[name]).__name__ if name in variants else "DoRA"
            raise TypeError(
                f"adapter {name!r} of {_describe(module)} is a LoRA variant ({variant}), whose forward is not "
                f"base(x) + B(A(x)) * scaling; sol_hf supports plain LoRA adapters. Merge it "
                f"(merge_and_unload()) or leave this site out of SolConfig.sparse_inputs."
            )
        lora_a = module.lora_A[name]
        if not isinstance(lora_a, nn.Linear):
            raise TypeError(f"adapter {name!r} of {_describe(module)} has a {type(lora_a).__name__} lora_A; sol_hf prunes linear LoRA only")
        branches.append(LoraBranch(lora_a.weight, module.lora_B[name], float(module.scaling[name])))
    return branches


def adapter_state(model: nn.Module) -> tuple:
    """A hashable summary of which adapters every PEFT layer of ``model`` applies now: changes
    when adapters are switched, disabled, merged or added (empty for a model without PEFT layers)."""
    return tuple(
        (name, tuple(m.active_adapters), bool(m.disable_adapters), bool(m.merged),
         tuple(sorted(getattr(m, "lora_A", {}).keys())) if hasattr(m, "lora_A") else ())
        for name, m in model.named_modules() if is_tuner_layer(m)
    )


def _adapter_entries(module: nn.Module, names) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the parameters of ``module``'s adapters ``names``, in a fixed order."""
    out = []
    for attribute in getattr(module, "adapter_layer_names", ()):
        container = getattr(module, attribute, None)
        if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            continue
        for name in names:
            if name not in container.keys():
                continue
            entry = container[name]
            if isinstance(entry, nn.Module):
                out += [(f"{attribute}.{key}", p) for key, p in entry.named_parameters()]
            else:
                out.append((attribute, entry))
    return out


def applied_adapter_tensors(model: nn.Module) -> list[tuple[str, str, int, str, torch.Tensor]]:
    """Every adapter weight that shapes ``model``'s function now, as (module path, adapter name,
    position among the layer's applied adapters, parameter key, tensor): the active adapters
    (merged ones included; none while a layer's adapters are disabled), plus each one's scaling as
    a 0-d tensor. The identity of an adapted model beside its base."""
    out = []
    for path, module in model.named_modules():
        if not is_tuner_layer(module) or module.disable_adapters:
            continue
        names = list(module.merged_adapters) if module.merged else list(module.active_adapters)
        for position, name in enumerate(names):
            for key, tensor in _adapter_entries(module, [name]):
                out.append((path, name, position, key, tensor))
            scaling = getattr(module, "scaling", {}).get(name)
            if scaling is not None:
                out.append((path, name, position, "scaling", torch.tensor(float(scaling), dtype=torch.float64)))
    return out


def idle_adapter_parameters(model: nn.Module) -> set[int]:
    """``id`` of every adapter parameter a forward of ``model`` does not read: adapters that are not
    active, and all of a layer's adapters while they are disabled or merged."""
    idle: set[int] = set()
    for module in model.modules():
        if not is_tuner_layer(module):
            continue
        reading = set() if (module.disable_adapters or module.merged) else set(module.active_adapters)
        every = {name for attribute in getattr(module, "adapter_layer_names", ())
                 for name in getattr(getattr(module, attribute, None), "keys", lambda: ())()}
        idle.update(id(p) for _, p in _adapter_entries(module, sorted(every - reading)))
    return idle
