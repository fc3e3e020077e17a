"""Weight-only int8 copies of projection weights, read row by row like the activation-sparse op.

Shapes: ``N`` rows (tokens), ``Din`` input channels, ``Dout`` output channels, ``G`` output
columns per quantization group, ``NG = Dout / G`` groups per input channel.

A transposed weight ``W_t`` (Din, Dout) is quantized per input channel and group of ``G``
output columns, asymmetrically: ``W_t[c, g*G + j] ~= q[c*NG + g, j] * scale[c*NG + g] +
offset[c*NG + g]`` with ``q`` in 0..255. The copy is stored in the row-wise layout of fbgemm's
8-bit embedding tables, ``(Din * NG, G + 8)`` uint8 (``G`` codes, then the float32 scale and
offset), so that on CPU torch's ``quantized.embedding_bag_byte_rowwise_offsets`` reads exactly
the kept channels' rows, one bag per (row, group). One kept channel costs
``NG * (G + 8)`` bytes instead of ``Dout * element_size``.

Paths (same result up to float summation order):

* :func:`sparse_linear_int8_naive`: the reference, dequantize everything, then
  :func:`~sol_hf.ops.sparse_linear_naive`.
* :func:`sparse_linear_int8_rows`: CPU, fbgemm's 8-bit embedding bag over the kept rows (a
  gather of the kept rows where torch was built without fbgemm).
* the Triton kernel of :func:`~sol_hf.ops.sparse_linear_triton` with ``int8=``: the same
  split-K GEMV, reading each row's codes and scales instead of the float weights where the
  row's ``use_int8`` flag is set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import use_triton
from .sparse_linear import _uniform_offsets, sparse_linear, sparse_linear_naive

__all__ = [
    "Int8Weight",
    "int8_group_size",
    "int8_row_bytes",
    "quantize_int8",
    "dequantize_int8",
    "sparse_linear_int8_naive",
    "sparse_linear_int8_rows",
    "sparse_linear_int8",
]

# Output columns per quantization group: at most this many. A finer scale grid is more accurate,
# but on CPU each group is one bag of the embedding-bag op, and fewer, longer bags read faster
# (fbgemm spreads bags over threads: two groups already keep this project's 2 cores busy).
# Relative weight error of the copies, random normal weights: 0.69 % at 512 columns, 0.75 % at
# 1536, 0.81 % at 3072.
MAX_GROUP = 2048
MIN_GROUP = 32


def int8_row_bytes(d_out: int) -> int:
    """Bytes of one input channel's row of the int8 copy of a weight with ``d_out`` output
    columns: every column's code plus a float32 scale and offset per group."""
    group = int8_group_size(d_out)
    return (d_out // group) * (group + 8)


def int8_group_size(d_out: int) -> int:
    """Columns per group for ``d_out`` output columns: the fewest equal groups of at most
    :data:`MAX_GROUP` columns, or one group per row where no such split of at least
    :data:`MIN_GROUP` columns exists."""
    groups = -(-d_out // MAX_GROUP)
    while d_out % groups:
        groups += 1
    size = d_out // groups
    return size if size >= MIN_GROUP else d_out


@dataclass(frozen=True)
class Int8Weight:
    """An int8 copy of a (Din, Dout) transposed weight (see the module docstring).

    Attributes:
        packed: (Din * NG, G + 8) uint8, the codes then float32 scale and offset of each group.
        scale_offset: (Din * NG, 2) float32, the same scales and offsets (the Triton kernel's view).
        d_out: output columns.
        group: columns per group ``G``.
    """

    packed: torch.Tensor
    scale_offset: torch.Tensor
    d_out: int
    group: int

    @property
    def d_in(self) -> int:
        return self.packed.shape[0] // self.groups

    @property
    def groups(self) -> int:
        return self.d_out // self.group

    @property
    def row_bytes(self) -> int:
        """Bytes read per kept input channel: every group's codes, scale and offset."""
        return self.groups * (self.group + 8)

    @property
    def nbytes(self) -> int:
        """Memory held (the packed table and the kernel's copy of the scales)."""
        return self.packed.numel() + self.scale_offset.numel() * 4


def quantize_int8(weight_t: torch.Tensor, group: int | None = None) -> Int8Weight:
    """(Din, Dout) transposed weight -> :class:`Int8Weight` (round to nearest; a group whose
    values are all equal gets scale 1 and codes 0)."""
    d_in, d_out = weight_t.shape
    group = int8_group_size(d_out) if group is None else group
    if d_out % group:
        raise ValueError(f"group={group} must divide Dout={d_out}")
    w = weight_t.detach().float().reshape(d_in * (d_out // group), group)
    low = w.amin(-1)
    spread = w.amax(-1) - low
    scale = torch.where(spread > 0, spread / 255.0, torch.ones_like(spread))
    codes = torch.round((w - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 255).to(torch.uint8)
    scale_offset = torch.stack([scale, low], dim=-1).contiguous()  # (rows, 2)
    packed = torch.cat([codes, scale_offset.view(torch.uint8)], dim=-1).contiguous()
    return Int8Weight(packed, scale_offset, d_out, group)


def dequantize_int8(weight: Int8Weight) -> torch.Tensor:
    """:class:`Int8Weight` -> (Din, Dout) float32, the values every path computes with."""
    codes = weight.packed[:, : weight.group].float()
    w = codes * weight.scale_offset[:, :1] + weight.scale_offset[:, 1:]
    return w.view(weight.d_in, weight.d_out)


def sparse_linear_int8_naive(x, weight: Int8Weight, channel_idx, channel_count, bias=None) -> torch.Tensor:
    """The reference: ``y[n] = sum_{j < count[n]} x[n, idx[n, j]] * deq(W_t)[idx[n, j], :] (+ bias)``
    (arguments as :func:`~sol_hf.ops.sparse_linear_naive`; (N, Dout) in ``x.dtype``)."""
    return sparse_linear_naive(x, dequantize_int8(weight), channel_idx, channel_count, bias)


def _has_fbgemm_bag() -> bool:
    try:
        return hasattr(torch.ops.quantized, "embedding_bag_byte_rowwise_offsets")
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return False


_HAS_FBGEMM_BAG = _has_fbgemm_bag()


_GROUP_OFFSETS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _group_offsets(groups: int, device: torch.device) -> torch.Tensor:
    """(1, NG, 1) int64 ``0..NG-1``, made once."""
    key = (groups, device)
    if key not in _GROUP_OFFSETS:
        _GROUP_OFFSETS[key] = torch.arange(groups, device=device).view(1, groups, 1)
    return _GROUP_OFFSETS[key]


def sparse_linear_int8_rows(x, weight: Int8Weight, channel_idx, channel_count, bias=None, *,
                            use_fbgemm: bool | None = None) -> torch.Tensor:
    """CPU path: reads only the packed rows of each row's kept channels (``count[n] * NG`` rows of
    ``G + 8`` bytes). One bag per (row, group) of fbgemm's 8-bit embedding bag, which
    dequantizes as it sums, in float32. ``channel_count=None``: every row uses all K candidates.
    ``use_fbgemm=False`` (or a torch without fbgemm) gathers the kept rows and dequantizes them
    with torch ops instead (same bytes read, slower)."""
    n_rows, n_idx = channel_idx.shape
    groups = weight.groups
    idx = channel_idx if channel_idx.dtype == torch.long else channel_idx.long()
    xs = torch.gather(x, 1, idx)  # (N, K)
    if xs.dtype != torch.float32:
        xs = xs.float()
    if use_fbgemm is None:
        use_fbgemm = _HAS_FBGEMM_BAG
    counts = None if channel_count is None else channel_count.clamp(0, n_idx)
    per_bag = None  # entries per bag, where bags differ in size
    if counts is None or bool((counts == n_idx).all()):  # fixed-size bags, one per (row, group)
        if groups == 1:  # the packed rows are the channels themselves (no index arithmetic)
            rows, sample = idx.reshape(-1), xs.reshape(-1)
        else:
            rows = (idx.unsqueeze(1) * groups + _group_offsets(groups, idx.device)).reshape(-1)  # (N * NG * K,)
            sample = xs.unsqueeze(1).expand(-1, groups, -1).reshape(-1)
        offsets = _uniform_offsets(n_rows * groups, n_idx, 1, idx.device)
    else:  # each row's bags hold its first count[n] candidates
        rows = idx.unsqueeze(1) * groups + _group_offsets(groups, idx.device)  # (N, NG, K)
        sample = xs.unsqueeze(1).expand(-1, groups, -1)
        used = (torch.arange(n_idx, device=x.device) < counts.unsqueeze(-1)).unsqueeze(1).expand(-1, groups, -1)
        rows, sample = rows[used], sample[used]
        per_bag = counts.repeat_interleave(groups)
        offsets = torch.cumsum(per_bag, 0) - per_bag
    if use_fbgemm:
        out = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            weight.packed, rows, offsets, False, 0, False, sample, None, False
        )
    else:
        so = weight.scale_offset.index_select(0, rows)
        deq = weight.packed.index_select(0, rows)[:, : weight.group].float() * so[:, :1] + so[:, 1:]
        bags = torch.arange(n_rows * groups, device=x.device)
        bag = bags.repeat_interleave(n_idx) if per_bag is None else bags.repeat_interleave(per_bag)
        out = torch.zeros(n_rows * groups, weight.group, device=x.device).index_add_(0, bag, deq * sample.unsqueeze(-1))
    out = out.view(n_rows, weight.d_out)
    if bias is not None:
        out = out + bias
    return out if out.dtype == x.dtype else out.to(x.dtype)


def sparse_linear_int8(x, weight: Int8Weight, channel_idx, channel_count, bias=None, *, backend: str | None = None):
    """Dispatcher: every row reads the int8 copy. On CUDA (or ``backend="triton"``) the Triton
    kernel of :func:`~sol_hf.ops.sparse_linear` with every row flagged int8, else
    :func:`sparse_linear_int8_rows`."""
    if use_triton(backend, x, weight.packed):
        flags = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return sparse_linear(x, None, channel_idx, channel_count, bias, int8=weight, use_int8=flags, backend="triton")
    return sparse_linear_int8_rows(x, weight, channel_idx, channel_count, bias)
