"""Measure, on this machine and the wrapped model's own weights, what the sparse projection op
costs per byte against the dense projection (the CPU ``sparse_linear_read_factor``).

The runtime runs a pruned projection with the kept-row op only where ``kept rows x factor <
all rows``; elsewhere the dense projection runs on the pruned input and is charged in full. The
shipped factors are one machine's figures, and the ratio moves with the CPU, its memory and its
load (on this project's 2-core machine it measured 1.0-1.1 one day and 1.6-1.8 another). With a
stale factor a budget can run the sparse op where it is slower than the dense projection, and
decode more slowly than the base model. :func:`measure_sparse_read_factor` measures on the
model's own weights, alternating in one process: one row through every pruned site's dense
projections (the base model's forward, layer after layer, so the weights stream from memory as
in a decode step), and decode steps at the dense action and at each activation keep level of
the grid. A level's step minus the dense step is what pruning changed in the step, so the pruned
sites' time is the dense projections' plus that difference.

Decode steps, not the op alone, because the choice that matters is against the dense action,
which selects nothing and runs each projection straight: a level pays only if its channel
selection, its kept-row op and each site's per-call work together take less than the dense
projections. Between the memory-bound projections of a real step those small ops cost two to
three times what they cost in isolation (a top-k over SmolLM2's 576 channels: 13-15 us per call in
a step under ``benchmarks/decode_step_profile.py``'s profiler, 4-8 us in an ad-hoc timing alone). Timing the op alone put SmolLM2's break-even near keep 0.63, keep 0.5 ran
the op (0.8 of the dense projections' time alone), a step at keep 0.5 took longer than a dense
one, and budgets 0.8-0.6 decoded more slowly than the base model (2026-12-02).

The factor only decides the path (kept rows x factor < all rows: the kept-row op; the bytes
charged are what the chosen path reads), so it is taken where that decision flips: at the
fraction of the weight bytes where the pruned sites would take ``PAYS_BELOW`` (0.9) of the dense
projections' time, found on the line through the two measured levels around it (past the last level
when every level measured faster, the last two; none faster: the largest time-per-byte ratio).
``factor = 1 / that fraction``, so the op runs exactly at the measured levels where the pruned
sites were at least 10 % faster. At least 1.0.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..actions import kept_count

__all__ = ["measure_sparse_read_factor", "break_even_factor", "PAYS_BELOW"]

# A keep runs the kept-row op where its pruned sites take at most this share of the dense
# projections' time. A smaller gain is lost to what the calibration does not see (a controlled
# generate step's decision and accounting, about 1 ms of SmolLM2's 40 ms step) and to its
# run-to-run spread: SmolLM2's keep 0.5 measured 0.96-1.05 of the dense time on 2026-12-02 and ran
# the op in some runs, where budgets 0.8-0.6 then decoded 6-8 % more slowly than the base model.
PAYS_BELOW = 0.9


@torch.inference_mode()
def measure_sparse_read_factor(model, repeats: int = 5, steps: int = 4, prompt_length: int = 16, seed: int = 0) -> dict:
    """Measure, on ``model`` (a CPU :class:`~sol_hf.SolForCausalLM`), what a decode step's pruned
    sites cost against its dense projections, at each activation keep level below 1.0.

    Two measurements, alternating in one process:

    * ``dense_ms``: one row through every pruned site's own projections (the base model's
      forward), layer after layer: the projections' share of a dense step;
    * decode steps of one row (random tokens) after a random ``prompt_length``-token prompt,
      ``steps`` at a time: the dense action, and every keep level on the kept-row path (the
      factor is held at 1.0 meanwhile, so each level runs it). A level's step minus the dense step is what pruning
      changed, the top-k selection and each site's per-call work included, so its projections
      took ``dense_ms + (level step - dense step)``.

    Returns a dict: ``key`` (the ``sparse_linear_read_factor`` entry it measures,
    ``"<device>:<weight dtype>"``), ``factor`` (one over the break-even byte fraction, see the
    module docstring; at least 1.0), ``dense_ms``, ``dense_step_ms``, and per level ``levels[keep] = {"ms",
    "step_ms", "time_ratio", "byte_fraction", "factor"}`` (``ms``: the pruned sites' time per
    step; ``factor``: the level's own time-per-byte ratio). Medians of ``repeats`` rounds.
    """
    groups = [group for executor in model._layer_executors for group in executor.groups]
    keeps = tuple(k for k in model.space.activation_keep if k < 1.0)
    if not groups or not keeps:
        raise ValueError("nothing to calibrate: the model has no pruned projections or no activation keep below 1.0")
    if repeats < 1 or steps < 1:
        raise ValueError(f"repeats and steps must be at least 1, got repeats={repeats}, steps={steps}")
    generator = torch.Generator().manual_seed(seed)
    device = model.device
    inputs = [torch.randn(1, g.width, generator=generator).to(device=device, dtype=g.weight_t.dtype) for g in groups]
    full_bytes = sum(g.width * g.row_bytes for g in groups)
    fractions = {keep: sum(kept_count(keep, g.width) * g.row_bytes for g in groups) / full_bytes for keep in keeps}
    bits = max(model.space.bits)
    actions = {"dense": model.space.dense_index, **{keep: model.space.index_of(1.0, keep, bits) for keep in keeps}}
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(3, vocab, (1, prompt_length), generator=generator).to(device)
    cache = model(prompt, use_cache=True).cache
    # A new random token every step: a step reading the kept rows of the same channels as the
    # step before finds many of them in the CPU's cache, which a decode does not.
    stream = iter(torch.randint(3, vocab, ((repeats + 1) * (len(actions) + 1) * steps, 1, 1),
                                generator=generator).to(device))

    def dense_projections() -> None:
        for group, x in zip(groups, inputs):
            for forward in group.originals:
                forward(x)

    def decode(action: int) -> None:
        chosen = torch.tensor([[action]], device=device)
        for _ in range(steps):
            model(next(stream), actions=chosen, cache=cache, use_cache=True)

    variants = {"projections": dense_projections, **{name: (lambda a=action: decode(a)) for name, action in actions.items()}}
    times: dict = {name: [] for name in variants}
    factors = model.sparse_linear_read_factor
    key = f"{device.type}:{model.cost_model.bytes.weight_dtype}"
    before = factors.get(key)
    factors[key] = 1.0  # every level below 1.0 runs the kept-row op on one row
    try:
        for name, run in variants.items():  # warm-up: allocator, thread pool, offsets caches
            run()
        for _ in range(repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    finally:
        if before is None:
            factors.pop(key, None)
        else:
            factors[key] = before
    dense_s = statistics.median(times["projections"])
    dense_step_s = statistics.median(times["dense"]) / steps
    levels = {}
    for keep in keeps:
        step_s = statistics.median(times[keep]) / steps
        pruned_s = max(dense_s + step_s - dense_step_s, 0.0)
        ratio = pruned_s / dense_s
        levels[keep] = {"ms": round(1000 * pruned_s, 3), "step_ms": round(1000 * step_s, 3), "time_ratio": round(ratio, 4),
                        "byte_fraction": round(fractions[keep], 4), "factor": round(ratio / fractions[keep], 4)}
    factor = break_even_factor([(level["byte_fraction"], level["time_ratio"]) for level in levels.values()], PAYS_BELOW)
    return {"key": key, "factor": round(factor, 4), "dense_ms": round(1000 * dense_s, 3), "dense_step_ms": round(1000 * dense_step_s, 3),
            "levels": levels, "repeats": repeats, "steps": steps}


def break_even_factor(points: list[tuple[float, float]], pays_below: float = 1.0) -> float:
    """``1 / b*`` for the byte fraction ``b*`` where the pruned sites' time ratio to the dense
    projections reaches ``pays_below``, from measured ``(byte fraction, time ratio)`` points: on
    the line through the first point at or above it and the point before; every point below it:
    through the last two (one point: through the origin); the lowest point already at or above
    it: the largest ``ratio / (fraction * pays_below)`` (so that no measured level runs the op).
    At least 1.0."""
    points = sorted(points)
    slower = [i for i, (_, ratio) in enumerate(points) if ratio >= pays_below]
    if slower and slower[0] == 0:
        return max(1.0, max(ratio / (fraction * pays_below) for fraction, ratio in points))
    if slower:
        (b0, r0), (b1, r1) = points[slower[0] - 1], points[slower[0]]
    elif len(points) >= 2:
        (b0, r0), (b1, r1) = points[-2], points[-1]
    else:
        (b0, r0), (b1, r1) = (0.0, 0.0), points[0]
    slope = (r1 - r0) / (b1 - b0)
    if slope <= 0:  # flat or falling (noise) past the last faster level: every keep below 1.0 pays
        return 1.0
    return max(1.0, 1.0 / (b0 + (pays_below - r0) / slope))
