"""GPU micro-benchmark of the action kernels against their dense torch counterparts.

Llama-3.1-8B decode shapes (batch 1): 32 query heads, 8 KV heads, head dim 128, hidden 4096,
intermediate 14336; contexts 8k and 32k; keeps 0.5 / 0.25 / 0.1. Prints one JSON document:
each op's median time (``triton.testing.do_bench``), the dense counterpart's, the speed-up, the
bytes the kernel must read and the achieved bandwidth as a fraction of the measured device copy
bandwidth. Every kernel is checked against its torch reference at the benchmarked shape first.

    python benchmarks/ops.py > ops.json            # needs a CUDA GPU and triton
    python benchmarks/ops.py --quick               # fewer shapes

The timings are of single kernels in a loop (no CUDA graph): launch overhead is included, which
matters at batch 1 (a few microseconds per launch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def fail(message: str) -> None:
    print(f"benchmarks/ops.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def bench(fn) -> float:
    """Median milliseconds of ``fn`` (CUDA events inside triton's do_bench; L2 flushed between)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def row(op, shape, keep, ms, dense_ms, bytes_read, copy_bw, **extra):
    achieved = bytes_read / (ms * 1e-3)
    return {
        "op": op, **shape, "keep": keep, "ms": round(ms, 5), "dense_ms": round(dense_ms, 5),
        "speedup_vs_dense": round(dense_ms / ms, 3), "bytes_read": int(bytes_read),
        "achieved_GBps": round(achieved / 1e9, 1), "fraction_of_copy_bw": round(achieved / copy_bw, 3), **extra,
    }


def bench_page_attention(device, dtype, contexts, keeps, copy_bw):
    from sol_hf.ops.page_attention import (
        page_attention_naive, page_attention_triton, page_key_bounds_naive, quest_page_scores_naive,
        quest_page_scores_triton, select_pages,
    )

    q_heads, kv_heads, dim, page_size = 32, 8, 128, 16
    scaling = 1.0 / math.sqrt(dim)
    out = []
    for ctx in contexts:
        q = torch.randn(1, q_heads, dim, device=device, dtype=dtype)
        k = torch.randn(1, kv_heads, ctx, dim, device=device, dtype=dtype)
        v = torch.randn(1, kv_heads, ctx, dim, device=device, dtype=dtype)
        valid = torch.ones(1, ctx, dtype=torch.bool, device=device)
        q4 = q.unsqueeze(2)
        dense_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k, v, scale=scaling, enable_gqa=True))
        n_pages = ctx // page_size
        page_min, page_max = page_key_bounds_naive(k, valid, page_size)
        page_min, page_max = page_min.to(dtype), page_max.to(dtype)
        forced = torch.zeros(1, n_pages, dtype=torch.bool, device=device)
        forced[:, 0] = forced[:, -1] = True
        page_valid = torch.ones(1, n_pages, dtype=torch.bool, device=device)
        scores = quest_page_scores_triton(q, page_min, page_max)
        err = (scores - quest_page_scores_naive(q, page_min, page_max)).abs().max().item()
        score_ms = bench(lambda: quest_page_scores_triton(q, page_min, page_max))
        score_naive_ms = bench(lambda: quest_page_scores_naive(q, page_min, page_max))
        out.append(row("quest_page_scores_triton", {"context": ctx}, 1.0, score_ms, dense_ms,
                       2 * page_min.numel() * page_min.element_size(), copy_bw,
                       naive_ms=round(score_naive_ms, 5), max_abs_err_vs_naive=err))
        for keep in keeps:
            pages_to_keep = torch.tensor([max(1, round(keep * n_pages))], device=device)
            page_ids, page_count = select_pages(scores, pages_to_keep, forced, page_valid)
            select_ms = bench(lambda: select_pages(quest_page_scores_triton(q, page_min, page_max), pages_to_keep, forced, page_valid))
            args = (q, k, v, page_ids, page_count, valid, page_size, scaling)
            got = page_attention_triton(*args)
            err = (got.float() - page_attention_naive(*args).float()).abs().max().item()
            ms = bench(lambda: page_attention_triton(*args))
            naive_ms = bench(lambda: page_attention_naive(*args))
            kept_slots = int(pages_to_keep.item()) * page_size
            bytes_read = 2 * kv_heads * kept_slots * dim * k.element_size()
            out.append(row("page_attention_triton", {"context": ctx, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": dim,
                                                     "page_size": page_size}, keep, ms, dense_ms, bytes_read, copy_bw,
                           naive_ms=round(naive_ms, 5), score_and_select_ms=round(select_ms, 5),
                           speedup_incl_selection=round(dense_ms / (ms + select_ms), 3), max_abs_err_vs_naive=err))
    return out


