"""Kernels for the efficiency actions. Each op has a masked torch reference (``*_naive``) beside
its executed paths, which read fewer bytes: a torch path for CPU (``*_rows``, ``*_gather``) and a
Triton kernel for CUDA (``*_triton``). This package imports nothing else from sol_hf."""

from ._backend import HAS_TRITON, get_backend, set_backend, use_backend, use_triton
from .act_quant import fake_quantize, fake_quantize_naive, fake_quantize_triton
from .int8_linear import (
    Int8Weight,
    dequantize_int8,
    int8_group_size,
    int8_row_bytes,
    quantize_int8,
    sparse_linear_int8,
    sparse_linear_int8_naive,
    sparse_linear_int8_rows,
)
from .page_attention import (
    page_attention,
    page_attention_gather,
    page_attention_naive,
    page_attention_triton,
    page_key_bounds,
    page_key_bounds_naive,
    quest_page_scores,
    quest_page_scores_naive,
    quest_page_scores_triton,
    select_pages,
)
from .sparse_linear import (
    prepare_sparse_weight,
    sparse_linear,
    sparse_linear_rows,
    sparse_linear_naive,
    sparse_linear_triton,
    topk_channel_mask,
    topk_channels,
)

if HAS_TRITON:  # the kernels as torch.ops.sol_hf.* custom ops, which the dispatchers call
    from . import _library  # noqa: F401
