"""Does *where* the policy spends compute matter, or only *how much of each action* it uses?

For each held-out window the trained policy's own schedule (T actions) is replayed twice: in
its order, and with its steps shuffled (same actions, same mixture, same cost up to context-length
effects, random placement). If the policy's perplexity is lower than the shuffled replays',
per-token placement carries the gain; if they tie, the gain comes from the mixture of actions.
The uniform schedule at each window's achieved policy cost is reported beside them.

    python benchmarks/placement_smollm2.py --policy outputs/smollm2-policy --budget 0.878 --threads 2

Prints JSON (perplexities, paired bootstrap intervals of shuffled - policy and uniform - policy,
achieved costs). ``--windows-file`` scores other windows (for tuning: the training run's
``validation_windows.safetensors``) instead of the held-out evaluation sections.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from sol_hf.budget import parse_compute_budget
from sol_hf.cli import eval_windows, load_model, read_texts
from sol_hf.data import EVAL_SECTIONS, PYTHON_DOCS_ROOT, load_windows
from sol_hf.episodes import run_episodes
from sol_hf.evaluation.stats import bootstrap_indices, paired_comparison, perplexity
from sol_hf.policy import PolicyController, ScheduleController, SurpriseRuleController, UniformController


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="outputs/smollm2-policy")
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--budget", type=float, default=0.878)
    parser.add_argument("--windows", type=int, default=112)
    parser.add_argument("--windows-file", default=None,
                        help="a safetensors file of (N, L) windows (e.g. the training run's validation_windows) "
                             "instead of the held-out evaluation sections")
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--shuffles", type=int, default=4)
    parser.add_argument("--rule", nargs=2, default=None, metavar=("FULL", "CHEAP"),
                        help="also run SurpriseRuleController with these two actions, each 'attention,mlp,bits' "
                             "(e.g. 1.0,0.8,16 1.0,0.4,16), at the same budget")
    parser.add_argument("--ranked", action="store_true", help="greedy decisions with PolicyController(ranked=True)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="policy decoding: 0 = greedy (argmax); > 0 samples at this temperature (seeded per batch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    model, tokenizer = load_model(args.base, args.policy, quiet=True)
    if args.windows_file:
        windows = load_windows(args.windows_file, args.context_length + args.steps + 1, args.windows)
    else:
        windows = eval_windows(tokenizer, read_texts(EVAL_SECTIONS, PYTHON_DOCS_ROOT), args.context_length, args.steps, args.windows)
    generator = torch.Generator().manual_seed(0)
    schedules = []
    rule = None
    if args.rule:
        full, cheap = ((float(a), float(m), int(b)) for a, m, b in (r.split(",") for r in args.rule))
        rule = SurpriseRuleController(model.space, full=full, cheap=cheap)
    nll = {"policy": [], "uniform": [], **({"surprise_rule": []} if rule else {}), **{f"shuffled_{i}": [] for i in range(args.shuffles)}}
    cost = {k: [] for k in nll}
    for start in range(0, windows.shape[0], args.batch_size):
        batch = windows[start : start + args.batch_size]
        targets = parse_compute_budget(args.budget, batch.shape[0])
        controller = PolicyController(model.policy, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                                      budget_guard=0.25, seed=start, ranked=args.ranked)
        policy = run_episodes(model, batch, args.context_length, controller, targets)
        nll["policy"].append(-policy.token_log_probs.mean(1))
        cost["policy"].append(policy.step_cost.mean(1))
        schedules.append(policy.actions)
        # the static schedule at the cost this policy achieved on each window
        matched = parse_compute_budget(policy.step_cost.mean(1).clamp(1e-3, 1.0).cpu(), batch.shape[0])
        uniform = run_episodes(model, batch, args.context_length, UniformController(model.space), matched)
        nll["uniform"].append(-uniform.token_log_probs.mean(1))
        cost["uniform"].append(uniform.step_cost.mean(1))
        if rule is not None:
            ruled = run_episodes(model, batch, args.context_length, rule, targets)
            nll["surprise_rule"].append(-ruled.token_log_probs.mean(1))
            cost["surprise_rule"].append(ruled.step_cost.mean(1))
        for i in range(args.shuffles):
            order = torch.argsort(torch.rand(policy.actions.shape, generator=generator), dim=1)
            shuffled = torch.gather(policy.actions, 1, order)
            replay = run_episodes(model, batch, args.context_length, ScheduleController(model.space, shuffled), targets)
            nll[f"shuffled_{i}"].append(-replay.token_log_probs.mean(1))
            cost[f"shuffled_{i}"].append(replay.step_cost.mean(1))
    nll = {k: torch.cat(v) for k, v in nll.items()}
    cost = {k: float(torch.cat(v).mean()) for k, v in cost.items()}
    shuffled = torch.stack([nll[f"shuffled_{i}"] for i in range(args.shuffles)]).mean(0)
    ppl = perplexity
    boot = bootstrap_indices(windows.shape[0], 1000)
    diff = paired_comparison(nll["policy"], shuffled, boot)
    print(json.dumps({
        "benchmark": "placement_smollm2",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, torch threads {args.threads}, GPU: none",
        "command": "python benchmarks/placement_smollm2.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
            if v is not None and v is not False),
        "budget": args.budget,
        "windows": int(windows.shape[0]),
        "ppl": {"policy": ppl(nll["policy"]), "uniform": ppl(nll["uniform"]), "shuffled_average": ppl(shuffled),
                **({"surprise_rule": ppl(nll["surprise_rule"])} if rule else {}),
                **{k: ppl(v) for k, v in nll.items() if k.startswith("shuffled_")}},
        "cost": cost,
        # how many different action sequences the policy used over the windows (1 = the same
        # schedule everywhere: no per-token judgement at all)
        "distinct_policy_schedules": len({tuple(row) for row in torch.cat(schedules).tolist()}),
        "shuffled_minus_policy_ppl": diff,
        "uniform_minus_policy_ppl": paired_comparison(nll["policy"], nll["uniform"], boot),
        **({"surprise_rule_minus_policy_ppl": paired_comparison(nll["policy"], nll["surprise_rule"], boot),
            "shuffled_minus_surprise_rule_ppl": paired_comparison(nll["surprise_rule"], shuffled, boot)} if rule else {}),
        "wall_s": round(time.time() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
