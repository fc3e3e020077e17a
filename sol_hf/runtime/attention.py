"""Where the attention action executes: SOL's attention function, registered with transformers.

``SolForCausalLM`` switches the base model to ``sol_sdpa`` (or ``sol_eager``). Outside a
controlled step the function is the base model's own attention. In a controlled decode step it
decides, once per layer call and by bytes, between

* **page-sparse attention**: Quest scores the KV pages from per-page key bounds (kept up to date
  by the cache when it is a :class:`~sol_hf.cache.PageBoundsLayer` cache, recomputed from the
  keys otherwise), then ``ops.page_attention`` reads only the selected pages (a gather of their
  slots on CPU, the Triton kernel on CUDA);
* **dense attention**: where the skipped pages would save fewer bytes than the page metadata and
  the sparse path's fixed overhead cost (short contexts), the base attention runs and every slot
  is charged.

The rule is :func:`sol_hf.actions.attention_runs_sparse`, the same one the cost model predicts
with, so a row decoded alone is charged exactly what the cost table said. Teacher-forced calls
(several query positions per row) run the masked reference ops. Sliding-window layers always
read their bounded window dense (pages counted from a window that slides every step would not
line up between decode and teacher-forced scoring); the cost model credits them nothing.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

from .. import ops
from ..actions import effective_attention_keep, pages_wanted
from ..cache import PageBoundsLayer
from ..config import SolConfig
from .state import Runtime, StepState

__all__ = ["ATTENTION_NAMES", "sparse_decode_attention", "shift_to_row_start", "SPARSE_ATTENTION_OVERHEAD_BYTES"]

# The attention implementation SOL registers for each base implementation.
ATTENTION_NAMES = {"sdpa": "sol_sdpa", "eager": "sol_eager"}

# Fixed cost of the page-sparse path per layer call, in bytes of memory traffic it is worth:
# its extra ops (page scores, top-k, gather) against one dense attention call. CPU: measured
# with benchmarks/decode_speed.py --calibrate on the project's 2-core machine (about 0.1 ms of
# op overhead at about 10 GB/s). CUDA: a few kernel launches, small next to a layer's KV.
SPARSE_ATTENTION_OVERHEAD_BYTES = {"cpu": 1.0e6, "cuda": 6.4e4}


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


def _shift_kv(key: torch.Tensor, value: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's slots left by ``start`` (R,): key/value (R, Hkv, S, D). Reads every slot."""
    rows, heads, seq_len, dim = key.shape
    idx = (start.unsqueeze(-1) + torch.arange(seq_len, device=key.device)).clamp(max=seq_len - 1)
    kv_idx = idx.view(rows, 1, seq_len, 1).expand(-1, heads, -1, dim)
    return torch.gather(key, 2, kv_idx), torch.gather(value, 2, kv_idx)


def shift_to_row_start(key, value, valid, start):
    """Move each row's slots left by ``start`` (R,) so page 0 begins at the row's first token.
    key/value (R, Hkv, S, D), valid (R, S); vacated slots at the end become invalid."""
    seq_len = key.shape[2]
    idx = start.unsqueeze(-1) + torch.arange(seq_len, device=key.device)
    k, v = _shift_kv(key, value, start)
    return k, v, torch.gather(valid, 1, idx.clamp(max=seq_len - 1)) & (idx < seq_len)