def bench_sparse_linear(device, dtype, keeps, copy_bw, rows=(1,)):
    from sol_hf.ops.sparse_linear import prepare_sparse_weight, sparse_linear_naive, sparse_linear_triton, topk_channels

    out = []
    for name, d_in, d_out in (("gate_up_proj", 4096, 14336), ("down_proj", 14336, 4096)):
        weight = torch.randn(d_out, d_in, device=device, dtype=dtype) / math.sqrt(d_in)
        weight_t = prepare_sparse_weight(weight)
        for n_rows in rows:
            x = torch.randn(n_rows, d_in, device=device, dtype=dtype)
            dense_ms = bench(lambda: torch.nn.functional.linear(x, weight))
            idx = topk_channels(x)
            topk_ms = bench(lambda: topk_channels(x))
            for keep in keeps:
                count = torch.full((n_rows,), int(keep * d_in), device=device)
                args = (x, weight_t, idx, count)
                err = (sparse_linear_triton(*args).float() - sparse_linear_naive(*args).float()).abs().max().item()
                ms = bench(lambda: sparse_linear_triton(*args))
                naive_ms = bench(lambda: sparse_linear_naive(*args))
                bytes_read = n_rows * int(keep * d_in) * d_out * weight.element_size()
                out.append(row("sparse_linear_triton", {"layer": name, "rows": n_rows, "d_in": d_in, "d_out": d_out},
                               keep, ms, dense_ms, bytes_read, copy_bw, naive_ms=round(naive_ms, 5),
                               topk_sort_ms=round(topk_ms, 5), max_abs_err_vs_naive=err))
    return out


def bench_fake_quantize(device, dtype, copy_bw):
    from sol_hf.ops.act_quant import fake_quantize_naive, fake_quantize_triton

    out = []
    for d_in, d_out in ((4096, 14336), (14336, 4096)):
        x = torch.randn(1, d_in, device=device, dtype=dtype)
        weight = torch.randn(d_out, d_in, device=device, dtype=dtype)
        gemv_ms = bench(lambda: torch.nn.functional.linear(x, weight))
        for bits in (4, 8):
            b = torch.tensor([bits], device=device)
            exact = torch.equal(fake_quantize_triton(x, b), fake_quantize_naive(x, b))
            ms = bench(lambda: fake_quantize_triton(x, b))
            naive_ms = bench(lambda: fake_quantize_naive(x, b))
            r = row("fake_quantize_triton", {"d_in": d_in, "bits": bits}, 1.0, ms, gemv_ms,
                    2 * x.numel() * x.element_size(), copy_bw, naive_ms=round(naive_ms, 5), bit_identical_to_naive=exact)
            r["fraction_of_fed_gemv"] = round(ms / gemv_ms, 3)  # target: < 0.10
            out.append(r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="one context (8k) and keep 0.25 only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        fail("no CUDA GPU is available; this benchmark measures GPU kernels and has no CPU mode "
             "(the kernels are verified on CPU by the tests under TRITON_INTERPRET=1).")
    try:
        import triton
    except ImportError:
        fail("triton is not installed; pip install triton")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    contexts = (8192,) if args.quick else (8192, 32768)
    keeps = (0.25,) if args.quick else (1.0, 0.5, 0.25, 0.1)
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(device)
    results = (
        bench_page_attention(device, dtype, contexts, keeps, copy_bw)
        + bench_sparse_linear(device, dtype, keeps, copy_bw, rows=(1,) if args.quick else (1, 8))
        + bench_fake_quantize(device, dtype, copy_bw)
    )
    report = {
        "device": torch.cuda.get_device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
        "copy_bandwidth_GBps": round(copy_bw / 1e9, 1),
        "results": results,
    }
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
