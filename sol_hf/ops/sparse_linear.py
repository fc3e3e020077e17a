"""Activation-sparse linear layers: keep the top-|x| input channels of each row.

Shapes: ``N`` rows (tokens), ``Din`` input channels, ``Dout`` output channels.
The kernel path reads only the weight columns of kept channels; the weight is stored
transposed, ``(Din, Dout)`` row-major, so one input channel's weights are contiguous.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ._backend import HAS_TRITON, target_programs, tl, triton, use_triton

__all__ = [
    "sparse_linear_triton",
    "sparse_linear_rows",
    "topk_channel_mask",
    "topk_channels",
    "sparse_linear_naive",
    "sparse_linear",
    "prepare_sparse_weight",
]


def _rank_by_magnitude(x: torch.Tensor) -> torch.Tensor:
    """(N, Din) -> (N, Din) int64 rank of each channel by descending |x| (0 = largest), ties
    broken by channel index."""
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return rank


def topk_channel_mask(x: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``keep_count[n]`` largest-|x| channels of each row. No host sync.

    Args:
        x: (N, Din).
        keep_count: (N,) int, channels to keep per row (``>= Din`` keeps all).
    Returns:
        (N, Din) bool, exactly ``min(keep_count[n], Din)`` True per row.
    """
    return _rank_by_magnitude(x) < keep_count.unsqueeze(-1)


def topk_channels(x: torch.Tensor) -> torch.Tensor:
    """(N, Din) -> (N, Din) int32 channel indices sorted by descending |x| (stable)."""
    return torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices.to(torch.int32)


def prepare_sparse_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Dout, Din) nn.Linear weight -> (Din, Dout) contiguous, the layout the kernel reads.

    Done once per layer when the model is wrapped (a copy of the weight, same dtype): in this
    layout the weights of one input channel form one contiguous row of ``Dout`` elements, so a
    kept channel costs one contiguous read and a dropped channel costs nothing. For a
    ``Conv1D`` (GPT-2) weight, already stored (Din, Dout), use ``weight.contiguous()`` instead."""
    return weight.t().contiguous()


def sparse_linear_naive(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    channel_idx: torch.Tensor,
    channel_count: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[n] = sum_{j < count[n]} x[n, idx[n, j]] * W_t[idx[n, j], :] (+ bias)``.

    Args:
        x: (N, Din).
        weight_t: (Din, Dout), see :func:`prepare_sparse_weight`.
        channel_idx: (N, K) int, candidate channels in priority order (K <= Din).
        channel_count: (N,) int, how many leading entries of ``channel_idx`` are used.
        bias: optional (Dout,).
    Returns:
        (N, Dout) in ``x.dtype``, accumulated in float32.
    """
    idx = channel_idx.long()
    used = torch.arange(idx.shape[-1], device=x.device) < channel_count.unsqueeze(-1)
    xs = torch.gather(x.float(), 1, idx) * used  # (N, K)
    w = weight_t.float()[idx]  # (N, K, Dout)
    y = torch.einsum("nk,nkd->nd", xs, w)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# How the CPU op shares out a row's work (benchmarks/sparse_linear_cpu.py measures the choices on
# cold weights). ``embedding_bag`` runs its bags in parallel; a row reading ``_SPLIT_FROM_BYTES``
# or more has its kept channels split into runs, one bag each, whose partial sums are then added:
# at least ``_BAGS_PER_THREAD`` per intra-op thread (two balance the threads better than one on
# shared cores), and at most ``_RUN_BYTES`` of weights per run (shorter runs read a large
# projection faster: 1B shape, bf16, gate/up at keep 0.5 read kept bytes at 1.07 of the dense
# time per byte in 2 MiB runs, 1.26 in four runs).
# Whether splitting a small row pays depends on what waking the other threads costs, which the
# OpenMP wait policy decides. With ``OMP_WAIT_POLICY=PASSIVE`` (what ``sol-hf`` sets) idle threads
# sleep and every parallel op wakes them (tens of microseconds on this project's 2-core VM), so
# rows under 1.5 MiB run on one thread. With the default policy (threads spin a while between ops)
# or ``ACTIVE``, waking is nearly free and rows of 64 KiB or more are split. SmolLM2's q/k/v at
# keep 0.3, time per byte over dense: split 1.9, unsplit 2.8 with spinning threads; split 2.7,
# unsplit 1.7 with sleeping ones. Read once, as libgomp reads it when it loads.


def _threads_sleep(environ) -> bool:
    """Whether ``environ`` makes OpenMP's idle threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``
    or ``GOMP_SPINCOUNT=0``) rather than spin a while (the default, ``ACTIVE``)."""
    return (environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
            or environ.get("GOMP_SPINCOUNT", "").strip() == "0")


