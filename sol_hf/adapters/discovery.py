"""Finding the parts SOL acts on from a model's structure (see :mod:`sol_hf.adapters`).

Everything is read from the module tree and the weights' shapes; nothing runs the model. What
cannot be found unambiguously is refused with a ``ValueError`` that names it.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

from . import ModelAdapter, projection_shape, unsupported_message

__all__ = ["calls_attention_interface", "check_adapter", "discover_adapter"]

# Attention input projections, one convention per entry (separate q/k/v or one fused projection).
ATTENTION_INPUT_NAMES = (
    ("q_proj", "k_proj", "v_proj"), ("qkv_proj",), ("c_attn",), ("query_key_value",), ("Wqkv",), ("W_pack",),
    ("query", "key", "value"), ("Wq", "Wk", "Wv"),
)
ATTENTION_OUTPUT_NAMES = ("o_proj", "dense", "out_proj", "c_proj", "wo", "Wo")


def calls_attention_interface(module: nn.Module) -> bool:
    """Whether ``module``'s ``forward`` dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``
    (the same source check transformers makes before switching a model's attention)."""
    return _forward_calls_interface(type(module))


@functools.cache
def _forward_calls_interface(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def _refuse(model: nn.Module, missing: str) -> ValueError:
    return ValueError(unsupported_message(model, missing))


def _has_matrices(module: nn.Module) -> bool:
    return any(p.ndim >= 2 for p in module.parameters())


def _shapes(module: nn.Module) -> dict[str, tuple[int, int]]:
    """The direct ``nn.Linear``/``Conv1D`` children of ``module``: name -> (Din, Dout)."""
    return {name: shape for name, child in module.named_children() if (shape := projection_shape(child)) is not None}


# -- decoder layers and their attention ------------------------------------------------------------

def _attention_children(layer: nn.Module) -> list[str]:
    return [name for name, child in layer.named_children() if calls_attention_interface(child)]


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList, str]:
    """(path, the ModuleList of decoder layers, the attention attribute of a layer)."""
    stacks, partial, foreign = [], [], []
    for path, stack in model.named_modules():
        if not isinstance(stack, nn.ModuleList) or len(stack) == 0:
            continue
        found = [_attention_children(layer) for layer in stack]
        with_attention = sum(1 for names in found if names)
        if with_attention == len(stack):
            stacks.append((path, stack, found))
        elif with_attention:
            partial.append(f"{path} ({with_attention} of {len(stack)} layers)")
        else:
            foreign += [f"{type(c).__name__}" for c in stack[0].children() if "attention" in type(c).__name__.lower()]
    if not stacks:
        if partial:
            raise _refuse(model, f"not every decoder layer has attention (recurrent or hybrid layers: {', '.join(partial)})")
        if foreign:
            raise _refuse(model, f"its attention ({foreign[0]}) does not go through transformers' attention interface, "
                                 "so SOL's page-sparse attention cannot act on it")
        raise _refuse(model, "no ModuleList of decoder layers whose attention calls transformers' attention interface was found")
    if len(stacks) > 1:
        raise _refuse(model, f"several stacks of layers with attention ({', '.join(s[0] for s in stacks)}); only one decoder is supported")
    path, stack, found = stacks[0]
    names = {tuple(n) for n in found}
    if len(names) != 1 or len(found[0]) != 1:
        raise _refuse(model, f"its decoder layers hold several or differently named attention modules {sorted(names)}")
    return path, stack, found[0][0]


def _attention_projections(model: nn.Module, attention: nn.Module, hidden: int) -> tuple[tuple[str, ...], str]:
    shapes = _shapes(attention)
    inputs = next((names for names in ATTENTION_INPUT_NAMES if all(n in shapes for n in names)), None)
    output = next((n for n in ATTENTION_OUTPUT_NAMES if n in shapes and shapes[n][1] == hidden), None)
    if inputs is None or output is None or any(shapes[n][0] != hidden for n in inputs):
        raise _refuse(
            model,
            f"the attention module {type(attention).__name__} has no recognised input projections reading hidden_size={hidden} "
            f"channels ({' | '.join('/'.join(n) for n in ATTENTION_INPUT_NAMES)}) and output projection writing them "
            f"({' | '.join(ATTENTION_OUTPUT_NAMES)}); its projections (Din, Dout) are {shapes}",
        )
    return inputs, output


# -- MLP -----------------------------------------------------------------------------------------

def _mlp_attribute(model: nn.Module, layer: nn.Module, attention: str) -> str:
    """The layer's attribute holding its MLP, or "" where the layer holds the projections itself."""
    parts = [n for n, c in layer.named_children() if n != attention and _has_matrices(c)]
    modules = [n for n in parts if projection_shape(getattr(layer, n)) is None]
    if len(modules) == 1 and len(parts) == 1:
        return modules[0]
    if not modules and parts:
        return ""
    described = ", ".join(f"{n} ({type(getattr(layer, n)).__name__})" for n in parts) or "none"
    raise _refuse(model, f"a decoder layer ({type(layer).__name__}) must hold one attention module and one MLP; besides "
                         f"{attention!r} its parts with weights are: {described}")


def _experts_per_token(model: nn.Module, mlp: nn.Module) -> int:
    text = model.config.get_text_config()
    for source in (text, mlp):
        for name in ("num_experts_per_tok", "top_k", "moe_k"):
            value = getattr(source, name, None)
            if isinstance(value, int) and value > 0:
                return value
    raise _refuse(model, f"its mixture-of-experts MLP ({type(mlp).__name__}) names no experts per token "
                         "(config.num_experts_per_tok or top_k), so the bytes a step reads are unknown")


def _mlp_projections(model: nn.Module, mlp: nn.Module, hidden: int, skip: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str]:
    """(input projection names, output projection name) of a dense MLP, told apart by shape."""
    shapes = {n: s for n, s in _shapes(mlp).items() if n not in skip}
    nested = [n for n, c in mlp.named_children() if n not in skip and projection_shape(c) is None and _has_matrices(c)]
    inputs = tuple(n for n, (din, dout) in shapes.items() if din == hidden and dout != hidden)
    outputs = [n for n, (din, dout) in shapes.items() if dout == hidden and din != hidden]
    if nested or not inputs or len(outputs) != 1 or len(inputs) + 1 != len(shapes):
        raise _refuse(
            model,
            f"the MLP {type(mlp).__name__} could not be read by shape: SOL needs nn.Linear/Conv1D input projections with "
            f"Din == hidden_size={hidden} and one output projection with Dout == hidden_size; found (Din, Dout) {shapes}"
            + (f" and nested parts {nested}" if nested else ""),
        )
    return inputs, outputs[0]


def _find_mlp(model, stack, attention: str, hidden: int) -> tuple[str, tuple[str, ...], str | None, int | None]:
    """(MLP attribute, input projections, output projection, experts per token) consistent over all layers."""
    found = set()
    for layer in stack:
        name = _mlp_attribute(model, layer, attention)
        mlp = getattr(layer, name) if name else layer
        if any(p.ndim >= 3 for p in mlp.parameters()):  # experts stacked in 3-D weights
            found.add((name, "moe", _experts_per_token(model, mlp)))
        else:
            found.add((name, _mlp_projections(model, mlp, hidden, skip=(attention,) if not name else ())))
    attributes = {f[0] for f in found}
    moe = [f[2] for f in found if f[1] == "moe"]
    if len(attributes) != 1 or len(set(moe)) > 1 or (not moe and len(found) != 1):
        raise _refuse(model, f"its decoder layers hold differently named MLP parts: {sorted(map(str, found))}")
    if moe:
        return attributes.pop(), (), None, moe[0]
    name, (inputs, output) = found.pop()
    return name, inputs, output, None


# -- the rest --------------------------------------------------------------------------------------

def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    return next((path for path, module in model.named_modules() if module is target), None)


def _embeddings(model: nn.Module, layers_path: str) -> tuple[str, ...]:
    """Paths of the row-lookup embeddings outside the decoder layers (input and position embeddings)."""
    head = model.get_output_embeddings()
    paths = [
        path for path, module in model.named_modules()
        if isinstance(module, nn.Embedding) and module is not head and not path.startswith(layers_path + ".")
    ]
    inputs = _path_of(model, model.get_input_embeddings())
    if inputs is None:
        raise _refuse(model, "get_input_embeddings() returned no submodule of the model")
    return tuple(dict.fromkeys([inputs, *paths]))


def discover_adapter(model: nn.Module) -> ModelAdapter:
    """Find the :class:`ModelAdapter` of ``model`` from its structure; checked before it is returned."""
    hidden = model.config.get_text_config().hidden_size
    layers_path, stack, attention = _find_layers(model)
    inputs, output = _attention_projections(model, getattr(stack[0], attention), hidden)
    mlp, mlp_inputs, mlp_output, experts = _find_mlp(model, stack, attention, hidden)
    adapter = ModelAdapter(
        layers=layers_path, attention=attention, mlp=mlp, mlp_input_projections=mlp_inputs,
        mlp_output_projection=mlp_output, lm_head=_path_of(model, model.get_output_embeddings()) or "",
        embeddings=_embeddings(model, layers_path), attention_input_projections=inputs,
        attention_output_projection=output, experts_per_token=experts, found_by="structure",
    )
    return check_adapter(model, adapter)


def check_adapter(model: nn.Module, adapter: ModelAdapter) -> ModelAdapter:
    """Check that ``adapter`` names real parts of ``model`` that SOL can act on; returns it."""
    hidden = model.config.get_text_config().hidden_size
    if not adapter.lm_head or projection_shape(model.get_submodule(adapter.lm_head)) is None:
        raise _refuse(model, "it has no nn.Linear LM head (get_output_embeddings()) whose input is the final hidden state")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise _refuse(model, "transformers does not let its attention implementation be switched (no AttentionInterface)")
    for index, layer in enumerate(adapter.decoder_layers(model)):
        attention = adapter.attention_module(layer)
        if not calls_attention_interface(attention):
            raise _refuse(model, f"{type(attention).__name__}.forward does not call transformers' attention interface")
        if getattr(attention, "layer_idx", None) != index:
            raise _refuse(model, f"{type(attention).__name__} of layer {index} carries layer_idx="
                                 f"{getattr(attention, 'layer_idx', None)!r}; SOL's cache and windows need the layer index")
        if any(name.split(".")[-1] == "sinks" for name, _ in attention.named_parameters()):
            raise _refuse(model, f"{type(attention).__name__} uses attention sinks, which SOL's page-sparse attention does not implement")
        sites = ("attention_input", "attention_output") + (() if adapter.mixture_of_experts else ("mlp_input", "mlp_output"))
        for site in sites:
            for projection in adapter.site_projections(layer, site):
                shape = projection_shape(projection)
                if shape is None:
                    raise _refuse(model, f"the {site} projection {type(projection).__name__} is neither nn.Linear nor Conv1D")
                if site in ("attention_input", "mlp_input") and shape[0] != hidden:
                    raise _refuse(model, f"the {site} projection reads {shape[0]} channels, not hidden_size={hidden}")
    return adapter
