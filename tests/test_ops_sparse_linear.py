"""Activation-sparse linear: Triton split-K GEMV vs the torch reference, reference vs dense."""

import os
import sys

import pytest
import torch

from sol_hf.ops import HAS_TRITON
from sol_hf.ops.sparse_linear import (
    prepare_sparse_weight,
    sparse_linear,
    sparse_linear_naive,
    sparse_linear_rows,
    sparse_linear_triton,
    topk_channel_mask,
    topk_channels,
)

requires_triton = pytest.mark.skipif(
    not (HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="needs triton, and on CPU TRITON_INTERPRET=1 set before sol_hf.ops is imported",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(n_rows, d_in, d_out, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d_in, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype).to(DEVICE)
    b = torch.randn(d_out, generator=g).to(dtype).to(DEVICE) if bias else None
    return x, weight, b


def counts(mode, n_rows, d_in):
    if mode == "all":
        c = torch.full((n_rows,), d_in)
    elif mode == "half":
        c = torch.full((n_rows,), d_in // 2)
    elif mode == "tenth":
        c = torch.full((n_rows,), max(1, d_in // 10))
    else:  # "rowdiff": every row keeps a different count, including 0 and all
        c = torch.arange(n_rows) * 37 % (d_in + 1)
        c[0] = 0
        c[-1] = d_in
    return c.to(DEVICE)


@pytest.mark.parametrize("n_rows,bias", [(1, False), (5, True), (64, True)])
def test_naive_all_channels_is_dense(n_rows, bias):
    x, weight, b = make(n_rows, 48, 40, torch.float32, bias)
    y = sparse_linear_naive(x, prepare_sparse_weight(weight), topk_channels(x), counts("all", n_rows, 48), b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, b), atol=1e-5, rtol=1e-5)


def test_naive_kept_channels_is_masked_dense():
    x, weight, b = make(6, 50, 30, torch.float32)
    c = counts("rowdiff", 6, 50)
    y = sparse_linear_naive(x, prepare_sparse_weight(weight), topk_channels(x), c, b)
    masked = x * topk_channel_mask(x, c)
    torch.testing.assert_close(y, torch.nn.functional.linear(masked, weight, b), atol=1e-5, rtol=1e-5)


# (dtype, n_rows, d_in, d_out, mode, bias, num_splits)
CASES = [
    (torch.float32, 1, 96, 80, "all", False, None),
    (torch.float32, 1, 200, 130, "half", True, 3),
    (torch.float32, 1, 77, 33, "tenth", False, 2),
    (torch.float32, 4, 96, 64, "rowdiff", True, 2),
    (torch.float32, 64, 64, 48, "rowdiff", False, None),
    (torch.float32, 3, 300, 257, "half", True, 1),
    (torch.float16, 1, 128, 96, "half", False, 2),
    (torch.float16, 8, 100, 70, "rowdiff", True, 3),
    (torch.float16, 1, 64, 200, "all", True, None),
    (torch.bfloat16, 1, 128, 96, "half", False, 2),
    (torch.bfloat16, 16, 90, 40, "rowdiff", True, 2),
    (torch.bfloat16, 2, 64, 64, "tenth", False, 1),
]


@requires_triton
@pytest.mark.parametrize("dtype,n_rows,d_in,d_out,mode,bias,num_splits", CASES)
def test_sparse_linear_triton_matches_naive(dtype, n_rows, d_in, d_out, mode, bias, num_splits):
    x, weight, b = make(n_rows, d_in, d_out, dtype, bias)
    weight_t, idx, c = prepare_sparse_weight(weight), topk_channels(x), counts(mode, n_rows, d_in)
    y = sparse_linear_triton(x, weight_t, idx, c, b, num_splits=num_splits, block_k=16, block_out=64)
    ref = sparse_linear_naive(x, weight_t, idx, c, b)
    assert y.dtype == dtype and y.shape == (n_rows, d_out)
    torch.testing.assert_close(y.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    if mode == "all":
        dense = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
        torch.testing.assert_close(y.float(), dense, atol=TOL[dtype], rtol=TOL[dtype])


@requires_triton
def test_sparse_linear_triton_partial_candidate_list_and_strides():
    """channel_idx may hold fewer candidates than Din (K < Din); x may be a strided view."""
    x, weight, b = make(4, 120, 50, torch.float32)
    x = torch.cat([x, x], dim=1)[:, ::2]
    idx = topk_channels(x)[:, :40].contiguous()
    c = torch.tensor([40, 10, 0, 25], device=DEVICE)
    weight_t = prepare_sparse_weight(weight)
    ref = sparse_linear_naive(x, weight_t, idx, c, b)
    torch.testing.assert_close(sparse_linear_triton(x, weight_t, idx, c, b, num_splits=3, block_k=8), ref, atol=2e-5, rtol=2e-5)
    # Only the rows of W_t named by the kept channels are read: poisoning the others changes nothing.
    poisoned = weight_t.clone()
    read = torch.zeros(120, dtype=torch.bool, device=DEVICE)
    for n in range(4):
        read[idx[n, : c[n]].long()] = True
    poisoned[~read] = float("nan")
    torch.testing.assert_close(sparse_linear_triton(x, poisoned, idx, c, b, num_splits=2, block_k=8), ref, atol=2e-5, rtol=2e-5)


@requires_triton
def test_sparse_linear_dispatcher():
    x, weight, b = make(2, 64, 32, torch.float32)
    args = (x, prepare_sparse_weight(weight), topk_channels(x), counts("half", 2, 64), b)
    ref = sparse_linear_naive(*args)
    assert torch.equal(sparse_linear(*args, backend="torch"), sparse_linear_rows(*args))
    torch.testing.assert_close(sparse_linear(*args, backend="torch"), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(sparse_linear(*args, backend="triton"), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("run_bytes", [2**21, 1600])
def test_sparse_linear_rows_matches_naive_and_reads_only_kept_rows(dtype, bias, threads, run_bytes, monkeypatch):
    """The CPU executed path (``embedding_bag`` over kept rows): per-row counts, a row that keeps
    everything, one that keeps nothing; rows of W_t no row keeps are never read (poisoned with NaN),
    and the rows the op hands to ``embedding_bag`` are exactly the kept ones."""
    # A row's kept channels are split into several bags (runs) whose partial sums are added: to
    # cover more threads than rows, and to keep every run under _RUN_BYTES (1600: about ten of
    # these 40-wide rows). The split is kept for rows reading megabytes, so lower its threshold
    # for this small weight.
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads * 4)
    monkeypatch.setattr(sys.modules["sol_hf.ops.sparse_linear"], "_SPLIT_FROM_BYTES", 0)
    monkeypatch.setattr(sys.modules["sol_hf.ops.sparse_linear"], "_RUN_BYTES", run_bytes)
    x, weight, b = make(4, 96, 40, dtype, bias=bias)
    x, weight, b = x.cpu(), weight.cpu(), None if b is None else b.cpu()
    idx = topk_channels(x)
    c = torch.tensor([30, 96, 0, 7])
    weight_t = prepare_sparse_weight(weight)
    ref = sparse_linear_naive(x, weight_t, idx, c, b)
    tol = TOL[dtype] * 4
    torch.testing.assert_close(sparse_linear_rows(x, weight_t, idx, c, b), ref, atol=tol, rtol=tol)
    every = torch.full((4,), 33)  # every row keeps its first 33 candidates: the fixed-size bags
    torch.testing.assert_close(sparse_linear_rows(x, weight_t, idx[:, :33], None, b),
                               sparse_linear_naive(x, weight_t, idx, every, b), atol=tol, rtol=tol)
    partial = torch.tensor([30, 50, 0, 7])  # row 1 now keeps 50, so not every row of W_t is read
    read = torch.zeros(96, dtype=torch.bool)
    for n in range(4):
        read[idx[n, : partial[n]].long()] = True
    poisoned = weight_t.clone()
    poisoned[~read] = float("nan")
    got = sparse_linear_rows(x, poisoned, idx, partial, b)
    assert not got.isnan().any()
    torch.testing.assert_close(got, sparse_linear_naive(x, weight_t, idx, partial, b), atol=tol, rtol=tol)
    seen = []
    real = torch.nn.functional.embedding_bag

    def counting(input, weight, *args, **kwargs):
        seen.append(input.numel() * weight.shape[1])  # weight elements read
        return real(input, weight, *args, **kwargs)

    torch.nn.functional.embedding_bag = counting
    try:
        sparse_linear_rows(x, weight_t, idx, partial, b)
    finally:
        torch.nn.functional.embedding_bag = real
    assert seen == [int(partial.sum()) * 40]


@requires_triton
def test_sparse_linear_kernel_is_a_custom_op_that_compiles_in_one_graph():
    x, weight, b = make(3, 64, 48, torch.float32)
    args = (x, prepare_sparse_weight(weight), topk_channels(x), counts("rowdiff", 3, 64), b)
    torch.library.opcheck(torch.ops.sol_hf.sparse_linear.default, args, test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda *a: sparse_linear(*a, backend="triton"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), sparse_linear(*args, backend="triton"))


@pytest.mark.parametrize("env, sleep", [({"OMP_WAIT_POLICY": "PASSIVE"}, True), ({"OMP_WAIT_POLICY": " passive "}, True),
                                        ({"OMP_WAIT_POLICY": "active"}, False), ({}, False), ({"GOMP_SPINCOUNT": "0"}, True),
                                        ({"GOMP_SPINCOUNT": "10000"}, False)])
def test_rows_split_across_threads_from_a_size_set_by_the_openmp_wait_policy(env, sleep):
    """Sleeping OpenMP threads (PASSIVE, or no spinning) make every parallel op pay a wake-up, so
    only rows of 1.5 MiB and more are split; spinning ones (the default, ACTIVE) split from 64 KiB.
    The module reads this process's environment once, at import (``sol-hf``'s ``main`` may set
    the policy later in a test session, as it does before a command imports torch)."""
    import importlib

    module = importlib.import_module("sol_hf.ops.sparse_linear")
    assert module._threads_sleep(env) is sleep
    assert module._SPLIT_FROM_BYTES == (1.5 * 2**20 if module._THREADS_SLEEP else 64 * 2**10)
    assert module._bags_per_row(1, module._SPLIT_FROM_BYTES - 1) == 1 < module._bags_per_row(1, module._SPLIT_FROM_BYTES)
