"""Query-aware KV-page selection (Quest) and decode attention over the selected pages.

Shapes: ``B`` batch rows, ``Hq`` query heads, ``Hkv`` KV heads (``Hq % Hkv == 0``), ``S`` cache
slots, ``D`` head dim, ``P`` page size, ``NP = ceil(S / P)`` pages. Page ``p`` covers cache slots
``[p * P, (p + 1) * P)``; slots that are padding or past ``S`` never take part.

Each op has a plain torch reference (``*_naive``); the dispatcher functions without the suffix
pick the fastest available implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import HAS_TRITON, get_backend, next_power_of_2, target_programs, tl, triton, use_triton

__all__ = [
    "page_key_bounds_naive",
    "quest_page_scores_naive",
    "select_pages",
    "page_attention_naive",
    "page_attention_gather",
    "page_key_bounds",
    "quest_page_scores",
    "page_attention",
    "page_attention_triton",
    "quest_page_scores_triton",
]


def num_pages(seq_len: int, page_size: int) -> int:
    return -(-seq_len // page_size)


def _pad_to_pages(x: torch.Tensor, page_size: int, dim: int, value: float | bool) -> torch.Tensor:
    """Pad ``x`` along ``dim`` with ``value`` up to a multiple of ``page_size``."""
    length = x.shape[dim]
    pad = num_pages(length, page_size) * page_size - length
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def page_key_bounds_naive(
    key: torch.Tensor, valid: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page, per-channel key minimum and maximum over the valid slots of each page.

    Args:
        key: (B, Hkv, S, D) cached keys.
        valid: (B, S) bool, True where the slot holds a real token; ``None`` = every slot.
    Returns:
        (page_min, page_max), each (B, Hkv, NP, D) float32. Pages without any valid slot hold
        zeros; callers exclude them through ``page_valid``.
    """
    batch, heads, seq_len, dim = key.shape
    if valid is None:  # every slot valid: whole pages are plain views, the tail page is cut short
        full = seq_len // page_size * page_size
        pages = key[:, :, :full].float().view(batch, heads, -1, page_size, dim)
        page_min, page_max = pages.amin(dim=3), pages.amax(dim=3)
        if full < seq_len:
            tail = key[:, :, full:].float()
            page_min = torch.cat([page_min, tail.amin(dim=2, keepdim=True)], dim=2)
            page_max = torch.cat([page_max, tail.amax(dim=2, keepdim=True)], dim=2)
        return page_min, page_max
    k = _pad_to_pages(key.float(), page_size, dim=2, value=0.0)
    ok = _pad_to_pages(valid, page_size, dim=1, value=False)
    k = k.view(batch, heads, -1, page_size, dim)
    ok = ok.view(batch, 1, -1, page_size, 1)
    page_min = torch.where(ok, k, torch.inf).amin(dim=3)
    page_max = torch.where(ok, k, -torch.inf).amax(dim=3)
    any_valid = ok.any(dim=3)
    page_min = torch.where(any_valid, page_min, 0.0)
    page_max = torch.where(any_valid, page_max, 0.0)
    return page_min, page_max


