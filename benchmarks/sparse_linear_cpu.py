"""CPU time of the kept-row op (``sparse_linear_rows``: ``embedding_bag`` over the kept weight rows)
against the dense ``F.linear`` it replaces, one decode row, per projection site of a model shape,
at several keeps, with each way of sharing a row's work among the threads. Prints JSON.

The weights stream from memory as in a decode step: every site has ``--layers`` distinct copies
(as many as the model has layers), one timed pass runs the op once on each, and a large buffer is
written before every timed pass to evict the caches. Variants alternate within each repeat;
medians. ``read_factor`` = (sparse time / dense time) / keep, the figure
``SPARSE_LINEAR_READ_FACTOR`` stands for (1.0: the op reads kept bytes as fast as ``F.linear``
reads all of them). The dense baseline is one fused ``F.linear`` per site (q/k/v and gate/up
fused as sol_hf reads them), a stronger one than the model's separate projections.

Ways to share out one row's work (``MODES``): ``one_bag`` (no split: one bag, one thread);
``op`` (what the op does under this process's OpenMP wait policy: runs of at most 2 MiB, at least
two per thread, for rows reading at least 1.5 MiB with ``OMP_WAIT_POLICY=PASSIVE``, 64 KiB
otherwise); ``split_from_1.5mib`` / ``split_from_64kib`` (the op with either threshold);
``one_run_per_thread`` and ``two_runs_per_thread`` (the op without the 2 MiB cap);
``runs_of_1mib``; ``column_per_thread`` (the row's output split into one column block per thread
for rows of 1.5 MiB or more, each a bag over a (Din * parts, Dout / parts) view of W_t: what the op
did before 2026-12-02, kept here as :func:`column_split_rows`). Column blocks narrow enough that a
bag's float accumulator stays in the L1 cache (4096 columns), in place or copied block by block,
were tried too and changed nothing (1B shape, bf16, gate/up). Run it with both wait policies:
``OMP_WAIT_POLICY=PASSIVE python ...`` and ``OMP_WAIT_POLICY=ACTIVE python ...``.

    python benchmarks/sparse_linear_cpu.py --shape llama-1b --dtype bfloat16 --keeps 0.3 0.5 0.7
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from _run_info import run_info

# the module, not the function sol_hf.ops exports under the same name
sparse_module = importlib.import_module("sol_hf.ops.sparse_linear")

# (hidden, intermediate, key/value width, layers) of each shape; sites as sol_hf fuses them.
SHAPES = {"smollm2": (576, 1536, 192, 30), "llama-1b": (2048, 8192, 512, 16)}
MODES = ("one_bag", "op", "split_from_1.5mib", "split_from_64kib", "one_run_per_thread", "two_runs_per_thread", "runs_of_1mib",
         "column_per_thread")


def sites(shape: str) -> dict[str, tuple[int, int]]:
    hidden, inter, kv, _ = SHAPES[shape]
    return {"qkv": (hidden, hidden + 2 * kv), "o": (hidden, hidden), "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}


def column_split_rows(x: torch.Tensor, weight_t: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """(1, Dout): the former CPU op for one row keeping all of ``channels`` (1, K): the output split
    into one column block per thread, each a bag over the same channels of a (Din * parts,
    Dout / parts) view of W_t."""
    d_in, d_out = weight_t.shape
    n_idx = channels.shape[1]
    parts = 1
    if n_idx * d_out * weight_t.element_size() >= 1.5 * 2**20:
        parts = torch.get_num_threads()
        while parts > 1 and d_out % parts:
            parts -= 1
    weights = torch.gather(x, 1, channels)
    rows = (channels.unsqueeze(1) * parts + torch.arange(parts).view(1, parts, 1)).reshape(-1)
    offsets = torch.arange(0, parts * n_idx, n_idx)
    out = F.embedding_bag(rows, weight_t.view(d_in * parts, d_out // parts), offsets, mode="sum",
                          per_sample_weights=weights.expand(parts, -1).reshape(-1))
    return out.view(1, d_out)


def run_mode(mode: str, x: torch.Tensor, transposed: list[torch.Tensor], channels: torch.Tensor):
    """One pass of the kept-row op over every copy in ``transposed``, shared out as ``mode`` says."""
    settings = {"one_bag": {"_SPLIT_FROM_BYTES": float("inf")}, "op": {},
                "split_from_1.5mib": {"_SPLIT_FROM_BYTES": 1.5 * 2**20}, "split_from_64kib": {"_SPLIT_FROM_BYTES": 64 * 2**10},
                "one_run_per_thread": {"_BAGS_PER_THREAD": 1, "_RUN_BYTES": float("inf")},
                "two_runs_per_thread": {"_BAGS_PER_THREAD": 2, "_RUN_BYTES": float("inf")},
                "runs_of_1mib": {"_RUN_BYTES": 2**20}}

    def run():
        if mode == "column_per_thread":
            for w in transposed:
                column_split_rows(x, w, channels)
            return
        saved = {name: getattr(sparse_module, name) for name in settings[mode]}
        for name, value in settings[mode].items():
            setattr(sparse_module, name, value)
        try:
            for w in transposed:
                sparse_module.sparse_linear_rows(x, w, channels, None)
        finally:
            for name, value in saved.items():
                setattr(sparse_module, name, value)
    return run


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=None, help="copies of each site's weight (default: the shape's layers)")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--flush-mib", type=int, default=512, help="buffer written before each timed run to evict the caches")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    layers = args.layers or SHAPES[args.shape][3]
    generator = torch.Generator().manual_seed(0)
    variants, meta = {}, {}
    for site, (d_in, d_out) in sites(args.shape).items():
        weights = [(torch.randn(d_out, d_in, generator=generator) * 0.02).to(dtype) for _ in range(layers)]
        transposed = [w.t().contiguous() for w in weights]
        x = torch.randn(1, d_in, generator=generator).to(dtype)
        variants[(site, "dense", 1.0)] = lambda x=x, weights=weights: [F.linear(x, w) for w in weights]
        for keep in args.keeps:
            channels = torch.topk(x.float().abs(), max(1, int(keep * d_in)), sorted=False).indices
            meta[(site, keep)] = channels.shape[1] * d_out * x.element_size()
            for mode in args.modes:
                variants[(site, mode, keep)] = run_mode(mode, x, transposed, channels)
    times = {name: [] for name in variants}
    # Written before every timed run so that no variant finds the weights a previous one read in the
    # last-level cache (in a decode step the whole model streams through between two reads of a layer).
    flush = torch.empty(args.flush_mib * 2**18, dtype=torch.float32)
    for run in variants.values():  # warm-up
        run()
    for _ in range(args.repeats):
        for name, run in variants.items():
            flush.fill_(1.0)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    results = []
    for site in sites(args.shape):
        dense = statistics.median(times[(site, "dense", 1.0)])
        for (s, mode, keep), values in times.items():
            if s != site or mode == "dense":
                continue
            ratio = statistics.median(values) / dense
            results.append({"site": site, "mode": mode, "keep": keep, "bytes_per_call": meta[(site, keep)],
                            "dense_ms": round(1000 * dense, 3), "sparse_ms": round(1000 * statistics.median(values), 3),
                            "time_ratio": round(ratio, 3), "read_factor": round(ratio / keep, 3)})
    totals = {}
    dense_all = sum(statistics.median(times[(site, "dense", 1.0)]) for site in sites(args.shape))
    for keep in args.keeps:
        totals[keep] = {}
        for mode in args.modes:
            sparse_all = sum(statistics.median(times[(site, mode, keep)]) for site in sites(args.shape))
            totals[keep][mode] = round(sparse_all / dense_all / keep, 3)
    header = run_info("sparse_linear_cpu", "python " + " ".join(sys.argv))
    header["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(json.dumps({**header, "shape": args.shape, "dtype": args.dtype, "layers": layers,
                      "read_factor_all_sites": totals, "results": results}, indent=2))


if __name__ == "__main__":
    main()
