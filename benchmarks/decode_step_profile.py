"""Where a controlled decode step's time goes: torch profiler, per op, dense action against a sparse one.

SmolLM2-135M-Instruct fp32 after a ``--context``-token prompt; ``--steps`` single-token decode
steps (``forward(actions=...)`` on a copy of the prompt's cache, the copy made outside the
profiled region) at the dense action and at attention dense / activation keep ``--keep``. Prints
JSON: per action, the profiler's self CPU milliseconds per step of the ``--top`` costliest ops,
their call counts per step, and the total. The profiler adds its own overhead to every op call, so
read the shares, not the totals, as the step's make-up.

    python benchmarks/decode_step_profile.py --context 512 --steps 5 --keep 0.3
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch.profiler import ProfilerActivity, profile

from _run_info import run_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--keep", type=float, default=0.3, help="activation keep of the sparse action (a grid level)")
    parser.add_argument("--bits", type=int, default=16, help="bit-width of the sparse action (8 with --preset int8-weights)")
    parser.add_argument("--preset", default="default", help="SolConfig.from_preset(...)")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from sol_hf import SolConfig, SolForCausalLM
    from sol_hf.assets import smollm2_path

    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    model = SolForCausalLM(base, SolConfig.from_preset(args.preset))
    ids = torch.randint(3, 1000, (1, args.context + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefix = model(ids[:, : args.context], use_cache=True)
    actions = {"dense": model.space.dense_index,
               f"activation_keep_{args.keep:g}_bits_{args.bits}": model.space.index_of(1.0, args.keep, args.bits)}
    result = run_info("decode_step_profile", f"python benchmarks/decode_step_profile.py --context {args.context} "
                      f"--steps {args.steps} --keep {args.keep:g} --bits {args.bits} --preset {args.preset} --top {args.top}")
    result["actions"] = {}
    for name, action in actions.items():
        caches = [copy.deepcopy(prefix.cache) for _ in range(args.steps + 1)]
        with torch.no_grad():
            model(ids[:, args.context :], cache=caches.pop(), actions=torch.tensor([[action]]))  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for cache in caches:
                    out = model(ids[:, args.context :], cache=cache, actions=torch.tensor([[action]]))
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / args.steps
        result["actions"][name] = {
            "step_cost": round(float(out.step_cost), 4),
            "profiled_ms_per_step": round(total_ms, 2),
            "ops": [
                {"op": e.key, "ms_per_step": round(e.self_cpu_time_total / 1e3 / args.steps, 2),
                 "calls_per_step": e.count / args.steps}
                for e in events[: args.top]
            ],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
