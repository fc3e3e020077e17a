"""What a controlled decode step at a dense activation action costs over the base model's step.

SmolLM2-135M-Instruct fp32 on CPU, ``generate`` under a per-axis budget that keeps every input
channel (``{"attention": 0.5}``: at short contexts attention runs dense too, so the step does the
base model's work plus SOL's decision and accounting). Three variants alternate in one process:

* ``base``: the base model's own ``generate``;
* ``one_charge``: the runtime as shipped; where every row keeps every channel, the projections
  run their own forward and the step is charged their bytes once (``StepState.projections_dense``);
* ``per_projection``: the same step with that shortcut switched off, so each projection call goes
  through SOL's path (its plan, its result cache, its byte count), as before 2026-12-02.

Prints JSON: ms per generated token (prompt included, amortized) for each variant, medians of
``--repeats`` alternating rounds. The OpenMP wait policy is read from the environment.

    OMP_WAIT_POLICY=ACTIVE python benchmarks/dense_step_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from _run_info import run_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=41)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from sol_hf import SolConfig, SolForCausalLM
    from sol_hf.assets import smollm2_path
    from sol_hf.runtime.state import HostPlan

    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    model = SolForCausalLM(base, SolConfig())
    ids = torch.randint(3, 1000, (1, args.context), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static")
    shipped = HostPlan.all_channels_kept

    def run(variant: str) -> float:
        HostPlan.all_channels_kept = shipped if variant == "one_charge" else property(lambda self: False)
        start = time.perf_counter()
        if variant == "base":
            base.generate(ids, **kwargs)
        else:
            model.generate(ids, compute_budget={"attention": 0.5}, **kwargs)
        return 1000 * (time.perf_counter() - start) / args.new_tokens

    variants = ("base", "one_charge", "per_projection")
    times: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for variant in variants:  # warm-up
            run(variant)
        for _ in range(args.repeats):
            for variant in variants:
                times[variant].append(run(variant))
    finally:
        HostPlan.all_channels_kept = shipped
    result = run_info("dense_step_overhead", f"python benchmarks/dense_step_overhead.py --context {args.context} "
                      f"--new-tokens {args.new_tokens} --repeats {args.repeats}")
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    result["ms_per_token"] = {v: round(statistics.median(t), 2) for v, t in times.items()}
    result["over_base"] = {v: round(statistics.median(t) / statistics.median(times["base"]), 3) for v, t in times.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
