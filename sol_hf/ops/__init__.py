"""Kernels for the three efficiency actions. Each op has a torch reference (``*_naive``) beside
its fast path; this package imports nothing else from sol_hf."""

from ._backend import HAS_TRITON, get_backend, set_backend, use_backend
from .act_quant import fake_quantize, fake_quantize_naive, fake_quantize_triton
from .page_attention import (
    page_attention,
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
    sparse_linear_naive,
    sparse_linear_triton,
    topk_channel_mask,
    topk_channels,
)
