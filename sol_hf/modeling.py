"""SolForCausalLM: a frozen Hugging Face causal LM whose decode steps a controller makes cheaper.

How a controlled step flows (one way, no global patches):

1. ``generate`` parses ``compute_budget`` into per-row targets and opens a *session*.
2. A forward pre-hook on the base model sees each forward call. The first call of a session is
   the prompt: it runs dense. Each later call is one decode step: the controller picks one
   action per row, and the per-row values go into a :class:`StepState` on the runtime.
3. While a :class:`StepState` is set, SOL's registered attention function reads only the
   selected KV pages, an MLP pre-hook keeps the top-|x| input channels, and an MLP hook
   quantizes the MLP output. Without one (prefill, dense budgets, after ``unwrap``), the base
   model's own attention function and no-op hooks run: outputs are the base model's.
4. A forward hook records the step's achieved cost and the final hidden state the policy reads
   next, then clears the step state.
"""

from __future__ import annotations

import contextlib
import functools
import math
import copy
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.utils import ModelOutput

from . import ops
from .actions import ActionSpace, CostModel, StepBytes
from .adapters import ModelAdapter, get_adapter
from .budget import BudgetTargets, BudgetTracker, parse_compute_budget
from .cache import PageBoundsLayer
from .config import SolConfig, replace
from .hub import SolHubMixin
from .policy import (
    Controller,
    DecisionContext,
    PolicyController,
    PolicyObservation,
    RandomController,
    SolPolicy,
    UniformController,
    lm_confidence_features,
    policy_hidden_size_for,
)

__all__ = ["SolForCausalLM", "SolCausalLMOutput", "SolComputeReport", "StepState"]

_ATTN_SUFFIX = {"sdpa": "sol_sdpa", "eager": "sol_eager"}


# ---------------------------------------------------------------------------------------------
# Per-step state
# ---------------------------------------------------------------------------------------------


@dataclass
class StepState:
    """Per-row action values of the forward call in progress. ``R = B * T`` rows, b-major.

    Attributes:
        attention_keep: (R,) float32 fraction of valid KV tokens to read.
        mlp_keep: (R,) float32 fraction of MLP input channels to keep.
        mlp_index: (R,) int64 index of that fraction in ``config.mlp_keep``.
        bits: (R,) int64 MLP-output bit-width (16 = off).
        kv_bytes: (R,) float64, filled by attention: KV + page-metadata bytes actually read.
        left_padding: (B,) int64 padding tokens before each row's first token, or ``None`` when
            no row is padded. Pages are counted from each row's first token, so a padded row
            selects exactly what it would select alone.
        total_length: tokens in the (padded) sequence so far, the current ones included; tells
            how many slots a sliding-window cache has dropped from the front.
        cache: the KV cache of the call; a :class:`~sol_hf.cache.PageBoundsLayer` in it supplies
            the Quest page bounds instead of recomputing them from every key.
    """

    attention_keep: torch.Tensor
    mlp_keep: torch.Tensor
    bits: torch.Tensor
    kv_bytes: torch.Tensor
    config: SolConfig
    mlp_index: torch.Tensor | None = None
    left_padding: torch.Tensor | None = None
    total_length: int = 0
    cache: Any = None


