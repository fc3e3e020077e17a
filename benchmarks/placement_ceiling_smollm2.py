"""How much can per-token placement of one cheap action gain at most, and is it predictable?

For each window, every one of the T controlled steps is probed alone: a schedule that is dense
everywhere except step t, which takes the probe action (default: MLP keep 0.4, attention dense,
16 bits). The increase in the episode's total NLL over the dense schedule is that step's
sensitivity (it includes the effect on later tokens through the KV cache). Then, for n of T steps
taking the probe action (same mixture, same cost), schedules that place the n steps

- ``oracle``: on the n least sensitive steps (hindsight: knows the true tokens; a ceiling),
- ``anti_oracle``: on the n most sensitive steps (a floor),
- ``low_prev_entropy`` / ``low_prev_surprise``: where the dense model was most certain /
  least surprised one position earlier (both observable before the step is run),
- ``random_i``: uniformly at random,

are replayed for real (not added up) and their perplexities compared side by side. If the oracle
is barely better than random, per-token placement cannot carry a large gain on this model and
action; if an observable rule beats random, a policy has a signal to learn.

    python benchmarks/placement_ceiling_smollm2.py --windows 64 --threads 2

Windows come from the *validation* documents of the training sections (the file written by
``examples/train_smollm2.py``), never from the held-out evaluation sections. Prints JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
from sol_hf.budget import parse_compute_budget
from sol_hf.cli import load_model
from sol_hf.data import load_windows
from sol_hf.episodes import run_episodes
from sol_hf.evaluation.stats import bootstrap_indices, paired_comparison, perplexity
from sol_hf.policy import ScheduleController, lm_confidence_features


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (ties broken by order; fine for continuous values)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def dense_position_stats(model, windows: torch.Tensor, context_length: int, steps: int):
    """Dense teacher-forced forward -> (entropy / log V, surprise in nats), each (B, T), of the
    next-token distribution at position ``context_length + t - 1``, i.e. the one that predicted
    the input token of controlled step t: what :func:`lm_confidence_features` gives a policy or
    :class:`SurpriseRuleController` when step t's action is chosen (here on the dense prefix)."""
    positions = torch.arange(context_length - 1, context_length - 1 + steps)
    logits = model.base_model(windows).logits[:, positions]  # (B, T, V)
    b, t, v = logits.shape
    confidence = lm_confidence_features(logits.reshape(b * t, v), windows[:, positions + 1].reshape(-1)).view(b, t, 3)
    return confidence[..., 0], -confidence[..., 1].log()