_THREADS_SLEEP = _threads_sleep(os.environ)  # at import: later changes to the environment reach neither libgomp nor this
_SPLIT_FROM_BYTES = 1.5 * 2**20 if _THREADS_SLEEP else 64 * 2**10
_BAGS_PER_THREAD = 2
_RUN_BYTES = 2 * 2**20
_BAG_OFFSETS: dict[tuple, torch.Tensor] = {}


def _bags_per_row(n_rows: int, bytes_per_row: float) -> int:
    """Runs (one bag each) a row's kept channels are split into: enough that the bags cover the
    intra-op threads ``_BAGS_PER_THREAD`` times and that none reads more than ``_RUN_BYTES``; 1
    where a row reads under ``_SPLIT_FROM_BYTES``."""
    if bytes_per_row < _SPLIT_FROM_BYTES:
        return 1
    return max(1, _BAGS_PER_THREAD * torch.get_num_threads() // max(n_rows, 1), math.ceil(bytes_per_row / _RUN_BYTES))


def _uniform_offsets(rows: int, n_idx: int, parts: int, device: torch.device) -> torch.Tensor:
    """(rows * parts,) int64 start of each bag in a flat (rows * n_idx) index list where every row
    uses all ``n_idx`` entries, split into ``parts`` runs of ``n_idx // parts`` (the last takes the
    rest); made once per shape (what ``embedding_bag`` would otherwise need ``arange`` for on every
    call)."""
    key = (rows, n_idx, parts, device)
    if key not in _BAG_OFFSETS:
        row_start = torch.arange(0, rows * n_idx, n_idx, device=device).unsqueeze(1)
        _BAG_OFFSETS[key] = (row_start + torch.arange(parts, device=device) * (n_idx // parts)).reshape(-1)
    return _BAG_OFFSETS[key]


def sparse_linear_rows(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    channel_idx: torch.Tensor,
    channel_count: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch twin of :func:`sparse_linear_naive` that reads only the kept rows of ``W_t``.

    ``y[n]`` is a weighted sum of the ``count[n]`` rows of ``W_t`` that row ``n`` keeps, which is
    exactly what ``F.embedding_bag(mode="sum", per_sample_weights=...)`` computes while reading
    only those rows (rows do not share reads, so the op reads ``sum_n count[n]`` weight rows).
    ``embedding_bag`` runs its bags in parallel: a row reading enough bytes has its kept channels
    split into runs, one bag each over whole weight rows, whose partial sums are then added (how
    many: :func:`_bags_per_row` and the comment above it). Same arguments and result as the reference up to float summation order (in bf16 /
    fp16 the partial sums are rounded before they are added). Reads ``channel_count`` on the host
    once (free on CPU, where this path runs); ``channel_count=None`` means every row uses all K
    candidates.
    """
    n_rows, n_idx = channel_idx.shape
    d_out = weight_t.shape[1]
    idx = channel_idx if channel_idx.dtype == torch.long else channel_idx.long()
    weights = torch.gather(x, 1, idx)
    if weights.dtype != weight_t.dtype:
        weights = weights.to(weight_t.dtype)
    counts = None if channel_count is None else channel_count.clamp(0, n_idx)
    if counts is not None and bool((counts == n_idx).all()):
        counts = None  # every row uses all its candidates: fixed-size bags
    parts = _bags_per_row(n_rows, n_idx * d_out * weight_t.element_size())
    if counts is None:
        offsets = _uniform_offsets(n_rows, n_idx, parts, x.device)
        out = F.embedding_bag(idx.reshape(-1), weight_t, offsets, mode="sum", per_sample_weights=weights.reshape(-1))
    else:  # row n's bags hold its first count[n] candidates, split into ``parts`` runs
        used = torch.arange(n_idx, device=x.device) < counts.unsqueeze(-1)
        row_start = (torch.cumsum(counts, 0) - counts).unsqueeze(1)
        offsets = (row_start + torch.arange(parts, device=x.device) * (counts // parts).unsqueeze(1)).reshape(-1)
        out = F.embedding_bag(idx[used], weight_t, offsets, mode="sum", per_sample_weights=weights[used])
    if parts > 1:
        out = out.view(n_rows, parts, d_out).sum(1)
    if bias is not None:
        out = out + bias
    return out if out.dtype == x.dtype else out.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _float_rows(w_ptr, ch, offs_o, stride_wi, stride_wo, mask_w):
        """(BLOCK_K, BLOCK_OUT) float32 block of W_t: rows ``ch``, columns ``offs_o``."""
        return tl.load(w_ptr + ch[:, None] * stride_wi + offs_o[None, :] * stride_wo, mask=mask_w, other=0.0).to(tl.float32)

    @triton.jit
    def _sparse_linear_split_kernel(
        x_ptr, w_ptr, idx_ptr, count_ptr, bias_ptr, part_ptr, out_ptr,
        q_ptr, so_ptr, flag_ptr,
        d_out, n_idx, group, n_groups,
        stride_xn, stride_xd, stride_wi, stride_wo, stride_in, stride_ik, stride_c,
        stride_ps, stride_pn, stride_on, stride_oo, stride_qr, stride_f,
        SPLITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_INT8: tl.constexpr,
    ):
        """Program (row n, output block, split): accumulates x[n, c] * W_t[c, block] over its share
        of the first ``count[n]`` channels of ``idx[n]``; only those rows of W_t are loaded. With
        ``HAS_INT8``, a row whose flag is set reads the int8 copy instead: the codes of its kept
        channels' groups (``q[c * n_groups + o // group, o % group]``) and their scale and offset."""
        n = tl.program_id(0).to(tl.int64)
        pid_o = tl.program_id(1)
        split = tl.program_id(2)
        count = tl.load(count_ptr + n * stride_c).to(tl.int32)
        count = tl.maximum(tl.minimum(count, n_idx), 0)
        per_split = tl.cdiv(tl.cdiv(count, BLOCK_K), SPLITS) * BLOCK_K
        start = split * per_split
        end = tl.minimum(start + per_split, count)
        offs_o = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        mask_o = offs_o < d_out
        acc = tl.zeros([BLOCK_OUT], tl.float32)
        if HAS_INT8:
            use_int8 = tl.load(flag_ptr + n * stride_f) != 0
        for k0 in range(start, end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < end
            ch = tl.load(idx_ptr + n * stride_in + offs_k * stride_ik, mask=mask_k, other=0).to(tl.int64)
            xv = tl.load(x_ptr + n * stride_xn + ch * stride_xd, mask=mask_k, other=0.0).to(tl.float32)
            mask_w = mask_k[:, None] & mask_o[None, :]
            if HAS_INT8:
                if use_int8:
                    qrow = ch[:, None] * n_groups + (offs_o // group)[None, :]  # (BLOCK_K, BLOCK_OUT)
                    codes = tl.load(q_ptr + qrow * stride_qr + (offs_o % group)[None, :], mask=mask_w, other=0)
                    scale = tl.load(so_ptr + qrow * 2, mask=mask_w, other=0.0)
                    offset = tl.load(so_ptr + qrow * 2 + 1, mask=mask_w, other=0.0)
                    w = codes.to(tl.float32) * scale + offset
                else:
                    w = _float_rows(w_ptr, ch, offs_o, stride_wi, stride_wo, mask_w)
            else:
                w = _float_rows(w_ptr, ch, offs_o, stride_wi, stride_wo, mask_w)
            acc += tl.sum(xv[:, None] * w, 0)
        if SPLITS == 1:  # write the result directly
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
            tl.store(out_ptr + n * stride_on + offs_o * stride_oo, acc.to(out_ptr.dtype.element_ty), mask=mask_o)
        else:
            tl.store(part_ptr + split * stride_ps + n * stride_pn + offs_o, acc, mask=mask_o)

    @triton.jit
    def _sparse_linear_reduce_kernel(
        part_ptr, bias_ptr, out_ptr, d_out,
        stride_ps, stride_pn, stride_on, stride_oo,
        SPLITS: tl.constexpr, BLOCK_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        """Sums the split partials in a fixed order (deterministic, no atomics), adds the bias."""
        n = tl.program_id(0).to(tl.int64)
        offs_o = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        mask_o = offs_o < d_out
        acc = tl.zeros([BLOCK_OUT], tl.float32)
        for s in range(SPLITS):
            acc += tl.load(part_ptr + s * stride_ps + n * stride_pn + offs_o, mask=mask_o, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * stride_on + offs_o * stride_oo, acc.to(out_ptr.dtype.element_ty), mask=mask_o)


def sparse_linear_triton(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    channel_idx: torch.Tensor,
    channel_count: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_k: int = 32,
    block_out: int = 128,
    int8=None,
    use_int8: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`sparse_linear_naive` (same arguments, same result up to float
    summation order): a split-K GEMV that loads only the ``W_t`` rows of each row's kept channels.
    With ``int8`` (an :class:`~sol_hf.ops.int8_linear.Int8Weight` of the same weight) and
    ``use_int8`` ((N,) bool), the flagged rows read the int8 copy instead (the twin of
    :func:`~sol_hf.ops.int8_linear.sparse_linear_int8_naive`); ``weight_t`` may then be None
    when every row is flagged.

    Grid ``(N, ceil(Dout / block_out), num_splits)``; each program reads its share of the first
    ``channel_count[n]`` entries of ``channel_idx[n]`` (computed on the device, no host sync), in
    fp32. With more than one split, a second kernel sums the partials in a fixed order (no
    atomics, deterministic) and adds the bias. Rows do not share weight reads: at N > 1 the kernel
    reads ``sum_n count[n]`` weight rows, so it pays only while that is below ``Din``.

    Keyword-only extras (not in the reference signature): ``num_splits`` (default: enough
    programs for about twice the SM count), ``block_k``, ``block_out`` (powers of two).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use sparse_linear_naive or install triton")
    n_rows, d_in = x.shape
    if (int8 is None) != (use_int8 is None):
        raise ValueError("int8 and use_int8 go together")
    if weight_t is None:
        if int8 is None:
            raise ValueError("weight_t is required without an int8 copy")
        weight_t = int8.packed  # never read: every row is flagged
        d_out = int8.d_out
    else:
        d_out = weight_t.shape[1]
        if weight_t.shape[0] != d_in:
            raise ValueError(f"weight_t must be (Din, Dout) = ({d_in}, ...), got {tuple(weight_t.shape)}; see prepare_sparse_weight")
    if int8 is not None and (int8.d_out != d_out or int8.packed.shape[0] != d_in * (d_out // int8.group)):
        raise ValueError(f"the int8 copy holds a ({int8.packed.shape[0] // (int8.d_out // int8.group)}, {int8.d_out}) weight, "
                         f"not ({d_in}, {d_out})")
    n_idx = channel_idx.shape[-1]
    out_blocks = triton.cdiv(d_out, block_out)
    if num_splits is None:
        num_splits = triton.cdiv(target_programs(x.device), max(1, n_rows * out_blocks))
    num_splits = max(1, min(int(num_splits), triton.cdiv(max(n_idx, 1), block_k)))
    out = torch.empty(n_rows, d_out, device=x.device, dtype=x.dtype)
    if n_rows == 0:
        return out
    part = torch.empty(num_splits if num_splits > 1 else 1, n_rows, d_out, device=x.device, dtype=torch.float32)
    bias_arg = bias if bias is not None else out
    if int8 is not None:
        q, so, flags, group = int8.packed, int8.scale_offset, use_int8, int8.group
    else:  # placeholders, never read
        q, so, flags, group = out, out, out, 1
    _sparse_linear_split_kernel[(n_rows, out_blocks, num_splits)](
        x, weight_t, channel_idx, channel_count, bias_arg, part, out,
        q, so, flags,
        d_out, n_idx, group, d_out // group,
        *x.stride(), *weight_t.stride(), *channel_idx.stride(), channel_count.stride(0),
        part.stride(0), part.stride(1), *out.stride(), q.stride(0), flags.stride(0),
        SPLITS=num_splits, BLOCK_K=block_k, BLOCK_OUT=block_out, HAS_BIAS=bias is not None,
        HAS_INT8=int8 is not None,
    )
    if num_splits > 1:
        _sparse_linear_reduce_kernel[(n_rows, out_blocks)](
            part, bias_arg, out, d_out, part.stride(0), part.stride(1), *out.stride(),
            SPLITS=num_splits, BLOCK_OUT=block_out, HAS_BIAS=bias is not None,
        )
    return out


def sparse_linear(x, weight_t, channel_idx, channel_count, bias=None, *, backend: str | None = None,
                  int8=None, use_int8: torch.Tensor | None = None):
    """Dispatcher over the two executed paths, both reading only the kept rows of ``W_t``:
    :func:`sparse_linear_triton` on CUDA tensors when Triton imports, else
    :func:`sparse_linear_rows` (torch's ``embedding_bag``); ``backend`` = "auto" | "torch" |
    "triton" (None: the default set by ``sol_hf.ops.set_backend``). The masked reference is
    :func:`sparse_linear_naive`. ``int8`` / ``use_int8``: rows flagged read an int8 copy (Triton
    only; the CPU path of int8 rows is :func:`~sol_hf.ops.int8_linear.sparse_linear_int8_rows`)."""
    if use_triton(backend, x, weight_t if weight_t is not None else int8.packed):
        if channel_count is None:
            channel_count = torch.full((x.shape[0],), channel_idx.shape[1], dtype=torch.long, device=x.device)
        if int8 is None:
            return torch.ops.sol_hf.sparse_linear(x, weight_t, channel_idx, channel_count, bias)
        return torch.ops.sol_hf.sparse_linear_int8(
            x, weight_t, int8.packed, int8.scale_offset, int8.d_out, int8.group, use_int8, channel_idx, channel_count, bias
        )
    if int8 is not None:
        raise ValueError("int8 rows on the torch backend run sol_hf.ops.sparse_linear_int8_rows")
    return sparse_linear_rows(x, weight_t, channel_idx, channel_count, bias)
