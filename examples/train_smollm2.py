"""Train a SOL policy for SmolLM2-135M on Python documentation (library, howto, whatsnew), on CPU.

    python examples/train_smollm2.py --output outputs/smollm2-policy --threads 1

Every default is ``sol_hf.recipe.RECIPE``, the recipe of the documented result (docs/results.md):
the CPU-scaled setting of the issue's reference run (context 256, 4 windows x 8 schedules x 16
controlled steps per update, the 3x3x3 grid: attention keep {0.1, 0.6, 1.0}, MLP keep
{0.4, 0.8, 1.0}, bits {5, 7, 16}, 130 updates) with the choices our validation favoured
(unified-cost budgets, a factorized action head, lr 5e-4, entropy bonus 0.01, budget guard 0.25,
the evaluator's). ``sol-hf train`` has the same defaults. Every 10th training document is held out
as validation (``<output>-run/validation_windows.safetensors``); the evaluation sections
(tutorial, faq, reference) are never read here.

Threads: like ``sol-hf``, this script sets ``OMP_WAIT_POLICY=PASSIVE`` unless you set it, so
waiting OpenMP threads sleep instead of spinning. On a shared 2-core machine ``--threads 1`` is
still the safe choice: the controlled decode steps are many small ops, and two spinning threads
competing with other processes measured 8 s per update with 1 thread vs 60 s with 2 under a load
average of 5-8 (before the wait policy was set).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: OpenMP reads it once

from sol_hf.cli import train_kwargs  # noqa: E402  (light: no torch; the options -> train_policy's arguments)
from sol_hf.recipe import RECIPE  # noqa: E402


def cost_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two numbers), got {text!r}") from None
    return low, high


def build_parser() -> argparse.ArgumentParser:
    r = RECIPE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="base model path or id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--output", default="outputs/smollm2-policy", help="policy artifact folder")
    parser.add_argument("--steps", type=int, default=r["steps"], help="policy updates")
    parser.add_argument("--seed", type=int, default=r["seed"])
    parser.add_argument("--budget-mode", default=r["budget_mode"], choices=("per_axis", "cost", "mixed"))
    parser.add_argument("--cost-budget-range", type=cost_range, default=r["cost_budget_range"],
                        help="LOW,HIGH unified cost targets (default: from the cheapest reachable cost to 1.0)")
    parser.add_argument("--budget-guard", type=float, default=r["budget_guard"], help="guard slack while sampling (negative: off)")
    parser.add_argument("--learning-rate", type=float, default=r["learning_rate"])
    parser.add_argument("--entropy-coef", type=float, default=r["entropy_coef"])
    parser.add_argument("--action-head", default=r["action_head"], choices=("joint", "factorized"),
                        help="one softmax over the grid (the paper) or one per axis (learns axis preferences faster)")
    parser.add_argument("--lm-confidence", action=argparse.BooleanOptionalAction, default=r["observe_lm_confidence"],
                        help="the policy also reads the base model's confidence in the current token (SolConfig.observe_lm_confidence)")
    parser.add_argument("--reward-gamma", type=float, default=r["reward_gamma"], help="discount of the reward-to-go (authors: 0.85)")
    parser.add_argument("--reward-type", default=r["reward_type"], choices=("loglik", "neg_kl"))
    parser.add_argument("--cost-price", type=float, default=r["cost_price"],
                        help="per-step price on the step's cost fraction (SolGRPOConfig.cost_price; 0 = the authors' reward)")
    parser.add_argument("--context-length", type=int, default=r["context_length"])
    parser.add_argument("--rollout-steps", type=int, default=r["rollout_steps"])
    parser.add_argument("--windows-per-step", type=int, default=r["windows_per_step"])
    parser.add_argument("--num-generations", type=int, default=r["num_generations"])
    parser.add_argument("--max-windows", type=int, default=r["max_windows"], help="cap on training windows (default: all)")
    parser.add_argument("--save-steps", type=int, default=50, help="checkpoint every N updates (policy artifacts)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def main() -> None:
    opts = build_parser().parse_args()

    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    from sol_hf.training import train_policy

    out = train_policy(opts.base, opts.output, **train_kwargs(opts), save_strategy="steps", save_steps=opts.save_steps,
                       logging_steps=5)
    print(f"policy artifact written to {out}")


if __name__ == "__main__":
    main()