def place(scores: torch.Tensor, n: int, probe: int, dense: int) -> torch.Tensor:
    """(B, T) scores -> (B, T) schedule with the probe action on each row's n lowest scores."""
    chosen = scores.argsort(dim=1)[:, :n]
    schedule = torch.full(scores.shape, dense, dtype=torch.long)
    return schedule.scatter(1, chosen, probe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="outputs/smollm2-policy", help="any artifact for this base (its action grid is used)")
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--windows-file", default=None, help="default: <policy>-run/validation_windows.safetensors")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--probe", default="1.0,0.4,16", help="attention keep, MLP keep, bits of the probed action")
    parser.add_argument("--counts", type=int, nargs="+", default=[4, 8, 12], help="steps (of T) taking the probe action")
    parser.add_argument("--random-orders", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    model, _ = load_model(args.base, args.policy, quiet=True)
    space = model.space
    attention, mlp, bits = args.probe.split(",")
    probe = space.index_of(float(attention), float(mlp), int(bits))
    dense = space.index_of(1.0, 1.0, 16)
    path = args.windows_file or os.path.join(args.policy.rstrip("/") + "-run", "validation_windows.safetensors")
    windows = load_windows(path, args.context_length + args.steps + 1, args.windows)
    steps = args.steps
    generator = torch.Generator().manual_seed(0)

    names = ["oracle", "anti_oracle", "low_prev_entropy", "low_prev_surprise"] + [f"random_{i}" for i in range(args.random_orders)]
    sensitivity, local, dense_nll, entropy_all, surprise_all = [], [], [], [], []
    replay_nll = {n: {name: [] for name in names} for n in args.counts}
    replay_cost = {n: {name: [] for name in names} for n in args.counts}
    for start in range(0, windows.shape[0], args.batch_size):
        batch = windows[start : start + args.batch_size]
        b = batch.shape[0]
        targets = parse_compute_budget(1.0, b)
        # Row k = 0 is dense; row k >= 1 takes the probe at step k - 1 only.
        probes = torch.full((steps + 1, steps), dense, dtype=torch.long)
        probes[torch.arange(1, steps + 1), torch.arange(steps)] = probe
        out = run_episodes(model, batch, args.context_length, ScheduleController(space, probes.repeat(b, 1)), targets, repeats=steps + 1)
        nll = (-out.token_log_probs).view(b, steps + 1, steps).double()
        base = nll[:, 0]
        sens = nll[:, 1:].sum(-1) - base.sum(-1, keepdim=True)  # (b, T) total NLL increase per probed step
        sensitivity.append(sens)
        local.append(torch.diagonal(nll[:, 1:], dim1=1, dim2=2) - base)
        dense_nll.append(base)
        entropy, surprise = dense_position_stats(model, batch, args.context_length, steps)
        entropy_all.append(entropy.double())
        surprise_all.append(surprise.double())
        for n in args.counts:
            schedules = [
                place(sens, n, probe, dense),
                place(-sens, n, probe, dense),
                place(entropy, n, probe, dense),
                place(surprise, n, probe, dense),
            ] + [place(torch.rand(b, steps, generator=generator), n, probe, dense) for _ in range(args.random_orders)]
            stacked = torch.stack(schedules, dim=1).reshape(b * len(names), steps)
            rep = run_episodes(model, batch, args.context_length, ScheduleController(space, stacked), targets, repeats=len(names))
            rep_nll = (-rep.token_log_probs).view(b, len(names), steps).double().mean(-1)
            rep_cost = rep.step_cost.view(b, len(names), steps).double().mean(-1)
            for i, name in enumerate(names):
                replay_nll[n][name].append(rep_nll[:, i])
                replay_cost[n][name].append(rep_cost[:, i])
        print(f"{start + b}/{windows.shape[0]} windows, {time.time() - started:.0f} s", file=sys.stderr, flush=True)

    sens = torch.cat(sensitivity)
    local = torch.cat(local)
    base = torch.cat(dense_nll)
    entropy = torch.cat(entropy_all)
    surprise = torch.cat(surprise_all)
    boot = bootstrap_indices(sens.shape[0], 1000)
    fractions = {}
    for n in args.counts:
        nll = {name: torch.cat(v) for name, v in replay_nll[n].items()}
        random_avg = torch.stack([nll[f"random_{i}"] for i in range(args.random_orders)]).mean(0)
        fractions[f"{n}_of_{steps}"] = {
            "ppl": {name: perplexity(v) for name, v in nll.items()} | {"random_average": perplexity(random_avg)},
            "cost": {name: round(float(torch.cat(v).mean()), 4) for name, v in replay_cost[n].items()},
            "random_minus_oracle_ppl": paired_comparison(nll["oracle"], random_avg, boot),
            "random_minus_low_prev_entropy_ppl": paired_comparison(nll["low_prev_entropy"], random_avg, boot),
            "random_minus_low_prev_surprise_ppl": paired_comparison(nll["low_prev_surprise"], random_avg, boot),
        }
    flat = sens.flatten()
    print(json.dumps({
        "benchmark": "placement_ceiling_smollm2",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, torch threads {args.threads}, GPU: none",
        "command": "python benchmarks/placement_ceiling_smollm2.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not None),
        "windows": int(sens.shape[0]),
        "probe": space.tag(probe),
        "dense_ppl": perplexity(base.mean(-1)),
        "sensitivity_nats": {
            "mean": float(flat.mean()), "std": float(flat.std()),
            "quantiles_10_50_90": [float(q) for q in torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], dtype=flat.dtype))],
            "share_of_local": float(local.sum() / sens.sum()),
        },
        "spearman_with_sensitivity": {
            "dense_nll_this_step (hindsight)": spearman(flat, base.flatten()),
            "dense_entropy_prev_position (observable)": spearman(flat, entropy.flatten()),
            "dense_surprise_prev_position (observable)": spearman(flat, surprise.flatten()),
        },
        "placements": fractions,
        "wall_s": round(time.time() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
