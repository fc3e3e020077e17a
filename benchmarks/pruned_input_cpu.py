"""CPU time of the masked-dense input selection (``_pruned_input``: each row keeps its own count of
largest-|x| channels) with the counts read on the host (one unsorted top-k per row, or per
distinct count for many rows) against the device-side path (prefixes of one sorted top-k of the
widest count, what a step that must not read sizes on the host runs). Prints JSON.

Rows draw their counts from SmolLM2's activation levels (0.3 / 0.5 / 0.7 / 1.0 of the width):
4 rows is a decode batch under a policy, 2048 a teacher-forced episode batch (8 x 256 positions).
Variants alternate within each repeat; medians.

    python benchmarks/pruned_input_cpu.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from _run_info import run_info

from sol_hf.runtime.projections import _pruned_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[4, 64, 2048])
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 1536])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    results = []
    for rows in args.rows:
        for width in args.widths:
            flat = torch.randn(rows, width, generator=generator)
            levels = torch.tensor([int(0.3 * width), int(0.5 * width), int(0.7 * width), width])
            counts = levels[torch.randint(0, len(levels), (rows,), generator=generator)]
            widest = int(counts.max())
            calls = max(1, 2000 // rows)
            times = {"host": [], "device": []}
            for _ in range(args.repeats):
                for name in times:
                    start = time.perf_counter()
                    for _ in range(calls):
                        _pruned_input(flat, counts, widest, host_sizes=name == "host")
                    times[name].append((time.perf_counter() - start) / calls)
            host, device = (1e6 * statistics.median(times[n]) for n in ("host", "device"))
            results.append({"rows": rows, "width": width, "host_us": round(host, 1), "device_us": round(device, 1),
                             "device_over_host": round(device / host, 2)})
    print(json.dumps({**run_info("pruned_input_cpu", "python " + " ".join(sys.argv)), "results": results}, indent=2))


if __name__ == "__main__":
    main()
