"""Measure, on this machine and the wrapped model's own weights, what the sparse projection op
costs per byte against the dense projection (the CPU ``sparse_linear_read_factor``).

The runtime runs a pruned projection with the kept-row op only where ``kept rows x factor <
all rows``; elsewhere the dense projection runs on the pruned input and is charged in full. The
shipped factors are one machine's figures, and the ratio moves with the CPU, its memory and its
load (on this project's 2-core machine it measured 1.0-1.1 one day and 1.6-1.8 another). With a
stale factor a budget can run the sparse op where it is slower than the dense projection, and
decode more slowly than the base model. :func:`measure_sparse_read_factor` times, alternating in
one process, one decode row through every pruned projection of every layer: the dense
projections, then the kept-row op at each activation keep level of the grid (random channel
sets, as many as the level keeps). The weights are the model's own, layer after layer, so they
stream from memory as in a decode step.

The factor only decides the path (kept rows x factor < all rows: the kept-row op; the bytes
charged are what the chosen path reads), so it is taken where that decision flips: at the
break-even fraction of the weight bytes where the kept-row op would take as long as the dense
projections, found on the line through the two measured levels around it (past the last level
when every level measured faster, the last two; none faster: the largest time-per-byte ratio).
``factor = 1 / break-even fraction``, the op's time-per-byte ratio there, so the op runs exactly
at the measured levels where it was faster. (The largest ratio over the levels, used before,
mostly reflects the op's fixed per-call cost at the lowest keep and kept it off keeps where it
measured faster, e.g. SmolLM2's 0.7.) At least 1.0.
"""

from __future__ import annotations

import statistics
import time

import torch

from .. import ops
from ..actions import kept_count

__all__ = ["measure_sparse_read_factor", "break_even_factor"]


@torch.inference_mode()
def measure_sparse_read_factor(groups: list, keeps: tuple[float, ...], repeats: int = 5, seed: int = 0) -> dict:
    """Time the dense projections against the kept-row op over ``groups`` (every layer's
    ``_PrunedProjections``), one row, at each keep of ``keeps`` below 1.0.

    Returns a dict: ``factor`` (one over the break-even byte fraction, see the module docstring;
    at least 1.0), ``dense_ms`` (one pass over every group), and per level ``levels[keep] =
    {"ms", "time_ratio", "byte_fraction", "factor"}`` (the level's own time-per-byte ratio).
    Medians of ``repeats`` alternating rounds.
    """
    keeps = tuple(k for k in keeps if k < 1.0)
    if not groups or not keeps:
        raise ValueError("nothing to calibrate: the model has no pruned projections or no activation keep below 1.0")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    generator = torch.Generator().manual_seed(seed)
    device = groups[0].weight_t.device
    inputs = [torch.randn(1, g.width, generator=generator).to(device=device, dtype=g.weight_t.dtype) for g in groups]
    full_bytes = sum(g.width * g.row_bytes for g in groups)
    channels, fractions = {}, {}
    for keep in keeps:
        counts = [kept_count(keep, g.width) for g in groups]
        channels[keep] = [torch.randperm(g.width, generator=generator)[:c].view(1, c).to(device) for g, c in zip(groups, counts)]
        fractions[keep] = sum(c * g.row_bytes for g, c in zip(groups, counts)) / full_bytes

    def dense() -> None:
        for group, x in zip(groups, inputs):
            for forward in group.originals:
                forward(x)

    def sparse(keep: float) -> None:
        for group, x, idx in zip(groups, inputs, channels[keep]):
            ops.sparse_linear(x, group.weight_t, idx, None, group.bias)

    variants = {"dense": dense, **{keep: (lambda k=keep: sparse(k)) for keep in keeps}}
    times: dict = {name: [] for name in variants}
    for name, run in variants.items():  # warm-up: allocator, thread pool, offsets caches
        run()
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    dense_s = statistics.median(times["dense"])
    levels = {}
    for keep in keeps:
        ratio = statistics.median(times[keep]) / dense_s
        levels[keep] = {"ms": round(1000 * statistics.median(times[keep]), 3), "time_ratio": round(ratio, 4),
                        "byte_fraction": round(fractions[keep], 4), "factor": round(ratio / fractions[keep], 4)}
    factor = break_even_factor([(level["byte_fraction"], level["time_ratio"]) for level in levels.values()])
    return {"factor": round(factor, 4), "dense_ms": round(1000 * dense_s, 3), "levels": levels, "repeats": repeats}


def break_even_factor(points: list[tuple[float, float]]) -> float:
    """``1 / b*`` for the byte fraction ``b*`` where the kept-row op's time ratio to the dense
    projections reaches 1.0, from measured ``(byte fraction, time ratio)`` points: on the line
    through the first point at or above 1.0 and the point before it; every point below 1.0:
    through the last two (one point: through the origin); the lowest point already at or above
    1.0: the largest ``ratio / fraction`` (so that no measured level runs the op). At least 1.0."""
    points = sorted(points)
    slower = [i for i, (_, ratio) in enumerate(points) if ratio >= 1.0]
    if slower and slower[0] == 0:
        return max(1.0, max(ratio / fraction for fraction, ratio in points))
    if slower:
        (b0, r0), (b1, r1) = points[slower[0] - 1], points[slower[0]]
    elif len(points) >= 2:
        (b0, r0), (b1, r1) = points[-2], points[-1]
    else:
        (b0, r0), (b1, r1) = (0.0, 0.0), points[0]
    slope = (r1 - r0) / (b1 - b0)
    if slope <= 0:  # flat or falling (noise) past the last faster level: every keep below 1.0 pays
        return 1.0
    return max(1.0, 1.0 / (b0 + (1.0 - r0) / slope))
