"""Page attention and Quest scoring: Triton kernels vs the torch references, references vs
brute-force definitions. On CPU the kernels run under TRITON_INTERPRET=1 (see conftest.py)."""

import math
import os

import pytest
import torch

from sol_hf.ops import HAS_TRITON, use_backend
from sol_hf.ops.page_attention import (
    page_attention,
    page_attention_gather,
    page_attention_naive,
    page_attention_triton,
    page_key_bounds_naive,
    quest_page_scores,
    quest_page_scores_naive,
    quest_page_scores_triton,
    select_pages,
)

requires_triton = pytest.mark.skipif(
    not (HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="needs triton, and on CPU TRITON_INTERPRET=1 set before sol_hf.ops is imported",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(batch, kv_heads, group, seq_len, dim, dtype, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, dim, generator=g)
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=g)
    valid = torch.ones(batch, seq_len, dtype=torch.bool)
    if pad:  # left padding on the last row
        valid[-1, :pad] = False
    return (t.to(DEVICE) for t in (q.to(dtype), k.to(dtype), v.to(dtype), valid))


def dense_attention(q, k, v, valid, scaling, softcap=None):
    """Brute force: plain softmax attention of each query head over all valid slots."""
    batch, q_heads, dim = q.shape
    group = q_heads // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    out = torch.zeros(batch, q_heads, dim)
    for b in range(batch):
        for h in range(q_heads):
            kk, vv = k[b, h][valid[b]].cpu(), v[b, h][valid[b]].cpu()
            logits = (kk @ q[b, h].float().cpu()) * scaling
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            out[b, h] = torch.softmax(logits, dim=0) @ vv
    return out


def page_selection(mode, batch, kv_heads, n_pages, seed=0):
    """(page_ids, page_count) for a selection mode."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.stack([torch.randperm(n_pages, generator=g) for _ in range(batch * kv_heads)])
    ids = ids.view(batch, kv_heads, n_pages).to(torch.int32)
    if mode == "all":
        count = torch.full((batch, kv_heads), n_pages)
    elif mode == "sinks":  # only the first page (attention sinks)
        ids = torch.arange(n_pages, dtype=torch.int32).expand(batch, kv_heads, n_pages).contiguous()
        count = torch.ones(batch, kv_heads)
    elif mode == "rowdiff":  # every (row, KV head) reads a different number of pages, one reads none
        count = torch.arange(batch * kv_heads).view(batch, kv_heads) % (n_pages + 1)
    else:  # "half"
        count = torch.full((batch, kv_heads), max(1, n_pages // 2))
    return ids.to(DEVICE), count.to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_naive_all_pages_is_dense_softmax(group, softcap):
    q, k, v, valid = make_inputs(2, 2, group, 45, 32, torch.float32, pad=7)
    ids, count = page_selection("all", 2, 2, math.ceil(45 / 8))
    out = page_attention_naive(q, k, v, ids, count, valid, 8, 0.2, softcap)
    torch.testing.assert_close(out.cpu(), dense_attention(q, k, v, valid, 0.2, softcap), atol=1e-5, rtol=1e-5)


def test_naive_quest_scores_brute_force():
    q, k, _, valid = make_inputs(1, 2, 4, 40, 16, torch.float32)
    mn, mx = page_key_bounds_naive(k, valid, 16)
    scores = quest_page_scores_naive(q, mn, mx)
    for h in range(2):
        for p in range(3):
            want = sum(
                max(q[0, h * 4 + g, d] * mx[0, h, p, d], q[0, h * 4 + g, d] * mn[0, h, p, d]).item()
                for g in range(4) for d in range(16)
            )
            assert abs(scores[0, h, p].item() - want) < 1e-4


# (dtype, batch, kv_heads, group, head_dim, seq_len, page_size, mode, pad, num_splits)
CASES = [
    (torch.float32, 1, 1, 1, 64, 37, 16, "all", 0, None),
    (torch.float32, 1, 2, 4, 64, 53, 16, "all", 0, 2),
    (torch.float32, 2, 1, 8, 128, 45, 16, "all", 5, 3),
    (torch.float32, 2, 2, 1, 128, 33, 8, "half", 0, 2),
    (torch.float32, 1, 2, 4, 128, 100, 16, "half", 0, 4),
    (torch.float32, 2, 2, 8, 64, 61, 16, "rowdiff", 3, 2),
    (torch.float32, 3, 1, 4, 64, 50, 16, "rowdiff", 0, None),
    (torch.float32, 2, 2, 4, 64, 40, 16, "sinks", 0, 2),
    (torch.float32, 1, 1, 8, 128, 17, 16, "sinks", 0, 1),
    (torch.float32, 2, 1, 4, 64, 29, 4, "half", 2, 3),
    (torch.float32, 1, 1, 4, 64, 30, 12, "all", 0, 2),  # page size not a power of two
    (torch.float16, 1, 1, 1, 64, 37, 16, "all", 0, 2),
    (torch.float16, 2, 2, 4, 128, 53, 16, "half", 4, 2),
    (torch.float16, 1, 1, 8, 64, 70, 16, "rowdiff", 0, 3),
    (torch.float16, 2, 1, 4, 128, 25, 16, "sinks", 0, None),
    (torch.float16, 1, 2, 8, 128, 99, 32, "all", 0, 2),
    (torch.bfloat16, 1, 1, 4, 64, 41, 16, "all", 0, 2),
    (torch.bfloat16, 2, 1, 1, 128, 34, 16, "rowdiff", 1, 2),
    (torch.bfloat16, 1, 2, 8, 64, 57, 16, "half", 0, None),
]


@requires_triton
@pytest.mark.parametrize("dtype,batch,kv_heads,group,dim,seq_len,page_size,mode,pad,num_splits", CASES)
def test_page_attention_triton_matches_naive(dtype, batch, kv_heads, group, dim, seq_len, page_size, mode, pad, num_splits):
    q, k, v, valid = make_inputs(batch, kv_heads, group, seq_len, dim, dtype, pad=pad)
    ids, count = page_selection(mode, batch, kv_heads, math.ceil(seq_len / page_size))
    scaling = 1.0 / math.sqrt(dim)
    out = page_attention_triton(q, k, v, ids, count, valid, page_size, scaling, num_splits=num_splits)
    ref = page_attention_naive(q, k, v, ids, count, valid, page_size, scaling)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    if mode == "all":  # keep-all must be dense softmax attention over the valid slots
        dense = dense_attention(q, k, v, valid, scaling)
        torch.testing.assert_close(out.float().cpu(), dense, atol=TOL[dtype], rtol=TOL[dtype])
    if mode == "rowdiff":  # a (row, KV head) with nothing to read gives zeros
        empty = (count == 0).repeat_interleave(group, dim=1)
        assert torch.all(out[empty] == 0)


@requires_triton
@pytest.mark.parametrize("dim", [96, 256])
def test_page_attention_triton_other_head_dims(dim):
    q, k, v, valid = make_inputs(1, 1, 2, 35, dim, torch.float32)
    ids, count = page_selection("half", 1, 1, 3)
    out = page_attention_triton(q, k, v, ids, count, valid, 16, 0.1, num_splits=2)
    torch.testing.assert_close(out, page_attention_naive(q, k, v, ids, count, valid, 16, 0.1), atol=2e-5, rtol=2e-5)


@requires_triton
def test_page_attention_triton_softcap_and_strided_cache():
    q, k, v, valid = make_inputs(2, 2, 4, 47, 64, torch.float32, pad=6)
    # (B, S, H, D) storage viewed as (B, H, S, D): the kernel must honour the strides.
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    v = v.transpose(1, 2).contiguous().transpose(1, 2)
    ids, count = page_selection("rowdiff", 2, 2, 3)
    out = page_attention_triton(q, k, v, ids, count, valid, 16, 0.125, softcap=2.0, num_splits=2)
    ref = page_attention_naive(q, k, v, ids, count, valid, 16, 0.125, softcap=2.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@requires_triton
def test_page_attention_triton_with_quest_selection():
    """End to end: bounds -> Quest scores (Triton) -> select_pages -> attention (Triton)."""
    q, k, v, valid = make_inputs(2, 2, 4, 90, 64, torch.float32, pad=9)
    mn, mx = page_key_bounds_naive(k, valid, 16)
    scores = quest_page_scores_triton(q, mn, mx)
    torch.testing.assert_close(scores, quest_page_scores_naive(q, mn, mx), atol=1e-4, rtol=1e-5)
    n_pages = mn.shape[2]
    forced = torch.zeros(2, n_pages, dtype=torch.bool, device=DEVICE)
    forced[:, 0] = forced[:, -1] = True
    page_valid = torch.ones(2, n_pages, dtype=torch.bool, device=DEVICE)
    ids, count = select_pages(scores, torch.tensor([3, 2], device=DEVICE), forced, page_valid)
    out = page_attention_triton(q, k, v, ids, count, valid, 16, 0.125, num_splits=2)
    torch.testing.assert_close(out, page_attention_naive(q, k, v, ids, count, valid, 16, 0.125), atol=2e-5, rtol=2e-5)


@requires_triton
@pytest.mark.parametrize("dtype,group,dim,n_pages", [
    (torch.float32, 1, 64, 3), (torch.float32, 4, 128, 70), (torch.float16, 8, 64, 9), (torch.bfloat16, 4, 128, 5),
])
def test_quest_scores_triton_matches_naive(dtype, group, dim, n_pages):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2 * group, dim, generator=g).to(dtype).to(DEVICE)
    a, b = torch.randn(2, 2, 2, n_pages, dim, generator=g).to(DEVICE)
    mn, mx = torch.minimum(a, b), torch.maximum(a, b)
    torch.testing.assert_close(quest_page_scores_triton(q, mn, mx), quest_page_scores_naive(q, mn, mx), atol=2e-4, rtol=1e-5)


@requires_triton
def test_dispatchers_select_backend():
    q, k, v, valid = make_inputs(1, 1, 4, 20, 64, torch.float32)
    ids, count = page_selection("half", 1, 1, 2)
    ref = page_attention_naive(q, k, v, ids, count, valid, 16, 0.1)
    torch.testing.assert_close(page_attention(q, k, v, ids, count, valid, 16, 0.1, backend="torch"), ref, atol=2e-5, rtol=2e-5)
    with use_backend("triton"):
        torch.testing.assert_close(page_attention(q, k, v, ids, count, valid, 16, 0.1), ref, atol=2e-5, rtol=2e-5)
    mn, mx = page_key_bounds_naive(k, valid, 16)
    torch.testing.assert_close(quest_page_scores(q, mn, mx, backend="triton"), quest_page_scores_naive(q, mn, mx))
    if DEVICE == "cpu":  # auto on CPU tensors is the torch gather of the selected pages
        assert torch.equal(page_attention(q, k, v, ids, count, valid, 16, 0.1), page_attention_gather(q, k, v, ids, count, valid, 16, 0.1))
    with pytest.raises(ValueError):
        page_attention(q, k, v, ids, count, valid, 16, 0.1, backend="cuda")


@pytest.mark.parametrize("mode", ["half", "rowdiff", "sinks", "all"])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_page_attention_gather_matches_naive_and_skips_unselected_pages(mode, softcap):
    """The CPU executed path gathers only the selected pages: NaN in every other page changes nothing."""
    q, k, v, valid = (t.cpu() for t in make_inputs(3, 2, 2, 45, 16, torch.float32, pad=5))
    n_pages = -(-45 // 8)
    ids, count = page_selection(mode, 3, 2, n_pages)
    ref = page_attention_naive(q, k, v, ids, count, valid, 8, 0.25, softcap)
    torch.testing.assert_close(page_attention_gather(q, k, v, ids, count, valid, 8, 0.25, softcap), ref, atol=1e-5, rtol=1e-5)
    # Poison the slots of pages that no (row, KV head) selects within the largest count.
    selected = torch.zeros(3, 2, n_pages, dtype=torch.bool)
    largest = int(count.max())
    for b in range(3):
        for h in range(2):
            selected[b, h, ids[b, h, :largest].long()] = True
    slot_selected = selected.repeat_interleave(8, dim=-1)[..., :45].unsqueeze(-1)
    k_bad = torch.where(slot_selected, k, torch.nan)
    v_bad = torch.where(slot_selected, v, torch.nan)
    got = page_attention_gather(q, k_bad, v_bad, ids, count, valid, 8, 0.25, softcap)
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@requires_triton
def test_kernels_are_custom_ops_that_compile_in_one_graph():
    """The dispatchers reach the kernels through torch.ops.sol_hf.*: their schemas and fake
    implementations pass torch.library.opcheck, and a function calling them compiles with
    fullgraph=True (no graph break) to the same result."""
    q, k, v, valid = make_inputs(2, 2, 2, 40, 16, torch.float32)
    ids, count = page_selection("rowdiff", 2, 2, 3)
    args = (q, k, v, ids, count, valid, 16, 0.25, None)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.sol_hf.page_attention.default, args, test_utils=checks)
    mn, mx = page_key_bounds_naive(k, valid, 16)
    torch.library.opcheck(torch.ops.sol_hf.quest_page_scores.default, (q, mn, mx), test_utils=checks)

    def step(q, k, v, ids, count, valid, mn, mx):
        scores = quest_page_scores(q, mn, mx, backend="triton")
        return page_attention(q, k, v, ids, count, valid, 16, 0.25, backend="triton"), scores

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, got_scores = compiled(q, k, v, ids, count, valid, mn, mx)
    want, want_scores = step(q, k, v, ids, count, valid, mn, mx)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_scores, want_scores)