def quest_page_scores_naive(
    query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor
) -> torch.Tensor:
    """Quest upper bound of the attention logit each page can reach, summed over a KV head's
    query-head group.

    Args:
        query: (B, Hq, D) the decode step's query.
        page_min, page_max: (B, Hkv, NP, D).
    Returns:
        (B, Hkv, NP) float32 scores: ``sum_{h in group} sum_d max(q_hd * max_d, q_hd * min_d)``.
    """
    batch, q_heads, dim = query.shape
    kv_heads = page_min.shape[1]
    q = query.float().view(batch, kv_heads, q_heads // kv_heads, 1, dim)
    upper = torch.maximum(q * page_max.unsqueeze(2), q * page_min.unsqueeze(2))
    return upper.sum(dim=(2, 4))


def select_pages(
    scores: torch.Tensor, pages_to_keep: torch.Tensor, forced: torch.Tensor, page_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order pages by priority and count how many each (row, KV head) reads.

    Forced pages (sinks, recent window) come first, then the rest by descending score; pages
    without a valid slot come last and are never counted. Runs without host syncs.

    Args:
        scores: (B, Hkv, NP) page scores (higher = more important).
        pages_to_keep: (B,) int, wanted page count per row (clamped to the forced and valid counts).
        forced: (B, NP) bool, pages that must be read.
        page_valid: (B, NP) bool, pages holding at least one valid slot.
    Returns:
        page_ids: (B, Hkv, NP) int32, pages in priority order.
        page_count: (B, Hkv) int32, how many leading entries of ``page_ids`` to read.
    """
    priority = scores.float().clone()
    priority = torch.where(forced.unsqueeze(1), torch.inf, priority)
    priority = torch.where(page_valid.unsqueeze(1), priority, -torch.inf)
    # Stable sort so that ties (all forced pages are +inf) keep page order: deterministic.
    page_ids = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    n_forced = (forced & page_valid).sum(-1)
    n_valid = page_valid.sum(-1)
    count = torch.minimum(torch.maximum(pages_to_keep.to(n_valid.dtype), n_forced), n_valid)
    page_count = count.unsqueeze(1).expand(-1, scores.shape[1])
    return page_ids.to(torch.int32), page_count.to(torch.int32).contiguous()


def page_attention_naive(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    page_ids: torch.Tensor,
    page_count: torch.Tensor,
    valid: torch.Tensor,
    page_size: int,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Single-query attention over only the selected pages.

    The reference masks the slots of unselected pages (cheap on CPU); the Triton kernel reads
    only the selected pages. Both give the same result.

    Args:
        query: (B, Hq, D).
        key, value: (B, Hkv, S, D).
        page_ids: (B, Hkv, NPsel) int, page indices in priority order (no duplicates).
        page_count: (B, Hkv) int, number of leading ``page_ids`` entries to read.
        valid: (B, S) bool, slots holding real tokens.
        scaling: logit scale; softcap: optional ``tanh`` logit soft-capping (Gemma 2).
    Returns:
        (B, Hq, D) in ``query.dtype``; zeros for a (row, head) with nothing to read.
    """
    batch, q_heads, dim = query.shape
    kv_heads, seq_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    n_sel = page_ids.shape[-1]
    counted = torch.arange(n_sel, device=query.device) < page_count.unsqueeze(-1)  # (B, Hkv, NPsel)
    selected = torch.zeros(batch, kv_heads, num_pages(seq_len, page_size), dtype=torch.uint8, device=query.device)
    selected = selected.scatter_reduce(-1, page_ids.long(), counted.to(torch.uint8), reduce="amax")
    keep = selected.bool().repeat_interleave(page_size, dim=-1)[..., :seq_len] & valid.unsqueeze(1)  # (B, Hkv, S)
    q = query.float().view(batch, kv_heads, group, dim)
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # (B, Hkv, G, S)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~keep.unsqueeze(2), -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a row with nothing to read gives zeros
    out = torch.matmul(probs, value.float())
    return out.reshape(batch, q_heads, dim).to(query.dtype)


def page_attention_gather(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    page_ids: torch.Tensor,
    page_count: torch.Tensor,
    valid: torch.Tensor,
    page_size: int,
    scaling: float,
    softcap: float | None = None,
    *,
    max_pages: int | None = None,
) -> torch.Tensor:
    """Torch twin of :func:`page_attention_naive` that reads only the selected pages.

    Gathers the slots of the first ``max_pages`` entries of ``page_ids`` of every (row, KV head)
    (entries past a row's ``page_count`` are gathered too but masked: pass ``max_pages`` =
    ``page_count.max()``, which is the default, read on the host), then attends over them. Reads
    ``max_pages * page_size`` K and V slots per (row, KV head) instead of ``S``. Same arguments
    and result as the reference up to float rounding.
    """
    batch, q_heads, dim = query.shape
    kv_heads, seq_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    pages = int(page_count.max()) if max_pages is None else int(max_pages)
    pages = max(0, min(pages, page_ids.shape[-1]))
    device = query.device
    in_page = torch.arange(page_size, device=device)
    slots = (page_ids[..., :pages].long().unsqueeze(-1) * page_size + in_page).flatten(-2)  # (B, Hkv, n)
    counted = torch.arange(pages, device=device) < page_count.unsqueeze(-1)  # (B, Hkv, pages)
    ok = counted.repeat_interleave(page_size, dim=-1) & (slots < seq_len)
    slots = slots.clamp(max=seq_len - 1)
    ok = ok & valid.gather(1, slots.flatten(1)).view_as(slots)
    index = slots.unsqueeze(-1).expand(-1, -1, -1, dim)
    k, v = key.gather(2, index), value.gather(2, index)  # (B, Hkv, n, D): only the selected slots
    q = query.view(batch, kv_heads, group, dim)  # a KV head's query heads attend as G queries
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ok.unsqueeze(2), scale=scaling)
    else:
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
        logits = torch.tanh(logits / softcap) * softcap
        probs = torch.softmax(logits.masked_fill(~ok.unsqueeze(2), -torch.inf), dim=-1)
        out = torch.matmul(probs, v.float())
    out = torch.nan_to_num(out, nan=0.0)  # a (row, head) with nothing to read gives zeros
    return out.reshape(batch, q_heads, dim).to(query.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels (optional dependency; see ``_backend``).
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        # tanh from exp: tl.math.tanh / libdevice are not available on every Triton version.
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _page_attention_split_kernel(
        q_ptr, k_ptr, v_ptr, ids_ptr, count_ptr, valid_ptr, mid_acc_ptr, mid_ml_ptr,
        seq_len, scaling, softcap,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ib, stride_ih, stride_ip,
        stride_cb, stride_ch,
        stride_okb, stride_oks,
        stride_ab, stride_ah, stride_as,
        stride_mb, stride_mh, stride_ms,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr, PAGE_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PAGE_BLOCK: tl.constexpr, PAGES_PER_ITER: tl.constexpr, USE_SOFTCAP: tl.constexpr, NATIVE_DOT: tl.constexpr,
    ):
        """Stage 1: program (row*KV head, split) attends all query heads of one KV head over its
        share of the first ``page_count`` selected pages; writes unnormalised (acc, max, sum)."""
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (pid_bh // KV_HEADS).to(tl.int64)
        kvh = (pid_bh % KV_HEADS).to(tl.int64)
        # The loop bound comes from device memory: no host sync. Splits share the selected pages evenly.
        count = tl.load(count_ptr + b * stride_cb + kvh * stride_ch).to(tl.int32)
        per_split = tl.cdiv(tl.cdiv(count, PAGES_PER_ITER), NUM_SPLITS) * PAGES_PER_ITER
        start = split * per_split
        end = tl.minimum(start + per_split, count)

        offs_h = tl.arange(0, BLOCK_H)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_h = offs_h < GROUP
        mask_d = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_h
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=mask_h[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)
        k_base = k_ptr + b * stride_kb + kvh * stride_kh
        v_base = v_ptr + b * stride_vb + kvh * stride_vh
        ids_base = ids_ptr + b * stride_ib + kvh * stride_ih

        m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        # Each iteration covers PAGES_PER_ITER selected pages: tile slot n is slot (n % PAGE_BLOCK)
        # of the (n // PAGE_BLOCK)-th page of the iteration.
        in_page = offs_n % PAGE_BLOCK
        page_of = offs_n // PAGE_BLOCK
        for i in range(start, end, PAGES_PER_ITER):
            entry = i + page_of
            page = tl.load(ids_base + entry * stride_ip, mask=entry < end, other=0).to(tl.int64)
            slots = page * PAGE_SIZE + in_page
            ok = (entry < end) & (in_page < PAGE_SIZE) & (slots < seq_len) & (slots >= 0)
            ok = ok & (tl.load(valid_ptr + b * stride_okb + slots * stride_oks, mask=ok, other=0) != 0)
            kv_mask = ok[:, None] & mask_d[None, :]
            k = tl.load(k_base + slots[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_base + slots[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
            if NATIVE_DOT:  # fp16/bf16 tensor cores, fp32 accumulation (GPU only)
                s = tl.dot(q.to(k.dtype), tl.trans(k))
            else:  # fp32 path (and the interpreter, where bf16 arithmetic is broken)
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            s = s * scaling
            if USE_SOFTCAP:
                s = _tanh(s / softcap) * softcap
            s = tl.where(ok[None, :], s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.where(ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            if NATIVE_DOT:
                pv = tl.dot(p.to(v.dtype), v)
            else:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        acc_ptrs = mid_acc_ptr + b * stride_ab + heads[:, None] * stride_ah + split * stride_as + offs_d[None, :]
        tl.store(acc_ptrs, acc, mask=mask_h[:, None] & mask_d[None, :])
        ml_ptrs = mid_ml_ptr + b * stride_mb + heads * stride_mh + split * stride_ms
        tl.store(ml_ptrs, m_i, mask=mask_h)
        tl.store(ml_ptrs + 1, l_i, mask=mask_h)

    @triton.jit
    def _page_attention_combine_kernel(
        mid_acc_ptr, mid_ml_ptr, out_ptr,
        stride_ab, stride_ah, stride_as,
        stride_mb, stride_mh, stride_ms,
        stride_ob, stride_oh, stride_od,
        Q_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Stage 2: one program per (row, query head) merges the splits' partial softmaxes."""
        pid = tl.program_id(0)
        b = (pid // Q_HEADS).to(tl.int64)
        h = (pid % Q_HEADS).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        mask_s = offs_s < NUM_SPLITS
        mask_d = offs_d < HEAD_DIM
        ml_ptrs = mid_ml_ptr + b * stride_mb + h * stride_mh + offs_s * stride_ms
        m = tl.load(ml_ptrs, mask=mask_s, other=-1.0e30)
        l = tl.load(ml_ptrs + 1, mask=mask_s, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(mask_s, tl.exp(m - m_max), 0.0)
        denom = tl.sum(w * l, 0)
        acc = tl.load(
            mid_acc_ptr + b * stride_ab + h * stride_ah + offs_s[:, None] * stride_as + offs_d[None, :],
            mask=mask_s[:, None] & mask_d[None, :], other=0.0,
        )
        num = tl.sum(w[:, None] * acc, 0)
        # Nothing read (no valid slot among the selected pages): zeros, like the reference.
        out = tl.where(denom > 0.0, num / tl.maximum(denom, 1e-30), 0.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(out_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _quest_scores_kernel(
        q_ptr, min_ptr, max_ptr, out_ptr, n_pages,
        stride_qb, stride_qh, stride_qd,
        stride_nb, stride_nh, stride_np, stride_nd,
        stride_xb, stride_xh, stride_xp, stride_xd,
        stride_ob, stride_oh, stride_op,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Program (row*KV head, page block): sum over the group's query heads and channels of
        max(q*max, q*min); reads each page's bounds once for the whole group."""
        pid_bh = tl.program_id(0)
        pid_p = tl.program_id(1)
        b = (pid_bh // KV_HEADS).to(tl.int64)
        kvh = (pid_bh % KV_HEADS).to(tl.int64)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        mask_p = offs_p < n_pages
        mask_d = offs_d < HEAD_DIM
        mask = mask_p[:, None] & mask_d[None, :]
        kmin = tl.load(
            min_ptr + b * stride_nb + kvh * stride_nh + offs_p[:, None] * stride_np + offs_d[None, :] * stride_nd,
            mask=mask, other=0.0,
        ).to(tl.float32)
        kmax = tl.load(
            max_ptr + b * stride_xb + kvh * stride_xh + offs_p[:, None] * stride_xp + offs_d[None, :] * stride_xd,
            mask=mask, other=0.0,
        ).to(tl.float32)
        score = tl.zeros([BLOCK_P], tl.float32)
        for g in range(GROUP):
            q = tl.load(q_ptr + b * stride_qb + (kvh * GROUP + g) * stride_qh + offs_d * stride_qd, mask=mask_d, other=0.0)
            q = q.to(tl.float32)[None, :]
            score += tl.sum(tl.maximum(q * kmax, q * kmin), 1)
        tl.store(out_ptr + b * stride_ob + kvh * stride_oh + offs_p * stride_op, score, mask=mask_p)


def _check_triton_available() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use the *_naive reference or install triton")


def page_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    page_ids: torch.Tensor,
    page_count: torch.Tensor,
    valid: torch.Tensor,
    page_size: int,
    scaling: float,
    softcap: float | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`page_attention_naive` (same arguments, same result up to float
    rounding): two-stage split-K flash decoding over the selected pages only.

    Stage 1 runs ``B * Hkv * num_splits`` programs; each takes all ``Hq / Hkv`` query heads of a KV
    head (the page is loaded once for the group), several pages per loop iteration, and an even share of the first
    ``page_count[b, h]`` entries of ``page_ids[b, h]``, the share computed on the device from
    ``page_count`` (no host sync). Stage 2 merges the partial softmaxes per (row, query head).
    Pages not selected are never read. Any tensor strides are accepted; ``head_dim <= 256``.

    ``num_splits`` (keyword only, not part of the reference signature): number of page chunks per
    (row, KV head); default fills about twice the SM count, bounded by the selectable pages.
    """
    _check_triton_available()
    batch, q_heads, dim = query.shape
    kv_heads, seq_len = key.shape[1], key.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    if dim > 256:
        raise ValueError(f"page_attention_triton supports head_dim <= 256, got {dim}")
    group = q_heads // kv_heads
    n_sel = page_ids.shape[-1]
    if num_splits is None:
        num_splits = -(-target_programs(query.device) // (batch * kv_heads))
    num_splits = max(1, min(int(num_splits), max(n_sel, 1)))
    if valid.dtype == torch.bool:
        valid = valid.view(torch.uint8)
    mid_acc = torch.empty(batch, q_heads, num_splits, dim, device=query.device, dtype=torch.float32)
    mid_ml = torch.empty(batch, q_heads, num_splits, 2, device=query.device, dtype=torch.float32)
    out = torch.empty(batch, q_heads, dim, device=query.device, dtype=query.dtype)
    native_dot = query.is_cuda and key.dtype in (torch.float16, torch.bfloat16) and value.dtype == key.dtype
    block_d = max(16, next_power_of_2(dim))
    # Slots per iteration: several small pages per tile (64 slots at head dim <= 128) so each
    # iteration issues enough independent loads; a page never straddles two iterations.
    page_block = next_power_of_2(page_size)
    block_n = max(16, page_block, 64 if block_d <= 128 else 32)
    _page_attention_split_kernel[(batch * kv_heads, num_splits)](
        query, key, value, page_ids, page_count, valid, mid_acc, mid_ml,
        seq_len, float(scaling), float(softcap) if softcap is not None else 1.0,
        *query.stride(), *key.stride(), *value.stride(), *page_ids.stride(), *page_count.stride(),
        *valid.stride(), *mid_acc.stride()[:3], *mid_ml.stride()[:3],
        KV_HEADS=kv_heads, GROUP=group, NUM_SPLITS=num_splits, PAGE_SIZE=page_size, HEAD_DIM=dim,
        BLOCK_H=max(16, next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d, PAGE_BLOCK=page_block,
        PAGES_PER_ITER=block_n // page_block, USE_SOFTCAP=softcap is not None, NATIVE_DOT=native_dot,
    )
    _page_attention_combine_kernel[(batch * q_heads,)](
        mid_acc, mid_ml, out, *mid_acc.stride()[:3], *mid_ml.stride()[:3], *out.stride(),
        Q_HEADS=q_heads, NUM_SPLITS=num_splits, HEAD_DIM=dim,
        BLOCK_S=next_power_of_2(num_splits), BLOCK_D=block_d,
    )
    return out


def quest_page_scores_triton(query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`quest_page_scores_naive`: one fused pass over the page bounds (read
    once per KV-head group), no (B, Hkv, G, NP, D) intermediate. Returns (B, Hkv, NP) float32."""
    _check_triton_available()
    batch, q_heads, dim = query.shape
    kv_heads, n_pages = page_min.shape[1], page_min.shape[2]
    if q_heads % kv_heads != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    out = torch.empty(batch, kv_heads, n_pages, device=query.device, dtype=torch.float32)
    block_d = next_power_of_2(dim)
    block_p = max(1, min(64, 8192 // block_d, next_power_of_2(n_pages)))
    grid = (batch * kv_heads, triton.cdiv(n_pages, block_p))
    _quest_scores_kernel[grid](
        query, page_min, page_max, out, n_pages,
        *query.stride(), *page_min.stride(), *page_max.stride(), *out.stride(),
        KV_HEADS=kv_heads, GROUP=q_heads // kv_heads, HEAD_DIM=dim, BLOCK_P=block_p, BLOCK_D=block_d,
    )
    return out


# --------------------------------------------------------------------------------------------
# Dispatchers: Triton on CUDA when available, the torch reference elsewhere. ``backend``:
# "auto" | "torch" | "triton"; None uses the process-wide default (``sol_hf.ops.set_backend``).
# --------------------------------------------------------------------------------------------

def page_key_bounds(key: torch.Tensor, valid: torch.Tensor | None, page_size: int):
    """Always the torch reference: it runs once per prefill; decode keeps the bounds up to date
    incrementally in the cache layer (``sol_hf.cache``)."""
    return page_key_bounds_naive(key, valid, page_size)


def quest_page_scores(
    query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Dispatcher: :func:`quest_page_scores_triton` on CUDA tensors when Triton imports, else
    :func:`quest_page_scores_naive`; ``backend`` = "auto" | "torch" | "triton"."""
    if use_triton(backend, query, page_min, page_max):
        return torch.ops.sol_hf.quest_page_scores(query, page_min, page_max)
    return quest_page_scores_naive(query, page_min, page_max)


def page_attention(
    query, key, value, page_ids, page_count, valid, page_size, scaling, softcap=None, *, backend: str | None = None
):
    """Dispatcher over the executed paths, both reading only the selected pages:
    :func:`page_attention_triton` on CUDA tensors when Triton imports (head dim <= 256), else
    :func:`page_attention_gather`; ``backend`` = "auto" | "torch" | "triton". The masked
    reference is :func:`page_attention_naive`."""
    forced = (backend or get_backend()) == "triton"
    if use_triton(backend, query, key, value) and (forced or query.shape[-1] <= 256):
        return torch.ops.sol_hf.page_attention(query, key, value, page_ids, page_count, valid, page_size, scaling, softcap)
    return page_attention_gather(query, key, value, page_ids, page_count, valid, page_size, scaling, softcap)