class _Runtime:
    """Plain (non-Module) object shared by the hooks and the attention function of one wrapped
    model. Holds the step in progress and the generation session, nothing else."""

    def __init__(self, original_attn: str):
        self.original_attn = original_attn
        self.step: StepState | None = None
        self.session: _Session | None = None
        self.last_hidden: torch.Tensor | None = None
        self.capture_hidden = False


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def _dense_attention(impl: str):
    def run(module, query, key, value, attention_mask, **kwargs):
        if impl == "eager":
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward; cannot run eager attention")
            return fn(module, query, key, value, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return run


def _valid_slots(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """(B, T, S) bool: which cache slots each query may attend to (causal, padding, windows)."""
    if attention_mask is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
        causal = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]
        return causal.unsqueeze(0).expand(batch, -1, -1)
    mask = attention_mask[:, 0]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(batch, q_len, kv_len)


def _any_per_page(slots: torch.Tensor, n_pages: int, page: int) -> torch.Tensor:
    """(R, S) bool per slot -> (R, NP) bool: does the page hold any True slot."""
    pad = n_pages * page - slots.shape[-1]
    if pad:
        slots = torch.cat([slots, slots.new_zeros(slots.shape[0], pad)], dim=-1)
    return slots.view(slots.shape[0], n_pages, page).any(-1)


def _forced_pages(valid: torch.Tensor, config: SolConfig, n_pages: int) -> torch.Tensor:
    """(R, S) valid slots -> (R, NP) pages holding a sink token or a recent-window token."""
    rank_from_start = valid.cumsum(-1)
    rank_from_end = valid.flip(-1).cumsum(-1).flip(-1)
    keep = valid & ((rank_from_start <= config.sink_tokens) | (rank_from_end <= config.recent_tokens))
    return _any_per_page(keep, n_pages, config.page_size)


def sparse_decode_attention(
    step: StepState, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor,
    scaling: float, softcap: float | None, all_valid: bool = False,
    page_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Controlled attention for R single-query rows.

    Args:
        query: (R, Hq, D); key, value: (R, Hkv, S, D); valid: (R, S) bool.
        all_valid: host-side promise that every slot is valid (no padding, no window), which
            lets the page bounds skip masking.
        page_bounds: (page_min, page_max) kept up to date by the cache, if available.
    Returns:
        (R, Hq, D). Adds the bytes read to ``step.kv_bytes``.
    """
    config = step.config
    page = config.page_size
    rows, kv_heads, seq_len, dim = key.shape
    n_pages = -(-seq_len // page)
    n_valid = valid.sum(-1)
    page_valid = _any_per_page(valid, n_pages, page)
    forced = _forced_pages(valid, config, n_pages)
    wanted_tokens = torch.ceil(step.attention_keep.double() * n_valid).long()
    pages_to_keep = torch.div(wanted_tokens + page - 1, page, rounding_mode="floor")
    needs_selection = step.attention_keep < 1.0
    pages_to_keep = torch.where(needs_selection, pages_to_keep, n_pages)
    if config.selection == "quest":
        if page_bounds is not None:
            page_min, page_max = page_bounds
        else:
            page_min, page_max = ops.page_key_bounds(key, None if all_valid else valid, page)
        scores = ops.quest_page_scores(query, page_min, page_max)
    else:
        scores = torch.arange(n_pages, device=key.device, dtype=torch.float32).expand(rows, kv_heads, -1)
    page_ids, page_count = ops.select_pages(scores, pages_to_keep, forced, page_valid)
    out = ops.page_attention(query, key, value, page_ids, page_count, valid, page, scaling, softcap)
    # Accounting: tokens of the pages read (a page is read whole, capped at the valid tokens),
    # plus the page key bounds Quest reads to score the pages (one K-sized and one V-sized row each).
    bytes_per_slot = 2 * dim * key.element_size()
    tokens = torch.minimum(page_count.double() * page, n_valid.double().unsqueeze(-1)).sum(-1)
    read = tokens * bytes_per_slot
    if config.selection == "quest":
        meta = page_valid.sum(-1).double() * kv_heads * bytes_per_slot
        read = read + torch.where(needs_selection, meta, torch.zeros_like(meta))
    step.kv_bytes += read
    return out


def _cached_page_bounds(step: StepState, module, kv_len: int):
    """The page bounds a :class:`PageBoundsLayer` of the step's cache keeps for this layer, if they
    describe exactly the ``kv_len`` slots attention sees (host-side shape checks only)."""
    layers = getattr(step.cache, "layers", None)
    index = getattr(module, "layer_idx", None)
    if layers is None or index is None or index >= len(layers):
        return None
    layer = layers[index]
    if not isinstance(layer, PageBoundsLayer) or layer.page_size != step.config.page_size or layer.page_min is None:
        return None
    if layer.keys.shape[-2] != kv_len or layer.page_min.shape[2] != -(-kv_len // layer.page_size):
        return None
    return layer.page_min, layer.page_max


def _shift_to_row_start(key, value, valid, start):
    """Move each row's slots left by ``start`` (R,) so page 0 begins at the row's first token.
    key/value (R, Hkv, S, D), valid (R, S); vacated slots at the end become invalid."""
    rows, heads, seq_len, dim = key.shape
    idx = start.unsqueeze(-1) + torch.arange(seq_len, device=key.device)
    inside = idx < seq_len
    idx = idx.clamp(max=seq_len - 1)
    kv_idx = idx.view(rows, 1, seq_len, 1).expand(-1, heads, -1, dim)
    return torch.gather(key, 2, kv_idx), torch.gather(value, 2, kv_idx), torch.gather(valid, 1, idx) & inside


def _make_sol_attention(impl: str):
    dense = _dense_attention(impl)

    def sol_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        runtime: _Runtime | None = getattr(module, "_sol_runtime", None)
        step = runtime.step if runtime is not None else None
        if step is None:
            return dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        batch, q_heads, q_len, dim = query.shape
        kv_len = key.shape[2]
        if scaling is None:
            scaling = dim**-0.5
        softcap = kwargs.get("softcap")
        valid = _valid_slots(attention_mask, batch, q_len, kv_len, query.device).reshape(batch * q_len, kv_len)
        q = query.transpose(1, 2).reshape(batch * q_len, q_heads, dim)
        if q_len == 1:
            k, v = key, value
        else:  # teacher-forced scoring: every position decides on its own, as in decode
            k = key.unsqueeze(1).expand(-1, q_len, -1, -1, -1).reshape(batch * q_len, *key.shape[1:])
            v = value.unsqueeze(1).expand(-1, q_len, -1, -1, -1).reshape(batch * q_len, *value.shape[1:])
        if step.left_padding is not None:
            # A sliding-window cache has dropped (total_length - kv_len) slots from the front.
            start = (step.left_padding - (step.total_length - kv_len)).clamp(min=0).repeat_interleave(q_len)
            k, v, valid = _shift_to_row_start(k, v, valid, start)
        all_valid = attention_mask is None and q_len == 1 and step.left_padding is None
        bounds = _cached_page_bounds(step, module, kv_len) if q_len == 1 and step.left_padding is None else None
        out = sparse_decode_attention(step, q, k, v, valid, scaling, softcap, all_valid, bounds)
        return out.view(batch, q_len, q_heads, dim), None

    return sol_attention


def _make_sol_mask(impl: str):
    base = eager_mask if impl == "eager" else sdpa_mask

    def sol_mask(*args, **kwargs):
        return base(*args, **kwargs)

    return sol_mask


for _impl, _name in _ATTN_SUFFIX.items():
    AttentionInterface.register(_name, _make_sol_attention(_impl))
    AttentionMaskInterface.register(_name, _make_sol_mask(_impl))


# ---------------------------------------------------------------------------------------------
# MLP hooks
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _keep_counts(levels: tuple[float, ...], width: int, device: torch.device) -> torch.Tensor:
    """Channels kept at each keep level, as a device tensor built once (not every step)."""
    return torch.tensor([min(math.ceil(keep * width), width) for keep in levels], device=device)


def _prune_rows(x: torch.Tensor, level: torch.Tensor, levels: tuple[float, ...]) -> torch.Tensor:
    """Keep the top ``ceil(keep * D)`` channels by |x| of every token, zero the rest.

    Args:
        x: (B, T, D).
        level: (R = B*T,) int64 index into ``levels`` (the config's MLP keep fractions).
        levels: host-side keep fractions. Each row's threshold is the k-th largest |x| (one
            value sort per row, no host sync); channels tied with the threshold are kept too
            (only exact ties, e.g. zeros, where keeping changes nothing).
    """
    flat = x.reshape(-1, x.shape[-1])
    magnitude = flat.abs()
    width = flat.shape[-1]
    counts = _keep_counts(levels, width, flat.device)
    ascending = torch.sort(magnitude, dim=-1).values
    position = (width - counts[level]).unsqueeze(-1)  # the k-th largest sits at D - k
    threshold = torch.where(position > 0, ascending.gather(-1, position), -1.0)
    return torch.where(magnitude >= threshold, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)).view_as(x)


def _make_prune_hook(runtime: _Runtime):
    def hook(module, args, kwargs):
        step = runtime.step
        if step is None:
            return None
        x = args[0] if args else kwargs.pop("hidden_states", kwargs.pop("x", None))
        pruned = _prune_rows(x, step.mlp_index, step.config.mlp_keep)
        return (pruned, *args[1:]), kwargs

    return hook


def _make_quant_hook(runtime: _Runtime):
    def hook(module, args, output):
        step = runtime.step
        if step is None:
            return None
        tensor = output[0] if isinstance(output, tuple) else output
        flat = tensor.reshape(-1, tensor.shape[-1])
        quantized = ops.fake_quantize(flat, step.bits).view_as(tensor)
        return (quantized, *output[1:]) if isinstance(output, tuple) else quantized

    return hook


def _make_hidden_hook(runtime: _Runtime):
    def hook(module, args, output):
        if runtime.capture_hidden:
            runtime.last_hidden = output[0] if isinstance(output, tuple) else output
        return None

    return hook


# ---------------------------------------------------------------------------------------------
# Outputs and reports
# ---------------------------------------------------------------------------------------------


@dataclass
class SolCausalLMOutput(ModelOutput):
    """Output of ``SolForCausalLM.forward``.

    Attributes:
        logits: (B, T, V).
        cache: the updated KV cache (``None`` without ``use_cache``).
        last_hidden_state: (B, T, H) output of the base model's final norm.
        step_cost: (B, T) cost fraction of each position's action (only with ``actions``).
        loss: language-modelling loss when ``labels`` are given.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    last_hidden_state: torch.Tensor | None = None
    step_cost: torch.Tensor | None = None


@dataclass
class SolComputeReport:
    """What the controlled decode steps of the last ``generate`` achieved, per batch row.

    Tensors are (B,) on the CPU; nominal values are means over the controlled steps.
    ``attention_read`` is the fraction of the dense step's KV bytes attention really read
    (page rounding, forced pages and Quest page metadata included); ``cost`` is the unified
    cost fraction (bytes read / dense bytes), the policy's own weights included.
    """

    controller: str
    controlled_steps: int
    cost: torch.Tensor
    attention_keep: torch.Tensor
    attention_read: torch.Tensor
    mlp_keep: torch.Tensor
    bits: torch.Tensor
    target: torch.Tensor = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"controller": self.controller, "controlled_steps": self.controlled_steps}
        for name in ("cost", "attention_keep", "attention_read", "mlp_keep", "bits", "target"):
            value = getattr(self, name)
            out[name] = None if value is None else [round(float(v), 4) for v in value]
        return out

    def __str__(self) -> str:
        d = self.to_dict()
        rows = []
        for i in range(len(d["cost"])):
            rows.append(
                f"row {i}: cost {d['cost'][i]:.3f} | attention keep {d['attention_keep'][i]:.3f} "
                f"(read {d['attention_read'][i]:.3f}) | mlp keep {d['mlp_keep'][i]:.3f} | bits {d['bits'][i]:.2f}"
            )
        return f"SolComputeReport({self.controller}, {self.controlled_steps} controlled steps)\n" + "\n".join(rows)


class _Session:
    """State of one ``generate`` call: the controller, the budget tracker, the previous action."""

    def __init__(self, controller: Controller, tracker: BudgetTracker, dense_rows: torch.Tensor):
        self.controller = controller
        self.tracker = tracker
        self.dense_rows = dense_rows
        self.prefilled = False
        self.previous_action: torch.Tensor | None = None
        self.context_length: torch.Tensor | None = None
        self.kv_read = torch.zeros_like(tracker.spent[:, 0])
        self.kv_dense = torch.zeros_like(tracker.spent[:, 0])
        self.left_padding: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None  # (B, V) the previous forward's last-position logits


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _step_bytes(base: PreTrainedModel, adapter: ModelAdapter, config: SolConfig, policy: SolPolicy | None) -> StepBytes:
    """Bytes a decode step reads, from the base model's real parameters and its config."""
    unique = {id(p): p for p in base.parameters()}
    nbytes = lambda p: p.numel() * p.element_size()  # noqa: E731
    mlp_in = mlp_out = 0
    for layer in adapter.decoder_layers(base):
        mlp = getattr(layer, adapter.mlp)
        for name in adapter.mlp_input_projections:
            mlp_in += sum(nbytes(p) for p in getattr(mlp, name).parameters())
        mlp_out += sum(nbytes(p) for p in getattr(mlp, adapter.mlp_output_projection).parameters())
    output_embedding = base.get_output_embeddings()
    lm_head_ids = {id(p) for p in output_embedding.parameters()} if output_embedding is not None else set()
    embedding_full = embedding_rows = 0
    for path in adapter.embeddings:
        weight = base.get_submodule(path).weight
        embedding_rows += weight.shape[-1] * weight.element_size()
        if id(weight) not in lm_head_ids:
            embedding_full += nbytes(weight)
    fixed = sum(nbytes(p) for p in unique.values()) - mlp_in - mlp_out - embedding_full + embedding_rows
    text = base.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    n_layers = len(adapter.decoder_layers(base))
    element = next(base.parameters()).element_size()
    layer_types = getattr(text, "layer_types", None)
    sliding = getattr(text, "sliding_window", None) or 0
    if layer_types is not None:
        window = tuple(int(sliding) if t == "sliding_attention" else 0 for t in layer_types[:n_layers])
    else:
        window = (int(sliding),) * n_layers
    return StepBytes(
        fixed=float(fixed),
        mlp_input=float(mlp_in),
        mlp_output=float(mlp_out),
        prune_intermediate=config.prune_intermediate,
        kv_per_token=(float(2 * kv_heads * head_dim * element),) * n_layers,
        window=window,
        activation_per_bit=text.hidden_size * n_layers / 8.0,
        policy=float(policy.num_bytes()) if policy is not None else 0.0,
    )


class SolForCausalLM(SolHubMixin, nn.Module):
    """A Hugging Face causal LM plus a compute controller.

    ``SolForCausalLM(base_model, config, policy=None)`` wraps ``base_model`` in place and
    reversibly (:meth:`unwrap` gives it back unchanged). The base weights are never modified.

    Args:
        base_model: any supported ``*ForCausalLM`` (see ``sol_hf.adapters``).
        config: the :class:`SolConfig`; defaults to ``SolConfig()``.
        policy: a trained :class:`SolPolicy`; ``None`` builds an untrained one of the configured size.
    """

    def __init__(self, base_model: PreTrainedModel, config: SolConfig | None = None, policy: SolPolicy | None = None):
        super().__init__()
        if getattr(base_model, "_sol_runtime", None) is not None:
            raise ValueError("this base model is already wrapped by a SolForCausalLM; call .unwrap() on that one first")
        text = base_model.config.get_text_config()
        self.adapter = get_adapter(getattr(text, "model_type", None))
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
        self.cost_model = CostModel(self.space, _step_bytes(base_model, self.adapter, config, policy), config)
        self.last_compute_report: SolComputeReport | None = None
        self._wrap()

    # -- wrapping -------------------------------------------------------------------------------
    def _wrap(self) -> None:
        base = self.base_model
        impl = base.config._attn_implementation
        sol_impl = _ATTN_SUFFIX.get(impl, "sol_sdpa")
        runtime = _Runtime(impl)
        object.__setattr__(self, "_runtime", runtime)
        object.__setattr__(base, "_sol_runtime", runtime)
        handles = []
        for layer in self.adapter.decoder_layers(base):
            object.__setattr__(getattr(layer, self.adapter.attention), "_sol_runtime", runtime)
            mlp = getattr(layer, self.adapter.mlp)
            handles.append(mlp.register_forward_pre_hook(_make_prune_hook(runtime), with_kwargs=True))
            handles.append(mlp.register_forward_hook(_make_quant_hook(runtime)))
            if self.sol_config.prune_intermediate:
                out_proj = getattr(mlp, self.adapter.mlp_output_projection)
                handles.append(out_proj.register_forward_pre_hook(_make_prune_hook(runtime), with_kwargs=True))
        handles.append(base.get_submodule(self.adapter.final_norm).register_forward_hook(_make_hidden_hook(runtime)))
        handles.append(base.register_forward_pre_hook(self._before_base_forward, with_kwargs=True))
        handles.append(base.register_forward_hook(self._after_base_forward))
        object.__setattr__(self, "_handles", handles)
        base.set_attn_implementation(sol_impl)

    def unwrap(self) -> PreTrainedModel:
        """Remove every hook and attribute SOL added and return the base model as it was."""
        base = self.base_model
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.adapter.decoder_layers(base):
            attention = getattr(layer, self.adapter.attention)
            if "_sol_runtime" in attention.__dict__:
                object.__delattr__(attention, "_sol_runtime")
        if "_sol_runtime" in base.__dict__:
            object.__delattr__(base, "_sol_runtime")
        base.set_attn_implementation(self._runtime.original_attn)
        for name, p in base.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(name, p.requires_grad))
        return base

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

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def budget_range(self, context_length: int, controller: str = "uniform") -> tuple[float, float]:
        """(lowest, highest) reachable unified cost fraction at ``context_length`` tokens."""
        with_policy = controller == "policy"
        return self.cost_model.cheapest_cost(int(context_length), with_policy), 1.0

    def make_controller(self, controller: str | Controller | None, **kwargs) -> Controller:
        """``"policy"``, ``"uniform"``, ``"random"`` or a :class:`Controller` instance."""
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
        raise ValueError(f"controller must be 'policy', 'uniform', 'random' or a Controller, got {controller!r}")

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

    def _new_step(self, actions: torch.Tensor, left_padding: torch.Tensor | None, total_length: int, cache=None) -> StepState:
        """StepState for (B, T) or (B,) action indices (flattened b-major)."""
        values = self.space.values(actions.reshape(-1).long())
        return StepState(
            attention_keep=values["attention_keep"], mlp_keep=values["mlp_keep"], bits=values["bits"],
            kv_bytes=torch.zeros(actions.numel(), dtype=torch.float64, device=actions.device), config=self.sol_config,
            mlp_index=values["mlp_index"], left_padding=left_padding, total_length=total_length, cache=cache,
        )

    @contextlib.contextmanager
    def _explicit_step(self, actions: torch.Tensor, attention_mask: torch.Tensor | None, cache=None):
        left_padding = total_length = None
        if attention_mask is not None:
            left_padding = _left_padding(attention_mask)
            total_length = attention_mask.shape[1]
        step = self._new_step(actions, left_padding, total_length or 0, cache)
        if self._runtime.step is not None or self._runtime.session is not None:
            raise RuntimeError("a SOL step is already in progress (nested forward calls are not supported)")
        self._runtime.step = step
        try:
            yield step
        finally:
            self._runtime.step = None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                actions: torch.Tensor | None = None, **kwargs) -> SolCausalLMOutput:
        """Run the base model; with ``actions`` (B, T) int64 each position runs under its own action.

        Without ``actions`` this is the base model's forward (dense). With them, position t of row
        b attends, prunes and quantizes as action ``actions[b, t]`` prescribes, exactly as a decode
        step would; ``step_cost`` gives each position's cost fraction.
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
        actions = actions.to(self.device)
        lengths = self._valid_lengths(input_ids, attention_mask, kwargs.get("cache", kwargs.get("past_key_values")))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        with self._explicit_step(actions, attention_mask, cache) as step, self._capturing_hidden():
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            hidden = self._runtime.last_hidden
        cost = self._measured_cost(step, lengths.reshape(-1), with_policy=False).view_as(actions).float()
        return SolCausalLMOutput(
            loss=getattr(out, "loss", None), logits=out.logits, cache=_cache_of(out), last_hidden_state=hidden, step_cost=cost
        )

    def _valid_lengths(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
        """(B, T) number of valid tokens each position can see, itself included."""
        batch, q_len = input_ids.shape
        if attention_mask is not None:
            return attention_mask.long().cumsum(-1)[:, -q_len:]
        past = cache.get_seq_length() if cache is not None else 0
        return torch.arange(past + 1, past + q_len + 1, device=input_ids.device).expand(batch, -1)

    def _measured_cost(self, step: StepState, lengths: torch.Tensor, with_policy: bool) -> torch.Tensor:
        """(R,) cost fraction of a finished step from the bytes it really read."""
        total = self.cost_model.step_bytes(step.attention_keep, step.mlp_keep, step.bits, step.kv_bytes, with_policy)
        return total / self.cost_model.dense_bytes(lengths)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, compute_budget: Any = None,
                 controller: str | Controller | None = None, controller_kwargs: dict | None = None, **kwargs):
        """``base_model.generate`` with controlled decode steps.

        Args:
            compute_budget: ``None``/``1.0`` (dense, the base model's exact output), a float in
                (0, 1] (target mean cost fraction of the decode steps), a (B,) tensor of such
                floats, or a per-axis dict ``{"attention": .., "mlp": .., "bits": ..}``.
            controller: ``"policy"``, ``"uniform"``, ``"random"`` or a ``Controller``. Default: the
                policy if one was loaded from a trained artifact, else ``"uniform"``.
            controller_kwargs: passed to the controller (e.g. ``do_sample``, ``seed``, ``budget_guard``).
            **kwargs: everything ``transformers`` ``generate`` accepts.

        After the call, ``self.last_compute_report`` holds the per-row achieved values.
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
        if kwargs.get("num_beams", 1) not in (None, 1) or kwargs.get("assistant_model") is not None:
            raise ValueError("controlled generation supports greedy and sampling decoding, not beam search or assisted decoding")
        ctrl = self.make_controller(controller, **(controller_kwargs or {}))
        self._check_reachable(targets, input_ids, kwargs.get("attention_mask"), ctrl)
        device = self.device
        targets = BudgetTargets(targets.values.to(device), targets.is_set.to(device))
        max_new_tokens = kwargs.get("max_new_tokens") or self.generation_config.max_new_tokens or 20
        ctrl.reset()
        # The first new token comes from the (dense) prefill: max_new_tokens - 1 controlled steps.
        session = _Session(ctrl, BudgetTracker(targets, max_new_tokens - 1), targets.is_dense)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and not bool(attention_mask[:, 0].all()):  # once, before decoding
            session.left_padding = _left_padding(attention_mask.to(device))
        self._runtime.session = session
        self._runtime.capture_hidden = True
        try:
            output = self.base_model.generate(input_ids, **kwargs)
        finally:
            self._runtime.capture_hidden = False
            self._runtime.session = None
            self._runtime.step = None
            self._runtime.last_hidden = None
        self.last_compute_report = self._report(session, ctrl)
        return output

    def _check_reachable(self, targets: BudgetTargets, input_ids, attention_mask, ctrl: Controller) -> None:
        if not bool(targets.is_set[:, 0].any()):
            return
        lengths = attention_mask.sum(-1) if attention_mask is not None else torch.full((input_ids.shape[0],), input_ids.shape[1])
        for row in range(targets.batch_size):
            if not targets.is_set[row, 0]:
                continue
            target = float(targets.values[row, 0])
            low, _ = self.budget_range(int(lengths[row]) + 1, "policy" if ctrl.uses_policy else "uniform")
            if target < low - 1e-6:
                raise ValueError(
                    f"compute_budget={target:g} (row {row}) is below the cheapest reachable cost {low:.3f} for this model "
                    f"and action grid at context length {int(lengths[row]) + 1}; model.budget_range(context_length) gives "
                    f"the reachable range. Raise the budget or add cheaper levels to SolConfig."
                )

    def _before_base_forward(self, module, args, kwargs):
        session = self._runtime.session
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
        lengths = self._valid_lengths(input_ids, attention_mask, cache)[:, -1]
        session.context_length = lengths
        with_policy = session.controller.uses_policy
        cost_table = self.cost_model.cost_table(lengths, with_policy)
        observation = None
        confidence = None
        if session.controller.needs_lm_confidence:
            confidence = lm_confidence_features(session.last_logits, input_ids[:, -1])
        if with_policy:
            previous = session.previous_action
            if previous is None:
                previous = torch.full_like(input_ids[:, 0], self.space.num_actions)
            observation = PolicyObservation(
                hidden=self._runtime.last_hidden[:, -1],
                token_embedding=self.get_input_embeddings()(input_ids[:, -1]),
                features=session.tracker.features(),
                previous_action=previous,
                lm_confidence=confidence,
            )
        ctx = DecisionContext(
            session.tracker.requirement(), session.tracker.targets, cost_table, observation, session.tracker.steps, confidence
        )
        actions = session.controller.decide(ctx)
        actions = torch.where(session.dense_rows, self.space.dense_index, actions)
        session.previous_action = actions
        total_length = attention_mask.shape[1] if attention_mask is not None else cache.get_seq_length() + 1
        self._runtime.step = self._new_step(actions, session.left_padding, total_length, cache)
        return None

    def _after_base_forward(self, module, args, output):
        session = self._runtime.session
        step = self._runtime.step
        if session is not None and getattr(output, "logits", None) is not None:
            session.last_logits = output.logits[:, -1]
        if session is None or step is None:
            return None
        self._runtime.step = None
        lengths = session.context_length
        charged = session.controller.uses_policy
        cost = self._measured_cost(step, lengths, with_policy=charged)
        if charged:  # dense rows did not need the policy
            plain = self._measured_cost(step, lengths, with_policy=False)
            cost = torch.where(session.dense_rows, plain, cost)
        session.tracker.update(cost, step.attention_keep, step.mlp_keep, step.bits)
        dense_kv = self.cost_model.dense_kv_bytes(lengths)
        session.kv_read += step.kv_bytes
        session.kv_dense += dense_kv
        return None

    def _report(self, session: _Session, ctrl: Controller) -> SolComputeReport:
        means = session.tracker.means().float().cpu()
        name = {PolicyController: "policy", UniformController: "uniform", RandomController: "random"}.get(type(ctrl), type(ctrl).__name__)
        read = (session.kv_read / session.kv_dense.clamp_min(1)).float().cpu() if session.tracker.steps else torch.ones(means.shape[0])
        targets = session.tracker.targets
        return SolComputeReport(
            controller=name,
            controlled_steps=session.tracker.steps,
            cost=means[:, 0],
            attention_keep=means[:, 1],
            attention_read=read,
            mlp_keep=means[:, 2],
            bits=means[:, 3] * 16,
            target=torch.where(targets.is_set[:, 0], targets.values[:, 0], torch.nan).float().cpu(),
        )


def _left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 mask -> (B,) number of padding tokens before each row's first token."""
    return (attention_mask.long().cumsum(-1) == 0).sum(-1)


def _cache_of(output) -> Any:
    return getattr(output, "cache", None) if getattr(output, "cache", None) is not None else getattr(output, "past_key_values", None)

