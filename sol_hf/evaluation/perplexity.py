"""Teacher-forced perplexity of controlled tokens at matched budget: policy vs dense, uniform
and random schedules.

Protocol (the paper's, ``sol-method.md`` §5.1, without its flaws §7.8 and §7.21-22): each
window of ``context_length + T + 1`` tokens is prefilled densely, then ``T`` controlled
teacher-forced steps score the next ``T`` true tokens (:func:`sol_hf.episodes.run_episodes`,
the same code training uses). Per budget and batch of windows:

1. the policy runs greedily (argmax, under its budget guard) at the requested budget; the dense
   model scores the same tokens from the same prefill (first budget only);
2. the baselines run in *one* batch that shares one dense prefill, each window matched to what
   the policy achieved **on that window**: the uniform controller on the unified cost, the
   uniform controller on each axis (attention keep, activation keep, bits, as the paper), and ``N``
   random schedules (one seed each) on the unified cost.

Leak-freedom comes from the runtime, not from clean-up here: a forward call without
``actions`` and outside ``generate`` is the base model (no step state exists, nothing is
cached between calls), and every :func:`run_episodes` call prefills afresh and resets its
controllers. ``tests/test_evaluation.py`` checks both bit-for-bit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..budget import BUDGET_AXES, BudgetTargets, parse_compute_budget
from ..episodes import EpisodeBatch, run_episodes
from ..modeling import SolForCausalLM
from ..policy import Controller, DecisionContext, PolicyController, RandomController, UniformController
from .stats import bootstrap_indices, gap_closed, paired_comparison, perplexity, perplexity_interval

__all__ = ["evaluate_perplexity", "EvaluationResult", "GroupedController", "budget_label", "BUDGET_TOLERANCE"]

BUDGET_TOLERANCE = 0.02  # achieved budget must be within +-2 % (relative) of the target

_COST = torch.tensor([True, False, False, False])
_AXES = torch.tensor([False, True, True, True])


class GroupedController(Controller):
    """Several controllers in one batch: row ``r`` belongs to member ``r % len(members)``.

    Each member sees only its rows, and only the budget dimensions of its mask as "set", so
    one batch of ``B * G`` rows (``run_episodes(..., repeats=G)``, b-major) runs ``G``
    schedules per window from one shared dense prefill. A member's rows are exactly what it
    would see in a batch of its own, so its decisions are the same.
    """

    def __init__(self, space, members: Sequence[tuple[Controller, torch.Tensor]]):
        super().__init__(space)
        if any(member.uses_policy for member, _ in members):
            raise ValueError("GroupedController runs non-learned controllers only (the policy needs its own run)")
        self.members = list(members)
        # the runner fills the base model's confidence when any member reads it
        self.needs_lm_confidence = any(member.needs_lm_confidence for member, _ in self.members)

    def reset(self) -> None:
        for member, _ in self.members:
            member.reset()

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        rows = ctx.cost_table.shape[0]
        groups = len(self.members)
        out = torch.empty(rows, dtype=torch.long, device=ctx.cost_table.device)
        for g, (member, dims) in enumerate(self.members):
            idx = slice(g, rows, groups)
            targets = BudgetTargets(ctx.targets.values[idx], ctx.targets.is_set[idx] & dims.to(ctx.targets.is_set.device))
            confidence = None if ctx.lm_confidence is None else ctx.lm_confidence[idx]
            sub = DecisionContext(ctx.requirement[idx], targets, ctx.cost_table[idx], None, ctx.step, confidence)
            out[idx] = member.decide(sub)
        return out


def budget_label(budget: float | dict) -> str:
    """Short text for a budget spec: ``0.85`` or ``attention=0.7,activation=0.9,bits=10``."""
    if isinstance(budget, dict):
        return ",".join(f"{k}={v:g}" for k, v in budget.items())
    return f"{float(budget):g}"


@dataclass
class _Collected:
    """Per-window results of one schedule, concatenated over batches."""

    log_probs: list[torch.Tensor] = field(default_factory=list)  # (b, T) each
    means: list[torch.Tensor] = field(default_factory=list)  # (b, 4): cost, attention, activation, bits

    def add(self, log_probs: torch.Tensor, means: torch.Tensor) -> None:
        self.log_probs.append(log_probs.detach().double().cpu())
        self.means.append(means.detach().double().cpu())

    def window_nll(self) -> torch.Tensor:
        return -torch.cat(self.log_probs).mean(-1)

    def window_means(self) -> torch.Tensor:
        return torch.cat(self.means)


def _window_means(batch: EpisodeBatch, rows: slice | None = None) -> torch.Tensor:
    """(R, 4) per-row means over the T steps: cost, attention keep, activation keep, bits (not /16)."""
    means = torch.stack(
        [batch.step_cost.double(), batch.attention_keep.double(), batch.activation_keep.double(), batch.bits.double()], dim=-1
    ).mean(1)
    return means if rows is None else means[rows]


@dataclass
class EvaluationResult:
    """Everything an evaluation measured. ``data`` is the JSON document (see :meth:`to_markdown`)."""

    data: dict[str, Any]

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.data, indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    def to_markdown(self) -> str:
        from .report import markdown_table

        return markdown_table(self.data)

    def __getitem__(self, key):
        return self.data[key]


def _row(name: str, nll: torch.Tensor, means: torch.Tensor, indices: torch.Tensor, level: float) -> dict[str, Any]:
    low, high = perplexity_interval(nll, indices, level)
    m = means.mean(0)
    return {
        "schedule": name,
        "ppl": perplexity(nll),
        "ppl_ci": [low, high],
        "nll": float(nll.mean()),
        "cost": float(m[0]),
        "attention_keep": float(m[1]),
        "activation_keep": float(m[2]),
        "bits": float(m[3]),
        "windows": int(nll.shape[0]),
        "window_nll": [float(v) for v in nll],
    }


def _target_report(budget: float | dict, achieved: dict[str, Any]) -> dict[str, Any]:
    """Relative error of the achieved values against each set budget dimension."""
    if isinstance(budget, dict):
        pairs = {k: (float(v), achieved["attention_keep" if k == "attention" else "activation_keep" if k == "activation" else "bits"])
                 for k, v in budget.items()}
    else:
        pairs = {"cost": (float(budget), achieved["cost"])}
    errors = {k: a / t - 1.0 for k, (t, a) in pairs.items()}
    return {
        "target": {k: t for k, (t, _) in pairs.items()},
        "relative_error": errors,
        "within_tolerance": all(abs(e) <= BUDGET_TOLERANCE for e in errors.values()),
        "tolerance": BUDGET_TOLERANCE,
    }


@torch.no_grad()
def evaluate_perplexity(
    model: SolForCausalLM,
    windows: torch.Tensor,
    context_length: int,
    budgets: Sequence[float | dict],
    *,
    random_seeds: int = 8,
    batch_size: int = 8,
    per_axis: bool = True,
    budget_guard: float | None = 0.25,
    policy_temperature: float = 0.0,
    random_spread: float = 0.25,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
    metadata: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Perplexity of the ``T`` controlled tokens of every window for the dense model, the policy
    and the matched baselines, at each budget.

    Args:
        model: the wrapped model; ``model.policy`` is the policy evaluated.
        windows: (W, context_length + T + 1) token ids.
        budgets: each a unified cost fraction (float) or a per-axis dict, as ``compute_budget``.
        random_seeds: N random schedules per budget (best and mean are reported); >= 1.
        batch_size: windows per batch (the baselines run ``batch_size * (N + 2)`` rows).
        per_axis: also run the uniform controller matched per axis (as the paper).
        budget_guard: the policy's budget-guard slack (``PolicyController``); ``None`` = unguarded.
        policy_temperature: 0 takes the policy's most likely allowed action (greedy); > 0 samples
            at this temperature (GRPO optimises the policy's sampling distribution, at the training
            temperature), seeded from ``seed`` and the batch index so results are reproducible.
        random_spread: the random controller's slack around the per-step requirement.
        resamples, level, seed: bootstrap over windows.
        progress: show a tqdm bar.
    Returns:
        :class:`EvaluationResult`; ``result.data`` is JSON-ready.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be (W, L) token ids, got shape {tuple(windows.shape)}")
    steps = windows.shape[1] - context_length - 1
    if steps < 1:
        raise ValueError(f"windows of {windows.shape[1]} tokens leave no controlled step after a {context_length}-token context")
    if random_seeds < 1:
        raise ValueError(f"random_seeds must be >= 1, got {random_seeds}")
    if not (policy_temperature >= 0.0 and math.isfinite(policy_temperature)):
        raise ValueError(f"policy_temperature must be 0 (greedy) or a positive number, got {policy_temperature}")
    if not budgets:
        raise ValueError("give at least one budget")
    for budget in budgets:
        model.check_axis_targets(parse_compute_budget(budget, 1))  # validates the spec against the grid
    num_windows = windows.shape[0]
    space = model.space
    was_training = model.policy.training
    model.policy.eval()
    members: list[tuple[str, Controller, torch.Tensor]] = [("uniform", UniformController(space), _COST)]
    if per_axis:
        members.append(("uniform_per_axis", UniformController(space), _AXES))
    random_names = [f"random_seed{seed + s}" for s in range(random_seeds)]
    for s, name in enumerate(random_names):
        members.append((name, RandomController(space, seed=seed + s, spread=random_spread), _COST))
    grouped = GroupedController(space, [(c, dims) for _, c, dims in members])
    groups = len(members)

    dense = _Collected()
    collected = [{name: _Collected() for name in ["policy"] + [m[0] for m in members]} for _ in budgets]
    n_batches = math.ceil(num_windows / batch_size)
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # per controlled step (a policy run and a baselines run per batch and budget), so the bar
        # moves every few seconds rather than once per batch
        bar = tqdm(total=n_batches * len(budgets) * 2 * steps, desc=f"sol-hf eval ({num_windows} windows)", unit="step")
    tick = None if bar is None else (lambda: bar.update(1))
    try:
        for b in range(n_batches):
            chunk = windows[b * batch_size : (b + 1) * batch_size]
            rows = chunk.shape[0]
            for i, budget in enumerate(budgets):
                targets = parse_compute_budget(budget, rows)
                policy = PolicyController(
                    model.policy, do_sample=policy_temperature > 0, temperature=policy_temperature or 1.0,
                    budget_guard=budget_guard, seed=seed * 1_000_003 + b * 101 + i,
                )
                run = run_episodes(model, chunk, context_length, policy, targets, with_dense=(i == 0), on_step=tick)
                policy_means = _window_means(run)
                collected[i]["policy"].add(run.token_log_probs, policy_means)
                if i == 0:
                    ones = torch.tensor([1.0, 1.0, 1.0, 16.0], dtype=torch.float64).expand(rows, -1)
                    dense.add(run.dense_token_log_probs, ones)
                matched = policy_means.clone()
                matched[:, 3] /= 16.0
                matched_targets = BudgetTargets(matched.float().clamp(1e-6, 1.0), torch.ones(rows, len(BUDGET_AXES), dtype=torch.bool))
                base = run_episodes(model, chunk, context_length, grouped, matched_targets, repeats=groups, on_step=tick)
                means = _window_means(base)
                for g, (name, _, _) in enumerate(members):
                    collected[i][name].add(base.token_log_probs[g::groups], means[g::groups])
    finally:
        if bar is not None:
            bar.close()
        model.policy.train(was_training)
    elapsed = time.perf_counter() - started

    indices = bootstrap_indices(num_windows, resamples, seed)
    dense_nll = dense.window_nll()
    dense_row = _row("dense", dense_nll, dense.window_means(), indices, level)
    results = []
    for i, budget in enumerate(budgets):
        c = collected[i]
        nll = {name: col.window_nll() for name, col in c.items()}
        rows_out = {name: _row(name, nll[name], col.window_means(), indices, level) for name, col in c.items()}
        policy_row = rows_out["policy"]
        policy_row["budget"] = _target_report(budget, policy_row)
        random_rows = [rows_out[name] for name in random_names]
        best_name = min(random_names, key=lambda n: rows_out[n]["ppl"])
        best = dict(rows_out[best_name], schedule="random_best", seed=int(best_name.removeprefix("random_seed")))
        random_ppls = torch.tensor([r["ppl"] for r in random_rows], dtype=torch.float64)
        random_mean = {
            "schedule": "random_mean",
            "ppl": float(random_ppls.mean()),
            "ppl_std": float(random_ppls.std()) if len(random_rows) > 1 else 0.0,
            "ppl_min": float(random_ppls.min()),
            "ppl_max": float(random_ppls.max()),
            "cost": float(sum(r["cost"] for r in random_rows) / len(random_rows)),
            "attention_keep": float(sum(r["attention_keep"] for r in random_rows) / len(random_rows)),
            "activation_keep": float(sum(r["activation_keep"] for r in random_rows) / len(random_rows)),
            "bits": float(sum(r["bits"] for r in random_rows) / len(random_rows)),
            "seeds": [{"seed": int(n.removeprefix("random_seed")), "ppl": rows_out[n]["ppl"], "cost": rows_out[n]["cost"]} for n in random_names],
        }
        baselines = {"uniform": nll["uniform"], "random_best": nll[best_name]}
        if per_axis:
            baselines["uniform_per_axis"] = nll["uniform_per_axis"]
        comparisons = {
            f"policy_vs_{name}": paired_comparison(nll["policy"], base_nll, indices, level) for name, base_nll in baselines.items()
        }
        entry = {
            "budget": budget,
            "label": budget_label(budget),
            "policy": policy_row,
            "uniform": rows_out["uniform"],
            "random_best": best,
            "random_mean": random_mean,
            "comparisons": comparisons,
            "gap_closed": {
                "vs_uniform": gap_closed(policy_row["ppl"], rows_out["uniform"]["ppl"], dense_row["ppl"]),
                "vs_random_best": gap_closed(policy_row["ppl"], best["ppl"], dense_row["ppl"]),
            },
        }
        if per_axis:
            entry["uniform_per_axis"] = rows_out["uniform_per_axis"]
            entry["gap_closed"]["vs_uniform_per_axis"] = gap_closed(
                policy_row["ppl"], rows_out["uniform_per_axis"]["ppl"], dense_row["ppl"]
            )
        results.append(entry)

    data = {
        "protocol": {
            "windows": num_windows,
            "context_length": context_length,
            "controlled_steps": steps,
            "scored_tokens_per_schedule": num_windows * steps,
            "prefill": "dense (the base model's forward), one per run_episodes call",
            "policy": ("greedy (argmax)" if policy_temperature == 0 else f"sampled at temperature {policy_temperature} (seeded)")
            + " under its budget guard",
            "budget_guard": budget_guard,
            "policy_temperature": policy_temperature,
            "matching": "per window, on the policy's achieved values on that window: unified cost (uniform, random) "
            "and each axis (uniform_per_axis)",
            "random_seeds": random_seeds,
            "random_spread": random_spread,
            "random_best": "lowest perplexity of the N seeds on these same windows (an oracle choice: favours random)",
            "batch_size": batch_size,
            "bootstrap": {"resamples": resamples, "level": level, "unit": "window", "seed": seed},
            "action_grid": {
                "attention_keep": list(space.attention_keep),
                "activation_keep": list(space.activation_keep),
                "bits": list(space.bits),
            },
        },
        "dense": dense_row,
        "budgets": results,
        "elapsed_s": elapsed,
    }
    if metadata:
        data["metadata"] = metadata
    return EvaluationResult(data)
