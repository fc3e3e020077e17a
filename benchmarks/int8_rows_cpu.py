"""What the int8 weight copies cost in time on CPU: every pruned projection of a SmolLM2-shaped
model (30 layers of q/k/v 576x960, o 576x576, gate/up 576x3072, down 1536x576, fp32), one decode
row, every input channel kept, three ways in one process, alternating:

* ``dense``: ``F.linear`` on the fp32 weight (what the base model runs);
* ``fp32_rows``: ``F.embedding_bag`` over all rows of the fp32 transposed copy;
* ``int8_rows``: ``sol_hf.ops.sparse_linear_int8_rows`` over all rows of the int8 copy (fbgemm's
  8-bit embedding bag), a quarter of the bytes.

Every weight is a separate tensor, 30 layers of them (about 400 MB in fp32), so each call reads
from memory, not from cache, as in a decode step. Prints JSON: milliseconds per pass over all
layers (median of ``--repeats``) and the bytes each pass reads, so GB/s.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/int8_rows_cpu.py --output docs/results/int8_rows_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from _run_info import run_info
from sol_hf.ops import quantize_int8
from sol_hf.ops.int8_linear import sparse_linear_int8_rows

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (Din, Dout) of SmolLM2's pruned sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    sites = []
    for _ in range(args.layers):
        for d_in, d_out in SHAPES:
            weight = torch.randn(d_out, d_in, generator=g)
            weight_t = weight.t().contiguous()
            sites.append((weight, weight_t, quantize_int8(weight_t), torch.arange(d_in).view(1, -1), torch.randn(1, d_in, generator=g)))
    variants = {
        "dense": lambda: [F.linear(x, w) for w, _, _, _, x in sites],
        "fp32_rows": lambda: [F.embedding_bag(idx, wt, per_sample_weights=x, mode="sum") for _, wt, _, idx, x in sites],
        "int8_rows": lambda: [sparse_linear_int8_rows(x, q, idx, None) for _, _, q, idx, x in sites],
    }
    read = {
        "dense": sum(w.numel() * 4 for w, *_ in sites),
        "fp32_rows": sum(w.numel() * 4 for w, *_ in sites),
        "int8_rows": sum(q.packed.numel() for _, _, q, _, _ in sites),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for run in variants.values():
            run()
        for _ in range(args.repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1000)
    rows = {}
    for name in variants:
        ms = statistics.median(times[name])
        rows[name] = {"ms": round(ms, 2), "mb_read": round(read[name] / 1e6, 1), "gb_per_s": round(read[name] / ms / 1e6, 2),
                      "time_over_dense": round(ms / statistics.median(times["dense"]), 3)}
    result = run_info("int8_rows_cpu", f"python benchmarks/int8_rows_cpu.py --layers {args.layers} --repeats {args.repeats}"
                      + (f" --threads {args.threads}" if args.threads else ""))
    result["variants"] = rows
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
