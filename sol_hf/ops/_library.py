"""The Triton kernels as ``torch.library`` custom ops (``torch.ops.sol_hf.*``).

``torch.compile(fullgraph=True)`` and CUDA-graph capture then see each kernel as one opaque node;
the fake implementations give the output's shape and dtype without running anything. The
dispatchers (``page_attention``, ``quest_page_scores``, ``sparse_linear``, ``fake_quantize``) call
these ops whenever they pick Triton. Registered on import of ``sol_hf.ops`` when Triton imports.
"""

from __future__ import annotations

import torch

from .act_quant import fake_quantize_triton
from .page_attention import page_attention_triton, quest_page_scores_triton
from .int8_linear import Int8Weight
from .sparse_linear import sparse_linear_triton

__all__ = ["page_attention_op", "quest_page_scores_op", "sparse_linear_op", "sparse_linear_int8_op", "fake_quantize_op"]


@torch.library.custom_op("sol_hf::page_attention", mutates_args=())
def page_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, page_ids: torch.Tensor, page_count: torch.Tensor,
    valid: torch.Tensor, page_size: int, scaling: float, softcap: float | None,
) -> torch.Tensor:
    """:func:`~sol_hf.ops.page_attention_triton` as a custom op: (B, Hq, D) in ``query.dtype``."""
    return page_attention_triton(query, key, value, page_ids, page_count, valid, page_size, scaling, softcap)


@page_attention_op.register_fake
def _(query, key, value, page_ids, page_count, valid, page_size, scaling, softcap):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@torch.library.custom_op("sol_hf::quest_page_scores", mutates_args=())
def quest_page_scores_op(query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> torch.Tensor:
    """:func:`~sol_hf.ops.quest_page_scores_triton` as a custom op: (B, Hkv, NP) float32."""
    return quest_page_scores_triton(query, page_min, page_max)


@quest_page_scores_op.register_fake
def _(query, page_min, page_max):
    return query.new_empty(page_min.shape[:3], dtype=torch.float32)


@torch.library.custom_op("sol_hf::sparse_linear", mutates_args=())
def sparse_linear_op(
    x: torch.Tensor, weight_t: torch.Tensor, channel_idx: torch.Tensor, channel_count: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`~sol_hf.ops.sparse_linear_triton` as a custom op: (N, Dout) in ``x.dtype``."""
    return sparse_linear_triton(x, weight_t, channel_idx, channel_count, bias)


@sparse_linear_op.register_fake
def _(x, weight_t, channel_idx, channel_count, bias):
    return x.new_empty(x.shape[0], weight_t.shape[1])


@torch.library.custom_op("sol_hf::sparse_linear_int8", mutates_args=())
def sparse_linear_int8_op(
    x: torch.Tensor, weight_t: torch.Tensor | None, packed: torch.Tensor, scale_offset: torch.Tensor, d_out: int,
    group: int, use_int8: torch.Tensor, channel_idx: torch.Tensor, channel_count: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`~sol_hf.ops.sparse_linear_triton` with an int8 copy (rows flagged ``use_int8`` read
    it): (N, Dout) in ``x.dtype``."""
    int8 = Int8Weight(packed, scale_offset, d_out, group)
    return sparse_linear_triton(x, weight_t, channel_idx, channel_count, bias, int8=int8, use_int8=use_int8)


@sparse_linear_int8_op.register_fake
def _(x, weight_t, packed, scale_offset, d_out, group, use_int8, channel_idx, channel_count, bias):
    return x.new_empty(x.shape[0], d_out)


@torch.library.custom_op("sol_hf::fake_quantize", mutates_args=())
def fake_quantize_op(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """:func:`~sol_hf.ops.fake_quantize_triton` as a custom op: ``x``'s shape and dtype."""
    return fake_quantize_triton(x, bits)


@fake_quantize_op.register_fake
def _(x, bits):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
