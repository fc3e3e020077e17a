"""SolForCausalLM: a frozen Hugging Face causal LM whose decode steps a controller makes cheaper.

How a controlled generation flows (one way, no global patches):

1. ``generate`` parses ``compute_budget`` into per-row targets and opens a
   :class:`~sol_hf.runtime.step.ControlledStep` as the session.
2. A forward pre-hook on the base model sees each forward call. The first call is the prompt: it
   runs dense. Each later call is one decode step: the session decides one action per row and
   sets the :class:`~sol_hf.runtime.state.StepState` that carries them.
3. While a step is set, SOL's attention function (``sol_hf.runtime.attention``) reads only the
   selected KV pages where that reads fewer bytes, and the projections whose input is pruned
   (``sol_hf.runtime.projections``) read only the weight rows of the kept channels. Without one
   (prefill, dense budgets, after ``unwrap``) the base model's own code runs.
4. A forward hook charges the step the bytes its ops counted and clears it.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from transformers import DynamicCache, PreTrainedModel, StaticCache
from transformers.utils import ModelOutput

from . import ops
from .actions import ActionSpace, CostModel, kept_count, read_factor, sparse_linear_pays
from .adapters import adapter_for
from .budget import BudgetTargets, parse_compute_budget
from .cache import page_bounds_cache
from .config import SolConfig, replace
from .hub import SolHubMixin
from .policy import (
    Controller,
    PolicyController,
    RandomController,
    SolPolicy,
    SurpriseRuleController,
    UniformController,
    policy_hidden_size_for,
)
from .runtime.accounting import SolComputeReport, measure_step_bytes
from .runtime.lora import adapter_state, is_peft_model, peft_inner_model
from .runtime.calibrate import measure_sparse_read_factor
from .runtime.attention import ATTENTION_NAMES, SPARSE_ATTENTION_OVERHEAD_BYTES
from .runtime.projections import SPARSE_LINEAR_READ_FACTOR, LayerExecutor
from .runtime.state import Runtime, StepState
from .runtime.step import ControlledStep, host_plan

__all__ = ["SolForCausalLM", "SolCausalLMOutput", "SolComputeReport", "StepState"]


def _make_hidden_hook(runtime: Runtime):
    """Forward pre-hook on the LM head: keeps the hidden state it reads (B, T, H), the final-norm
    output of every ``*ForCausalLM`` (only the positions kept by ``logits_to_keep``)."""

    def hook(module, args):
        if runtime.capture_hidden:
            runtime.last_hidden = args[0]

    return hook


@dataclass
class SolCausalLMOutput(ModelOutput):
    """Output of ``SolForCausalLM.forward``.

    Attributes:
        logits: (B, T, V).
        cache: the updated KV cache (``None`` without ``use_cache``).
        last_hidden_state: (B, T, H) the base model's final (normed) hidden state, which its LM head
            reads (only the last ``logits_to_keep`` positions when that is given).
        step_cost: (B, T) cost fraction of each position's action (only with ``actions``).
        loss: language-modelling loss when ``labels`` are given.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    last_hidden_state: torch.Tensor | None = None
    step_cost: torch.Tensor | None = None


