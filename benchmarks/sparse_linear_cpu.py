"""CPU time of the sparse MLP op (``sparse_linear_rows``: embedding_bag over the kept weight rows)
against the dense ``F.linear`` it replaces, one row, at several keep fractions. Prints JSON.

This is what ``SPARSE_LINEAR_READ_FACTOR["cpu"]`` in ``sol_hf/runtime/mlp.py`` is set from: the
sparse op's time per byte over the dense op's.

    python benchmarks/sparse_linear_cpu.py --din 2048 --dout 16384 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from sol_hf.ops import sparse_linear_rows


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--din", type=int, default=2048)
    parser.add_argument("--dout", type=int, default=16384)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.4, 0.6, 0.8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        weight = torch.randn(args.dout, args.din).to(dtype)
        weight_t = weight.t().contiguous()
        x = torch.randn(1, args.din).to(dtype)
        dense = median_ms(lambda: F.linear(x, weight), args.repeats)
        for keep in args.keeps:
            channels = torch.topk(x.float().abs(), int(keep * args.din)).indices
            sparse = median_ms(lambda: sparse_linear_rows(x, weight_t, channels, None), args.repeats)
            rows.append({"dtype": name, "keep": keep, "dense_ms": round(dense, 3), "sparse_ms": round(sparse, 3),
                         "time_ratio": round(sparse / dense, 3), "read_factor": round(sparse / dense / keep, 3)})
    print(json.dumps({"benchmark": "sparse_linear_cpu", "din": args.din, "dout": args.dout,
                      "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                      "load_average": os.getloadavg(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