class _Layout:
    """Slot and page masks of one (kv_len, q_len, mask) shape, shared by the layers of a step.

    valid (R, S) bool, n_valid (R,), page_valid / forced (R, NP) bool, n_valid_pages (R,), and
    keep (R,) float32: the attention keep each row executes (its action's keep where page-sparse
    attention pays at its length on this backend, else 1.0; see
    :func:`sol_hf.actions.effective_attention_keep`).
    """

    def __init__(self, valid: torch.Tensor, step: StepState, overhead_tokens: float):
        config = step.config
        page = config.page_size
        n_pages = -(-valid.shape[-1] // page)
        self.valid = valid
        self.n_valid = valid.sum(-1)
        self.page_valid = _any_per_page(valid, n_pages, page)
        self.n_valid_pages = self.page_valid.sum(-1)
        self.forced = _forced_pages(valid, config, n_pages)
        self.keep = effective_attention_keep(
            step.attention_keep, self.n_valid, page, config.sink_tokens, config.recent_tokens, config.selection == "quest", overhead_tokens,
        ).to(torch.float32)
        self.any_sparse: bool | None = None  # host-side, filled for host-planned steps
        self._host_n_valid: list[int] | None = None

    def valid_counts_on_host(self) -> list[int]:
        """``n_valid`` as Python ints, read once per step (host-planned steps only)."""
        if self._host_n_valid is None:
            self._host_n_valid = self.n_valid.tolist()
        return self._host_n_valid


def sparse_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, attention_keep: torch.Tensor,
    config: SolConfig, scaling: float, softcap: float | None,
    page_bounds: tuple[torch.Tensor, torch.Tensor] | None = None, forced: torch.Tensor | None = None,
    page_valid: torch.Tensor | None = None, reference: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Page-sparse attention for R single-query rows.

    Args:
        query: (R, Hq, D); key, value: (R, Hkv, S, D); valid: (R, S) bool; attention_keep: (R,).
        page_bounds: (page_min, page_max) (R, Hkv, NP, D) kept by the cache; recomputed if None.
        forced, page_valid: (R, NP) page masks, recomputed if None.
        reference: run the masked reference ops instead of the executed ones.
    Returns:
        out (R, Hq, D) and page_count (R, Hkv) int32, the pages each (row, KV head) read.
    """
    page = config.page_size
    rows, kv_heads, seq_len, dim = key.shape
    n_pages = -(-seq_len // page)
    if page_valid is None:
        page_valid = _any_per_page(valid, n_pages, page)
    if forced is None:
        forced = _forced_pages(valid, config, n_pages)
    pages_to_keep = pages_wanted(attention_keep, valid.sum(-1), page).long()
    pages_to_keep = torch.where(attention_keep < 1.0, pages_to_keep, n_pages)
    if config.selection == "quest":
        if page_bounds is None:
            page_bounds = ops.page_key_bounds(key, valid, page)
        score = ops.quest_page_scores_naive if reference else ops.quest_page_scores
        scores = score(query, *page_bounds)
    else:
        scores = torch.arange(n_pages, device=key.device, dtype=torch.float32).expand(rows, kv_heads, -1)
    page_ids, page_count = ops.select_pages(scores, pages_to_keep, forced, page_valid)
    if reference:
        out = ops.page_attention_naive(query, key, value, page_ids, page_count, valid, page, scaling, softcap)
    else:  # the gather of the selected pages on CPU, the Triton kernel on CUDA
        out = ops.page_attention(query, key, value, page_ids, page_count, valid, page, scaling, softcap)
    return out, page_count


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


def _fixed_shape_layer(step: StepState, module) -> bool:
    """Whether this layer's cache is a preallocated (static) buffer: attention is handed all its
    slots, filled or not (transformers' ``StaticLayer`` and its sliding-window variant)."""
    layers = getattr(step.cache, "layers", None)
    index = getattr(module, "layer_idx", None)
    return layers is not None and index is not None and index < len(layers) and isinstance(layers[index], StaticLayer)


def _layout(step: StepState, attention_mask, batch: int, q_len: int, kv_len: int, device,
            overhead_tokens: float) -> tuple[_Layout, torch.Tensor | None]:
    """The step's slot layout for this call (computed once per shape, mask and overhead) and,
    with left padding, each row's shift to its first token."""
    key = (kv_len, q_len, id(attention_mask), overhead_tokens)
    cached = step.layouts.get(key)
    if cached is None:
        valid = _valid_slots(attention_mask, batch, q_len, kv_len, device).reshape(batch * q_len, kv_len)
        start = None
        if step.left_padding is not None:
            # Slot i holds position i, less the (total_length - kv_len) slots a full sliding-window
            # cache has dropped; a static cache's buffer is longer than the sequence (nothing dropped).
            dropped = max(int(step.total_length) - kv_len, 0)
            start = (step.left_padding - dropped).clamp(min=0).repeat_interleave(q_len)
            idx = start.unsqueeze(-1) + torch.arange(kv_len, device=device)
            valid = torch.gather(valid, 1, idx.clamp(max=kv_len - 1)) & (idx < kv_len)
        cached = (_Layout(valid, step, overhead_tokens), start, attention_mask)
        step.layouts[key] = cached
    return cached[0], cached[1]


def _runs_sparse(step: StepState, layout: _Layout, kv_len: int, sparse_from: float) -> bool:
    """Host-side choice of the path for this call: the page-sparse path runs when some row's
    executed keep is below 1.0. With the actions on the host that is read directly; without
    (Triton, no host sync), from the cache's length: at ``kv_len >= sparse_from`` the grid's
    smallest keep level pays, and below it no row's keep does."""
    if step.host is not None:
        if layout.any_sparse is None:
            layout.any_sparse = bool((layout.keep < 1.0).any())
        return layout.any_sparse
    return kv_len >= sparse_from


def _make_sol_attention(impl: str):
    dense = _dense_attention(impl)

    def sol_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        runtime: Runtime | None = getattr(module, "_sol_runtime", None)
        step = runtime.step if runtime is not None else None
        if step is None:
            return dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        batch, q_heads, q_len, dim = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        if scaling is None:
            scaling = dim**-0.5
        softcap = kwargs.get("softcap")
        config = step.config
        token_bytes = 2 * kv_heads * dim * key.element_size()
        layer = getattr(module, "layer_idx", None)
        # A sliding-window layer reads its bounded window dense: its pages would be counted from a
        # slot that moves every step, so decode and teacher-forced scoring could not agree.
        windowed = layer is not None and runtime.cost_model.bytes.window[layer] > 0
        all_dense = step.host is not None and step.host.all_attention_dense
        if q_len == 1 and ((attention_mask is None and (windowed or all_dense)) or (all_dense and _fixed_shape_layer(step, module))):
            # Every slot handed over is read: no mask (every slot valid for every row), or a static
            # cache's whole preallocated buffer, which dense attention reads filled or not.
            step.kv_bytes.add(kv_len * token_bytes)
            return dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if windowed and q_len > 1:
            return dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        overhead = runtime.cost_model.attention_overhead_bytes.get(query.device.type, 0.0) / token_bytes
        layout, start = _layout(step, attention_mask, batch, q_len, kv_len, query.device, overhead)
        q = query.transpose(1, 2).reshape(batch * q_len, q_heads, dim)
        if q_len > 1:  # teacher-forced scoring: every position decides on its own, with the reference ops
            k = key.unsqueeze(1).expand(-1, q_len, -1, -1, -1).reshape(batch * q_len, *key.shape[1:])
            v = value.unsqueeze(1).expand(-1, q_len, -1, -1, -1).reshape(batch * q_len, *value.shape[1:])
            if start is not None:
                k, v = _shift_kv(k, v, start)
            out, _ = sparse_decode_attention(
                q, k, v, layout.valid, layout.keep, config, scaling, softcap,
                forced=layout.forced, page_valid=layout.page_valid, reference=True,
            )
            return out.view(batch, q_len, q_heads, dim), None
        if windowed or not _runs_sparse(step, layout, kv_len, runtime.cost_model.sparse_attention_from(query.device.type)):
            if _fixed_shape_layer(step, module):  # dense attention reads the whole preallocated buffer
                step.kv_bytes.add(kv_len * token_bytes)
            elif step.host is not None:
                step.kv_bytes.add([n * token_bytes for n in layout.valid_counts_on_host()])
            else:
                step.kv_bytes.add(layout.n_valid * token_bytes)
            return dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        n_valid = layout.n_valid.to(torch.float64)
        bounds = _cached_page_bounds(step, module, kv_len) if start is None else None
        k, v = (key, value) if start is None else _shift_kv(key, value, start)
        out, page_count = sparse_decode_attention(
            q, k, v, layout.valid, layout.keep, config, scaling, softcap, page_bounds=bounds,
            forced=layout.forced, page_valid=layout.page_valid,
        )
        # Bytes read per row: the pages gathered (the torch gather reads the batch's largest page
        # count for every row, the Triton kernel each row's own), the page bounds Quest scores
        # (one K+V row per page), every key slot handed over when the bounds were recomputed (the
        # valid ones; a static cache's whole buffer), every slot when left-padded rows were
        # shifted to start a page at their first token.
        pages = page_count[:, 0].to(torch.float64)
        if not ops.use_triton(None, query, key, value):
            pages = pages.amax().expand_as(pages)
        tokens = torch.minimum(pages * config.page_size, n_valid)
        if config.selection == "quest":
            tokens = tokens + layout.n_valid_pages.to(torch.float64)
            if bounds is None:
                tokens = tokens + (kv_len if _fixed_shape_layer(step, module) else n_valid) / 2
        if start is not None:
            tokens = tokens + kv_len
        step.kv_bytes.add(tokens * token_bytes)
        return out.view(batch, q_len, q_heads, dim), None

    return sol_attention


def _make_sol_mask(impl: str):
    base = eager_mask if impl == "eager" else sdpa_mask

    def sol_mask(*args, **kwargs):
        return base(*args, **kwargs)

    return sol_mask


for _impl, _name in ATTENTION_NAMES.items():
    AttentionInterface.register(_name, _make_sol_attention(_impl))
    AttentionMaskInterface.register(_name, _make_sol_mask(_impl))
