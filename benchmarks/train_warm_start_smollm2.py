"""Train a SmolLM2 policy on a preset's action grid: supervised warm start, then GRPO.

The policy the sweep in docs/results.md ("Fair baselines") scores. By default the default ``SolConfig``
grid (attention keep 0.1/0.25/0.5/1, activation keep 0.3/0.5/0.7/1 on every projection input, 16
bits; ``--preset int8-weights`` adds 8-bit weight copies),
unified cost budgets in [0.5, 0.9], the rest of ``sol_hf.recipe.RECIPE`` except the number of
updates: ``--warm-start-updates`` imitation updates of the hindsight placement of the best static
mixture (``sol_hf.training.warm_start``), then ``--steps`` GRPO updates. Training text only
(library / howto / whatsnew); the evaluation sections are never read. Prints the artifact path.

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/train_warm_start_smollm2.py --output outputs/ws-policy
"""

from __future__ import annotations

import argparse
import time

import torch

from sol_hf.config import PRESETS, SolConfig
from sol_hf.training import train_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/ws-policy", help="policy artifact folder")
    parser.add_argument("--warm-start-updates", type=int, default=12, help="supervised warm-start updates (0: GRPO only)")
    parser.add_argument("--steps", type=int, default=20, help="GRPO updates after the warm start")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9],
                        help="budgets of the warm start's best static mixtures")
    parser.add_argument("--max-windows", type=int, default=400, help="cap on training windows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="the action grid: SolConfig.from_preset(...)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = SolConfig.from_preset(args.preset)
    grid = {"attention_keep": preset.attention_keep, "activation_keep": preset.activation_keep, "bits": preset.bits,
            "sparse_inputs": preset.sparse_inputs, "quantize": preset.quantize}
    started = time.time()
    out = train_policy(None, args.output, grid=grid, cost_budget_range=(min(args.budgets), max(args.budgets)),
                       steps=args.steps, warm_start_updates=args.warm_start_updates, warm_start_budgets=tuple(args.budgets),
                       warm_start_search_windows=12, max_windows=args.max_windows, seed=args.seed, progress=True)
    print(f"policy: {out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