class SolForCausalLM(SolHubMixin, nn.Module):
    """A Hugging Face causal LM plus a compute controller.

    ``SolForCausalLM(base_model, config, policy=None)`` wraps ``base_model`` in place and
    reversibly (:meth:`unwrap` gives it back unchanged). The base weights are never modified.

    A LoRA ``peft.PeftModel`` is a base like any other: SOL wraps the transformers model inside it
    (its adapters unmerged), the pruned inputs skip the same channels of the adapters' ``lora_A``,
    the cost counts the active adapters' weights, and ``set_adapter`` / ``disable_adapter`` keep
    working while wrapped (the next controlled call follows the change). :meth:`unwrap` returns
    the ``PeftModel``.

    Args:
        base_model: any supported ``*ForCausalLM`` (see ``sol_hf.adapters``), or a ``PeftModel``
            of one with LoRA adapters.
        config: the :class:`SolConfig`; defaults to ``SolConfig()``.
        policy: a trained :class:`SolPolicy`; ``None`` builds an untrained one of the configured size.
    """

    def __init__(self, base_model: PreTrainedModel, config: SolConfig | None = None, policy: SolPolicy | None = None):
        super().__init__()
        if getattr(base_model, "_sol_runtime", None) is not None:
            raise ValueError("this base model is already wrapped by a SolForCausalLM; call .unwrap() on that one first")
        peft_model = None
        if is_peft_model(base_model):
            peft_model, base_model = base_model, peft_inner_model(base_model)
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: base_model is the one inside it
        text = base_model.config.get_text_config()
        self.adapter = adapter_for(base_model)
        config = copy.deepcopy(config) if config is not None else SolConfig()
        if config.base_model_name_or_path is None and getattr(base_model, "name_or_path", ""):
            config = replace(config, base_model_name_or_path=base_model.name_or_path)
        if config.policy_hidden_size is None:
            n_params = sum(p.numel() for p in base_model.parameters())
            config = replace(config, policy_hidden_size=policy_hidden_size_for(config, text.hidden_size, n_params))
        self.sol_config = config
        self.space = ActionSpace(config)
        self.base_model = base_model
        self._base_requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        for p in base_model.parameters():
            p.requires_grad_(False)  # the base is frozen; only the policy trains
        if policy is None:
            policy = SolPolicy(config, text.hidden_size)
            policy.to(device=next(base_model.parameters()).device)
        elif policy.space.num_actions != self.space.num_actions or policy.lm_hidden_size != text.hidden_size:
            raise ValueError(
                f"policy does not fit this model/config: policy has {policy.space.num_actions} actions and reads "
                f"hidden size {policy.lm_hidden_size}; config has {self.space.num_actions} actions, base hidden size "
                f"{text.hidden_size}"
            )
        self.policy = policy
        self.cost_model = self._measure_cost_model(dict(SPARSE_ATTENTION_OVERHEAD_BYTES), dict(SPARSE_LINEAR_READ_FACTOR))
        self.last_compute_report: SolComputeReport | None = None
        self._wrap()

    def _measure_cost_model(self, attention_overhead_bytes: dict[str, float], sparse_linear_read_factor: dict[str, float]) -> CostModel:
        """The cost model of the base as it is now (its active PEFT adapters included)."""
        step_bytes = measure_step_bytes(self.base_model, self.adapter, self.sol_config, self.policy.num_bytes())
        return CostModel(self.space, step_bytes, self.sol_config, attention_overhead_bytes=attention_overhead_bytes,
                         sparse_linear_read_factor=sparse_linear_read_factor)

    # -- wrapping -------------------------------------------------------------------------------
    def _wrap(self) -> None:
        base = self.base_model
        impl = base.config._attn_implementation
        runtime = Runtime(impl, self.cost_model)
        object.__setattr__(self, "_runtime", runtime)
        object.__setattr__(base, "_sol_runtime", runtime)
        executors = []
        for layer in self.adapter.decoder_layers(base):
            object.__setattr__(getattr(layer, self.adapter.attention), "_sol_runtime", runtime)
            executors.append(LayerExecutor(layer, self.adapter, self.sol_config, runtime))
        handles = [
            base.get_submodule(self.adapter.lm_head).register_forward_pre_hook(_make_hidden_hook(runtime)),
            base.register_forward_pre_hook(self._before_base_forward, with_kwargs=True),
            base.register_forward_hook(self._after_base_forward),
        ]
        object.__setattr__(self, "_handles", handles)
        object.__setattr__(self, "_layer_executors", executors)
        object.__setattr__(self, "_adapter_state", adapter_state(base))
        base.set_attn_implementation(ATTENTION_NAMES.get(impl, "sol_sdpa"))

    def _follow_adapters(self) -> None:
        """Bring the prepared layouts and the cost model up to date with the base's PEFT adapters
        (switched, disabled, merged, added or removed since the last controlled call); a no-op, one
        walk over the modules, when nothing changed."""
        state = adapter_state(self.base_model)
        if state == self._adapter_state:
            return
        if [entry[0] for entry in state] != [entry[0] for entry in self._adapter_state]:
            # Adapters injected or unloaded: the projection modules themselves changed.
            for executor in self._layer_executors:
                executor.remove()
            self._layer_executors[:] = [LayerExecutor(layer, self.adapter, self.sol_config, self._runtime)
                                        for layer in self.adapter.decoder_layers(self.base_model)]
        else:
            for executor in self._layer_executors:
                executor.refresh()
        old = self.cost_model
        self.cost_model = self._measure_cost_model(old.attention_overhead_bytes, old.sparse_linear_read_factor)
        self._runtime.cost_model = self.cost_model
        self._adapter_state = state

    @property
    def attention_overhead_bytes(self) -> dict[str, float]:
        """Per device type (``"cpu"``, ``"cuda"``), the fixed cost of the page-sparse attention
        path per layer call in bytes. Attention runs page-sparse only where the pages it skips
        save more than this plus the page metadata; the cost model and the runtime both read
        this dict, so editing it (e.g. after measuring your machine) moves both."""
        return self.cost_model.attention_overhead_bytes

    @property
    def sparse_linear_read_factor(self) -> dict[str, float]:
        """Per device type, the sparse projection op's time per byte over the dense projection's.
        The sparse op runs only where it is faster (kept rows x factor < all rows); elsewhere the
        dense projection runs on the pruned input and that projection is credited nothing. Shared
        by the cost model and the runtime, like :attr:`attention_overhead_bytes`."""
        return self.cost_model.sparse_linear_read_factor

    def calibrate_sparse_read_factor(self, repeats: int = 5) -> dict:
        """Measure this machine's sparse-projection read factor on the model's own weights and use
        it (:mod:`sol_hf.runtime.calibrate`): sets ``sparse_linear_read_factor["cpu:<dtype>"]``,
        which moves the path choice, the cost tables and :meth:`budget_range` together, so the
        kept-row op runs only at keeps where a decode step measured faster with it than with the
        dense projections (selection included). CPU only (on CUDA the Triton kernel picks its path
        on the device). Runs ``repeats`` rounds of four decode steps per activation level (a few
        seconds for a 135M model, tens for a 1B one). Returns the measurements (``factor``,
        per-level time ratios, ``key``)."""
        if self.device.type != "cpu":
            raise ValueError(f"calibrate_sparse_read_factor measures the CPU kept-row op; this model is on {self.device}")
        result = measure_sparse_read_factor(self, repeats=repeats)
        self.sparse_linear_read_factor[result["key"]] = result["factor"]
        return result

    @property
    def prepared_weight_bytes(self) -> int:
        """Memory held by the transposed weight copies the sparse projections read (freed by
        :meth:`unwrap`)."""
        return sum(e.prepared_bytes for e in self._layer_executors)

    def unwrap(self) -> PreTrainedModel:
        """Remove every hook, patched ``forward`` and attribute SOL added, free the prepared weight
        copies, and return the base model as it was (the ``PeftModel``, where one was wrapped)."""
        base = self.base_model
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for executor in self._layer_executors:
            executor.remove()
        self._layer_executors.clear()
        for layer in self.adapter.decoder_layers(base):
            attention = getattr(layer, self.adapter.attention)
            if "_sol_runtime" in attention.__dict__:
                object.__delattr__(attention, "_sol_runtime")
        if "_sol_runtime" in base.__dict__:
            object.__delattr__(base, "_sol_runtime")
        base.set_attn_implementation(self._runtime.original_attn)
        for name, p in base.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(name, p.requires_grad))
        return self.peft_model if self.peft_model is not None else base

    # -- conveniences ----------------------------------------------------------------------------
    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def generation_config(self):
        return self.base_model.generation_config

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model.dtype

    def can_generate(self) -> bool:
        """True: ``transformers.pipeline("text-generation", model=...)`` asks before calling generate."""
        return True

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def budget_range(self, context_length: int, controller: str = "uniform",
                     device: torch.device | str | None = None) -> tuple[float, float]:
        """(lowest, highest) unified cost fraction a budget can ask for at ``context_length`` tokens,
        as the executing backend of ``device`` (default: the model's) reads the actions.

        ``controller="policy"`` counts the policy's own weights in every controlled step. Where
        even the cheapest action costs a dense step or more (a policy large next to its model),
        nothing below 1.0 is reachable and the range is ``(1.0, 1.0)``: budget 1.0 runs the base
        model alone."""
        return min(self._cheapest_cost(context_length, controller, device), 1.0), 1.0

    def _cheapest_cost(self, context_length: int, controller: str, device: torch.device | str | None = None) -> float:
        """The cheapest action's cost fraction (not capped at 1.0), after checking the arguments."""
        self._follow_adapters()
        if controller not in ("policy", "uniform", "random"):
            raise ValueError(f"controller must be 'policy', 'uniform' or 'random', got {controller!r}")
        try:
            length = operator.index(context_length)  # int, numpy or 0-d torch integers
        except TypeError:
            length = None
        if length is None or isinstance(context_length, bool) or length < 1:
            raise ValueError(f"context_length must be a positive integer (tokens, the current one included), got {context_length!r}")
        return self.cost_model.cheapest_cost(length, controller == "policy", device=device or self.device)

    def unreachable_budget_message(self, budget: float, context_length: int, controller: str = "uniform") -> str | None:
        """Why a unified ``budget`` cannot be met at ``context_length`` tokens, or ``None`` if it can."""
        cheapest = self._cheapest_cost(context_length, controller)
        low = min(cheapest, 1.0)
        if budget >= 1.0 or budget >= low - 1e-6:
            return None
        if low >= 1.0:
            policy = self.cost_model.bytes.policy / float(self.cost_model.dense_bytes(torch.tensor([context_length], device=self.device)))
            return (
                f"no budget below 1.0 is reachable with the {controller} controller at context length {context_length}: "
                f"the cheapest action costs {cheapest:.3f} of a dense step, of which the policy's own weights are {policy:.3f}. "
                f"Use budget 1.0 (the base model), the uniform controller, or a smaller policy (SolConfig.policy_param_fraction)."
            )
        int8 = "" if self.sol_config.quantize == "weights" else ", or int8 weight copies: SolConfig.from_preset('int8-weights')"
        return (
            f"budget {budget:g} is below the cheapest reachable cost {low:.3f} of this model and action grid at context "
            f"length {context_length} with the {controller} controller (reachable: [{low:.3f}, 1.0]). Raise the budget, "
            f"or add cheaper levels to SolConfig (attention_keep, activation_keep, sparse_inputs{int8})."
        )

    def make_controller(self, controller: str | Controller | None, **kwargs) -> Controller:
        """``"policy"``, ``"uniform"``, ``"random"``, ``"surprise"`` (:class:`SurpriseRuleController`:
        the cheapest action after tokens the base model saw coming, else dense) or a
        :class:`Controller` instance."""
        if isinstance(controller, Controller):
            return controller
        if controller is None:
            controller = "policy" if getattr(self, "_policy_trained", False) else "uniform"
        if controller == "policy":
            return PolicyController(self.policy, **kwargs)
        if controller == "uniform":
            if kwargs:
                raise ValueError(f"the uniform controller takes no options, got controller_kwargs {sorted(kwargs)}")
            return UniformController(self.space)
        if controller == "random":
            return RandomController(self.space, **kwargs)
        if controller == "surprise":
            return SurpriseRuleController(self.space, **kwargs)
        raise ValueError(f"controller must be 'policy', 'uniform', 'random', 'surprise' or a Controller, got {controller!r}")

    # -- explicit schedules ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _capturing_hidden(self):
        runtime = self._runtime
        previous = runtime.capture_hidden
        runtime.capture_hidden = True
        try:
            yield
        finally:
            runtime.capture_hidden = previous
            if not previous:
                runtime.last_hidden = None

    def _step_state(self, actions: torch.Tensor, left_padding: torch.Tensor | None, total_length: int, cache,
                    decode: bool, host_planning: bool) -> StepState:
        """StepState for (B, T) or (B,) action indices (flattened b-major)."""
        values = self.space.values(actions.reshape(-1).long())
        host = host_plan(values) if host_planning else None
        # Every row keeps every channel at full precision (no int8 copies read): the projections
        # run their own forward and the step is charged their full bytes here, once.
        dense = host is not None and host.all_channels_kept and not (self.sol_config.quantize == "weights" and host.any_quant)
        step = StepState(
            attention_keep=values["attention_keep"], activation_index=values["activation_index"], bits=values["bits"],
            config=self.sol_config, host=host, decode=decode,
            left_padding=left_padding, total_length=total_length, cache=cache, projections_dense=dense,
        )
        if dense:
            step.projection_bytes.add(self.cost_model.bytes.sparse_total)
        return step

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                actions: torch.Tensor | None = None, **kwargs) -> SolCausalLMOutput:
        """Run the base model; with ``actions`` (B, T) int64 each position runs under its own action.

        Without ``actions`` this is the base model's forward (dense). With them, position t of row
        b attends, prunes and quantizes as action ``actions[b, t]`` prescribes, exactly as a decode
        step would (with T == 1 the executed ops run, as in ``generate``; with T > 1 the masked
        reference ops). ``step_cost`` gives each position's cost fraction as the executing backend
        reads it for a row decoded alone (the cost table).
        """
        if actions is None:
            with self._capturing_hidden():
                out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                hidden = self._runtime.last_hidden
            return SolCausalLMOutput(
                loss=getattr(out, "loss", None), logits=out.logits, cache=_cache_of(out), last_hidden_state=hidden
            )
        if input_ids is None or actions.shape != input_ids.shape:
            raise ValueError(
                f"actions must have the shape of input_ids (B, T); got actions {tuple(actions.shape)}, "
                f"input_ids {None if input_ids is None else tuple(input_ids.shape)}"
            )
        if actions.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"actions must be integer action indices, got dtype {actions.dtype}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"with actions, attention_mask must be the (B, S) 0/1 mask, got shape {tuple(attention_mask.shape)}")
        actions = actions.to(self.device).long()
        self._follow_adapters()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        lengths = self._valid_lengths(input_ids, attention_mask, cache)
        left_padding = total_length = None
        if attention_mask is not None:
            left_padding = _left_padding(attention_mask)
            total_length = attention_mask.shape[1]
        host_planning = not ops.use_triton(None, actions)
        step = self._step_state(actions, left_padding, total_length or 0, cache, input_ids.shape[1] == 1, host_planning)
        out, hidden = self._controlled_forward(step, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        table = self.cost_model.cost_table(lengths.reshape(-1), with_policy=False)
        cost = table.gather(-1, actions.reshape(-1, 1)).view_as(actions)
        return SolCausalLMOutput(
            loss=getattr(out, "loss", None), logits=out.logits, cache=_cache_of(out), last_hidden_state=hidden, step_cost=cost
        )

    def _controlled_forward(self, step: StepState, **kwargs):
        """One base-model forward executing ``step``: returns (output, final hidden states (B, T, H))."""
        if self._runtime.step is not None or self._runtime.session is not None:
            raise RuntimeError("a SOL step is already in progress (nested forward calls are not supported)")
        self._runtime.step = step
        try:
            with self._capturing_hidden():
                out = self.base_model(**kwargs)
                return out, self._runtime.last_hidden
        finally:
            self._runtime.step = None

    def _valid_lengths(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
        """(B, T) number of valid tokens each position can see, itself included."""
        batch, q_len = input_ids.shape
        if attention_mask is not None:
            return attention_mask.long().cumsum(-1)[:, -q_len:]
        past = cache.get_seq_length() if cache is not None else 0  # a device tensor for a static cache: no host read
        return (torch.arange(1, q_len + 1, device=input_ids.device) + past).expand(batch, -1)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, compute_budget: Any = None,
                 controller: str | Controller | None = None, controller_kwargs: dict | None = None, **kwargs):
        """``base_model.generate`` with controlled decode steps.

        Args:
            compute_budget: ``None``/``1.0`` (dense, the base model's exact output), a float in
                (0, 1] (target mean cost fraction of the decode steps), a (B,) tensor of such
                floats, or a per-axis dict ``{"attention": .., "activation": .., "bits": ..}``.
            controller: ``"policy"``, ``"uniform"``, ``"random"`` or a ``Controller``. Default: the
                policy if one was loaded from a trained artifact, else ``"uniform"``.
            controller_kwargs: passed to the controller (e.g. ``do_sample``, ``seed``, ``budget_guard``).
            **kwargs: everything ``transformers`` ``generate`` accepts.

        After the call, ``self.last_compute_report`` holds the per-row achieved values, one row per
        output sequence (with ``num_return_sequences=n``, the n sequences of a prompt row are
        consecutive rows and share its budget).
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("generate needs input_ids (B, T)")
        batch = input_ids.shape[0]
        targets = parse_compute_budget(compute_budget, batch, "cpu")
        if targets is None or bool(targets.is_dense.all()):
            self.last_compute_report = None
            return self.base_model.generate(input_ids, **kwargs)
        if kwargs.get("use_cache") is False:
            raise ValueError("controlled generation needs the KV cache; drop use_cache=False")
        self._check_cache(kwargs)
        if kwargs.get("num_beams", 1) not in (None, 1) or kwargs.get("assistant_model") is not None:
            raise ValueError("controlled generation supports greedy and sampling decoding, not beam search or assisted decoding")
        if self._generation_setting(kwargs, "prefill_chunk_size"):
            raise ValueError("controlled generation prefills the prompt in one forward; drop prefill_chunk_size "
                             "(or use compute_budget=1.0, the base model)")
        if kwargs.get("adapter_names") is not None:
            raise ValueError("controlled generation runs the PEFT model's active adapters; per-row adapter_names are not supported")
        self._follow_adapters()
        ctrl = self.make_controller(controller, **(controller_kwargs or {}))
        attention_mask = kwargs.get("attention_mask")
        self._check_reachable(targets, input_ids, attention_mask, ctrl)
        # transformers decodes num_return_sequences copies of each prompt row, next to each other
        copies = int(self._generation_setting(kwargs, "num_return_sequences") or 1)
        device = self.device
        targets = BudgetTargets(targets.values.to(device), targets.is_set.to(device)).repeat_interleave(copies)
        self._warn_if_the_batch_cannot_save(targets)
        max_new_tokens = self._generation_setting(kwargs, "max_new_tokens")
        if max_new_tokens is None:  # transformers' rule: max_length counts the prompt too
            max_length = self._generation_setting(kwargs, "max_length") or 20
            max_new_tokens = max(1, max_length - input_ids.shape[1])
        # The first new token comes from the (dense) prefill: max_new_tokens - 1 controlled steps.
        session = _GenerateSession(ControlledStep(self, ctrl, targets, max_new_tokens - 1, dense_rows=targets.is_dense))
        if attention_mask is not None and not bool(attention_mask[:, 0].all()):  # once, before decoding
            session.left_padding = _left_padding(attention_mask.to(device)).repeat_interleave(copies)
        session.total_length = input_ids.shape[1]
        if self._wants_page_bounds(kwargs, input_ids.shape[1] + max_new_tokens):
            kwargs["cache"] = page_bounds_cache(self.config, self.sol_config.page_size)
        # transformers compiles the forward of a static-cache generate on GPUs; the controlled step's
        # hooks are host-side Python (controller, budget bookkeeping), so a controlled generate runs eager.
        kwargs.setdefault("disable_compile", True)
        self._runtime.session = session
        self._runtime.capture_hidden = True
        try:
            output = self.base_model.generate(input_ids, **kwargs)
        finally:
            self._runtime.capture_hidden = False
            self._runtime.session = None
            self._runtime.step = None
            self._runtime.last_hidden = None
        self.last_compute_report = session.step.report()
        return output

    def _generation_setting(self, kwargs: dict, name: str):
        """The value of generation setting ``name`` that transformers' ``generate`` will use: the
        call's keyword, else the ``generation_config`` passed to the call, else the model's."""
        if kwargs.get(name) is not None:
            return kwargs[name]
        given = kwargs.get("generation_config")
        if given is not None and getattr(given, name, None) is not None:
            return getattr(given, name)
        return getattr(self.generation_config, name, None)

    def _check_cache(self, kwargs: dict) -> None:
        """Refuse a KV cache controlled decoding cannot account for: a quantized or paged cache (its
        K/V are read at another precision than attention sees) or an unknown cache class. Dynamic,
        offloaded and static caches (``cache_implementation="static"``, a ``StaticCache``) decode."""
        given = kwargs.get("cache", kwargs.get("past_key_values"))
        implementation = self._generation_setting(kwargs, "cache_implementation")
        if implementation not in _CONTROLLED_CACHE_IMPLEMENTATIONS:
            raise ValueError(
                f"controlled generation runs with a dynamic, offloaded or static KV cache, got cache_implementation="
                f"{implementation!r} (its keys and values are not read at the precision SOL's byte accounting counts). "
                "Drop cache_implementation, or use compute_budget=1.0 (the base model, any cache)."
            )
        if given is not None and not isinstance(given, (DynamicCache, StaticCache)):
            raise ValueError(
                f"controlled generation runs with a DynamicCache or a StaticCache, got a {type(given).__name__}. "
                "Pass one of those, or use compute_budget=1.0 (the base model, any cache)."
            )

    def _warn_if_the_batch_cannot_save(self, targets: BudgetTargets) -> None:
        """Warn where the rows of a batch (``targets``, on the model's device), each at the grid's
        lowest activation keep, would together read at least a whole projection with the kept-row
        op on this CPU: then every pruned projection runs dense (``cost`` 1.0) and the channel
        selection only adds work."""
        batch = targets.batch_size
        if batch < 2 or self.sol_config.quantize == "weights" or ops.use_triton(None, targets.values):
            return  # int8 rows always read their own kept rows; the Triton kernel reads each row's own
        factor = read_factor(self.sparse_linear_read_factor, self.device.type, self.cost_model.bytes.weight_dtype)
        widths = [w for site in self.cost_model.bytes.sites for w in site.widths]
        if widths and all(not sparse_linear_pays(batch * kept_count(min(self.space.activation_keep), w), w, factor) for w in widths):
            warnings.warn(
                f"a batch of {batch} rows on {self.device.type}: at every activation keep the rows' kept channels together "
                f"read at least the whole weight (sparse read factor {factor:g}), so the pruned projections run dense and "
                "the budget saves no weight bytes (report.cost stays near 1.0 while standalone_cost meets the target) "
                "and adds selection work; decode rows one at a time to save time on this backend",
                stacklevel=3,
            )

    def _wants_page_bounds(self, kwargs: dict, final_length: int) -> bool:
        """Whether generate should keep Quest page bounds in its cache: only where the user gave no
        cache and asked for no cache kind (a static cache recomputes them from its keys), and
        page-sparse attention can run (it does at some context length up to ``final_length``; the
        saving grows with length, so checking the last one suffices)."""
        if (self.sol_config.selection != "quest" or any(k in kwargs for k in ("cache", "past_key_values"))
                or self._generation_setting(kwargs, "cache_implementation") not in (None, "dynamic", "hybrid")):
            return False
        length = torch.tensor([final_length], device=self.device)
        keep = torch.tensor(min(self.space.attention_keep), device=self.device)
        return bool(self.cost_model.predicted_kv_bytes(keep, length) < self.cost_model.dense_kv_bytes(length))

    def check_axis_targets(self, targets: BudgetTargets) -> None:
        """Refuse a per-axis target below the axis's lowest grid level (it would be silently
        rounded up to that level): a ``ValueError`` naming the axis, the value and the levels."""
        is_set, values, space = targets.is_set.cpu(), targets.values.cpu(), self.space
        for column, name, levels, scale in ((1, "attention", space.attention_keep, 1.0),
                                            (2, "activation", space.activation_keep, 1.0),
                                            (3, "bits", space.bits, 16.0)):
            asked = values[is_set[:, column], column] * scale
            if len(asked) and float(asked.min()) < min(levels) - 1e-6:
                raise ValueError(
                    f"compute_budget['{name}']={float(asked.min()):g} is below the lowest level of this model's action grid "
                    f"({name} levels {list(levels)}); ask for at least {min(levels):g}, or add a lower level to SolConfig"
                )

    def _check_reachable(self, targets: BudgetTargets, input_ids, attention_mask, ctrl: Controller) -> None:
        """Refuse targets the action grid cannot meet, before any decoding."""
        self.check_axis_targets(targets)
        is_set = targets.is_set.cpu()
        if not bool(is_set[:, 0].any()):
            return
        lengths = attention_mask.sum(-1) if attention_mask is not None else torch.full((input_ids.shape[0],), input_ids.shape[1])
        for row in range(targets.batch_size):
            if not is_set[row, 0]:
                continue
            target = float(targets.values[row, 0])
            reason = self.unreachable_budget_message(target, int(lengths[row]) + 1, "policy" if ctrl.uses_policy else "uniform")
            if reason is not None:
                raise ValueError(f"compute_budget (row {row}): {reason} model.budget_range(context_length) gives the range.")

    def _before_base_forward(self, module, args, kwargs):
        session: _GenerateSession | None = self._runtime.session
        if session is None:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not session.prefilled:
            session.prefilled = True
            return None
        if input_ids is None or input_ids.shape[1] != 1:
            raise RuntimeError("controlled generation expects one new token per decode step")
        attention_mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        session.total_length += 1
        if attention_mask is None or (torch.is_tensor(attention_mask) and attention_mask.dim() == 2):
            lengths = self._valid_lengths(input_ids, attention_mask, cache)[:, -1]
        else:  # the 4-D mask (or per-layer-type masks) transformers prepares for a static cache
            padding = session.left_padding if session.left_padding is not None else 0
            lengths = session.total_length - padding + torch.zeros_like(input_ids[:, -1])
        tokens = input_ids[:, -1]
        session.actions = session.step.decide(tokens, lengths, self._runtime.last_hidden[:, -1], session.last_logits)
        self._runtime.step = session.step.state(session.actions, session.left_padding, session.total_length, cache)
        return None

    def _after_base_forward(self, module, args, output):
        session: _GenerateSession | None = self._runtime.session
        step = self._runtime.step
        if session is not None and getattr(output, "logits", None) is not None:
            session.last_logits = output.logits[:, -1]
        if session is None or step is None:
            return None
        self._runtime.step = None
        session.step.account(session.actions, step)
        return None


@dataclass
class _GenerateSession:
    """One ``generate`` call: the controlled step plus what the hooks carry between forwards."""

    step: ControlledStep
    left_padding: torch.Tensor | None = None  # (B,), set once before decoding when rows are padded
    prefilled: bool = False
    total_length: int = 0  # positions so far (the padded prompt's width, plus one per decode step)
    actions: torch.Tensor | None = None  # (B,) the actions of the forward in progress
    last_logits: torch.Tensor | None = None  # (B, V) the previous forward's last-position logits


# Cache kinds a controlled generate runs with (transformers turns "hybrid" into its default, dynamic cache).
_CONTROLLED_CACHE_IMPLEMENTATIONS = (
    None, "dynamic", "offloaded", "hybrid", "static", "offloaded_static", "sliding_window", "offloaded_hybrid",
)


def _left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 mask -> (B,) number of padding tokens before each row's first token."""
    return (attention_mask.long().cumsum(-1) == 0).sum(-1)


def _cache_of(output) -> Any:
    return getattr(output, "cache", None) if getattr(output, "cache", None) is not None else getattr(output, "past_key_values", None)
