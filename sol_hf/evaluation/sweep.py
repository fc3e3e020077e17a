"""The whole quality-cost curve: every schedule at its own target budget, and the best static baseline.

A learned policy earns its keep only against the strongest schedule that ignores the text. This
module builds that baseline and scores everything on one footing:

* :class:`StaticMixtureController`: a content-blind schedule of two actions, ``low`` and
  ``high``, playing whichever keeps the running mean cost closest to the target. Every fixed mixture of two actions is one of these; a single action is ``low == high``.
* :func:`search_best_static`: on **validation** windows, scores every action alone, keeps the
  actions no other action beats on both cost and perplexity, and at each budget scores every
  pair of those that brackets the budget; the pair with the lowest perplexity whose achieved cost
  meets the target is the *best static* schedule at that budget. Never run it on held-out text.
* :func:`evaluate_sweep`: on held-out windows, at each budget, the dense model, ``uniform`` (the
  ladder that prunes attention and activations together), ``best_static``, ``surprise`` (the
  best static pair, with the cheap action placed on the tokens the base model found least
  surprising), ``random`` schedules, the policy, and the policy's own actions shuffled across
  steps (the placement test: same mixture, order destroyed). Each runs at the target itself,
  not matched to another schedule; paired bootstrap intervals over windows compare them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..budget import parse_compute_budget
from ..episodes import run_episodes
from ..modeling import SolForCausalLM
from ..policy import Controller, DecisionContext, PolicyController, RandomController, ScheduleController, SurpriseRuleController, UniformController
from .perplexity import BUDGET_TOLERANCE, EvaluationResult, GroupedController
from .stats import bootstrap_indices, gap_closed, paired_comparison, perplexity, perplexity_interval

__all__ = ["StaticMixtureController", "StaticSchedule", "search_best_static", "evaluate_sweep", "sweep_markdown",
           "best_static_from"]

_COST = torch.tensor([True, False, False, False])

# Schedules of a sweep in reporting order (the policy rows only when a policy is evaluated).
_ORDER = ("uniform", "best_static", "surprise", "random", "policy", "policy_shuffled")


class StaticMixtureController(Controller):
    """Plays whichever of ``low`` and ``high`` brings the row's running mean cost closest to the
    target (the step's cost closest to the running requirement): a fixed two-action mixture whose
    share of ``high`` settles where the mean cost meets the target. Blind to the text. Unified
    budgets only."""

    name = "static"

    def __init__(self, space, low: int, high: int):
        super().__init__(space)
        for a in (low, high):
            space.axis_indices_host(a)  # validates the index
        self.low, self.high = int(low), int(high)

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        requirement = ctx.requirement[:, 0]
        high_gap = (ctx.cost_table[:, self.high] - requirement).abs()
        low_gap = (ctx.cost_table[:, self.low] - requirement).abs()
        return torch.where(high_gap < low_gap, self.high, self.low)


@dataclass(frozen=True)
class StaticSchedule:
    """The best static schedule at one budget, as found on validation windows.

    Attributes:
        low, high: the two action indices mixed (equal for a single action).
        validation_ppl: its perplexity on the validation windows.
        validation_cost: the mean cost it achieved there.
        candidates: how many schedules the search scored at this budget.
    """

    low: int
    high: int
    validation_ppl: float
    validation_cost: float
    candidates: int

    def tags(self, space) -> str:
        return space.tag(self.low) if self.low == self.high else f"{space.tag(self.low)} + {space.tag(self.high)}"

    def to_dict(self, space) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "actions": self.tags(space), "validation_ppl": self.validation_ppl,
                "validation_cost": self.validation_cost, "candidates": self.candidates}


def _run_group(model: SolForCausalLM, windows: torch.Tensor, context_length: int, members: list[Controller],
               budget: float, batch_size: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Score ``members`` (unified-cost controllers) at ``budget`` on ``windows``: per member the
    (W,) mean NLL per window and the (W,) mean achieved cost per window."""
    per_member_nll = [[] for _ in members]
    per_member_cost = [[] for _ in members]
    chunk_members = max(1, max_rows // batch_size)
    for start in range(0, len(members), chunk_members):
        group = members[start : start + chunk_members]
        grouped = GroupedController(model.space, [(m, _COST) for m in group])
        for b in range(0, windows.shape[0], batch_size):
            chunk = windows[b : b + batch_size]
            run = run_episodes(model, chunk, context_length, grouped, parse_compute_budget(budget, chunk.shape[0]),
                               repeats=len(group))
            for g in range(len(group)):
                per_member_nll[start + g].append(-run.token_log_probs[g :: len(group)].double().mean(-1).cpu())
                per_member_cost[start + g].append(run.step_cost[g :: len(group)].double().mean(-1).cpu())
    return (torch.stack([torch.cat(v) for v in per_member_nll]), torch.stack([torch.cat(v) for v in per_member_cost]))


@torch.no_grad()
def search_best_static(model: SolForCausalLM, windows: torch.Tensor, context_length: int, budgets: Sequence[float],
                       *, batch_size: int = 4, max_rows: int = 48, top_pairs: int | None = 4,
                       progress: bool = False) -> dict[float, StaticSchedule]:
    """The best static schedule at each budget, searched on ``windows`` (validation text only).

    Stage 1 scores every action alone; the actions on the lower-left frontier of (achieved cost,
    perplexity), and the best action on each side of a budget, are its candidates. Stage 2 scores,
    at each budget, the candidate pairs that bracket it (and a candidate alone whose cost is within
    2 % of it) and keeps the lowest perplexity whose achieved cost is within ``BUDGET_TOLERANCE``
    of the budget (else the closest in cost). With ``top_pairs``, only that many pairs are scored
    for real: those whose NLL, interpolated from the two actions' stage-1 NLLs at the mixing share
    that meets the budget, is lowest (``None`` scores every pair). ``max_rows`` caps the rows of
    one batch (windows x schedules).
    Returns ``{budget: StaticSchedule}``.
    """
    budgets = [float(b) for b in budgets]
    for b in budgets:
        if not (0.0 < b <= 1.0) or math.isnan(b):
            raise ValueError(f"budgets must lie in (0, 1], got {b}")
    space = model.space
    started = time.perf_counter()
    actions = list(range(space.num_actions))
    singles = [StaticMixtureController(space, a, a) for a in actions]
    nll, cost = _run_group(model, windows, context_length, singles, 1.0, batch_size, max_rows)
    mean_nll, mean_cost = nll.mean(-1), cost.mean(-1)
    # Actions that score identically (attention levels that run dense at this length, say) are one
    # schedule: keep the densest of them (the highest index), so no pair is scored twice.
    same = lambda a, o: abs(float(mean_cost[a] - mean_cost[o])) <= 1e-9 and abs(float(mean_nll[a] - mean_nll[o])) <= 1e-12  # noqa: E731
    actions = [a for a in actions if not any(o > a and same(a, o) for o in actions)]
    frontier = [a for a in actions
                if not any(mean_cost[o] <= mean_cost[a] + 1e-9 and mean_nll[o] < mean_nll[a] - 1e-12 for o in actions)]
    if progress:
        print(f"best static: {len(frontier)} of {len(actions)} distinct actions on the cost-perplexity frontier "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    out: dict[float, StaticSchedule] = {}
    for budget in budgets:
        # the frontier, plus the best action on each side of the budget (where sparser actions score
        # better, as on a random model, the frontier alone may not reach up to the budget)
        candidates = set(frontier)
        for side in ([a for a in actions if mean_cost[a] >= budget - 1e-9], [a for a in actions if mean_cost[a] <= budget + 1e-9]):
            if side:
                candidates.add(min(side, key=lambda a: float(mean_nll[a])))
        candidates = sorted(candidates)
        pairs = [(lo, hi) for lo in candidates for hi in candidates
                 if mean_cost[lo] <= budget + 1e-9 and mean_cost[hi] >= budget - 1e-9 and mean_cost[lo] < mean_cost[hi]]
        pairs += [(a, a) for a in candidates if abs(float(mean_cost[a]) - budget) <= BUDGET_TOLERANCE * budget]
        if not pairs:  # below the cheapest or above the dearest action: the nearest one alone
            nearest = min(candidates, key=lambda a: abs(float(mean_cost[a]) - budget))
            pairs = [(nearest, nearest)]
        if top_pairs is not None and len(pairs) > top_pairs:
            def interpolated(pair, budget=budget):  # the mixture's NLL if every step scored as its action alone
                lo, hi = pair
                share = 0.0 if lo == hi else float((budget - mean_cost[lo]) / (mean_cost[hi] - mean_cost[lo]))
                return (1 - share) * float(mean_nll[lo]) + share * float(mean_nll[hi])

            pairs = sorted(pairs, key=interpolated)[:top_pairs]
        members = [StaticMixtureController(space, lo, hi) for lo, hi in pairs]
        p_nll, p_cost = _run_group(model, windows, context_length, members, budget, batch_size, max_rows)
        ppl = [perplexity(row) for row in p_nll]
        achieved = [float(row.mean()) for row in p_cost]
        meets = [i for i in range(len(pairs)) if abs(achieved[i] / budget - 1.0) <= BUDGET_TOLERANCE]
        best = min(meets, key=lambda i: ppl[i]) if meets else min(range(len(pairs)), key=lambda i: abs(achieved[i] - budget))
        out[budget] = StaticSchedule(pairs[best][0], pairs[best][1], ppl[best], achieved[best], len(pairs))
        if progress:
            print(f"best static at {budget:g}: {out[budget].tags(space)} (validation ppl {ppl[best]:.2f}, cost "
                  f"{achieved[best]:.3f}, {len(pairs)} candidates; {time.perf_counter() - started:.0f} s)", flush=True)
    return out


def _values(space, index: int) -> tuple[float, float, int]:
    ia, im, ib = space.axis_indices_host(index)
    return space.attention_keep[ia], space.activation_keep[im], space.bits[ib]


def _shuffled(actions: torch.Tensor, seed: int) -> torch.Tensor:
    """(R, T) actions with each row's steps permuted (same actions, random order)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(actions.shape[1], generator=generator) for _ in range(actions.shape[0])])
    return actions.cpu().gather(1, order)


@torch.no_grad()
def evaluate_sweep(
    model: SolForCausalLM,
    windows: torch.Tensor,
    context_length: int,
    best_static: dict[float, StaticSchedule],
    *,
    policy: bool = True,
    baselines: dict[str, Any] | None = None,
    random_seeds: int = 3,
    batch_size: int = 4,
    budget_guard: float | None = 0.25,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    progress: bool = False,
    metadata: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Every schedule at every budget of ``best_static`` on held-out ``windows`` (see the module
    docstring). ``policy=False`` leaves out the policy and its shuffled schedule (an untrained
    model). ``baselines``: a sweep document of the same windows and budgets (an earlier
    ``evaluate_sweep(..., policy=False)``); its non-learned rows are reused instead of run again
    (checked: the dense model's per-window NLL must match), so a new policy is scored against a
    fixed baseline sweep in the time of its own runs. Returns an :class:`EvaluationResult` whose
    ``data["budgets"]`` holds, per budget, a row per schedule (perplexity, interval, achieved cost,
    adherence) and paired comparisons."""
    if windows.dim() != 2:
        raise ValueError(f"windows must be (W, L) token ids, got shape {tuple(windows.shape)}")
    steps = windows.shape[1] - context_length - 1
    if steps < 1:
        raise ValueError(f"windows of {windows.shape[1]} tokens leave no controlled step after a {context_length}-token context")
    if not best_static:
        raise ValueError("best_static is empty: run search_best_static on validation windows first")
    if baselines is not None:
        if not policy:
            raise ValueError("baselines= reuses the non-learned rows of an earlier sweep: it needs policy=True")
        earlier = sorted(entry["budget"] for entry in baselines.get("budgets", []))
        if baselines.get("kind") != "sweep" or earlier != sorted(best_static):
            raise ValueError(f"baselines must be a sweep document with budgets {sorted(best_static)}, got {earlier}")
        if baselines["protocol"]["windows"] != windows.shape[0] or baselines["protocol"]["controlled_steps"] != steps:
            raise ValueError("baselines were measured on a different number of windows or controlled steps")
    space = model.space
    budgets = sorted(best_static)
    was_training = model.policy.training
    model.policy.eval()
    started = time.perf_counter()
    names = ["uniform", "best_static", "surprise", *[f"random_seed{seed + s}" for s in range(random_seeds)]]
    collected: dict[float, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = {b: {} for b in budgets}
    dense_nll: list[torch.Tensor] = []

    def add(budget, name, run, rows=slice(None)):
        collected[budget].setdefault(name, []).append(
            (-run.token_log_probs[rows].double().mean(-1).cpu(), run.step_cost[rows].double().mean(-1).cpu()))

    try:
        for b in range(0, windows.shape[0], batch_size):
            chunk = windows[b : b + batch_size]
            rows = chunk.shape[0]
            for i, budget in enumerate(budgets):
                static = best_static[budget]
                targets = parse_compute_budget(budget, rows)
                if baselines is not None:
                    _run_policy(model, chunk, context_length, targets, budget_guard, add, budget, dense_nll if i == 0 else None,
                                seed * 7919 + b * 31 + i)
                    continue
                members: list[Controller] = [
                    UniformController(space),
                    StaticMixtureController(space, static.low, static.high),
                    SurpriseRuleController(space, full=_values(space, static.high), cheap=_values(space, static.low))
                    if static.low != static.high else StaticMixtureController(space, static.low, static.high),
                    *[RandomController(space, seed=seed + s) for s in range(random_seeds)],
                ]
                grouped = GroupedController(space, [(m, _COST) for m in members])
                run = run_episodes(model, chunk, context_length, grouped, targets, repeats=len(members),
                                   with_dense=(i == 0 and not policy))
                for g, name in enumerate(names):
                    add(budget, name, run, slice(g, None, len(members)))
                if i == 0 and not policy:
                    dense_nll.append(-run.dense_token_log_probs.double().mean(-1).cpu())
                if policy:
                    _run_policy(model, chunk, context_length, targets, budget_guard, add, budget, dense_nll if i == 0 else None,
                                seed * 7919 + b * 31 + i)
            if progress:
                done = min(b + batch_size, windows.shape[0])
                print(f"sweep: {done}/{windows.shape[0]} windows ({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        model.policy.train(was_training)

    indices = bootstrap_indices(windows.shape[0], resamples, seed)
    dense = torch.cat(dense_nll)
    if baselines is not None:
        _reuse_baselines(baselines, dense, collected)
    dense_row = {"schedule": "dense", "ppl": perplexity(dense), "ppl_ci": list(perplexity_interval(dense, indices, level)),
                 "cost": 1.0, "window_nll": [float(v) for v in dense]}
    entries = []
    for budget in budgets:
        parts_of = {name: parts for name, parts in collected[budget].items() if not name.startswith("_")}
        nll = {name: torch.cat([n for n, _ in parts]) for name, parts in parts_of.items()}
        cost = {name: torch.cat([c for _, c in parts]) for name, parts in parts_of.items()}
        randoms = [n for n in nll if n.startswith("random_seed")]
        nll["random"] = torch.stack([nll[n] for n in randoms]).mean(0)  # the seeds' mean NLL per window
        cost["random"] = torch.stack([cost[n] for n in randoms]).mean(0)
        rows_out = {}
        for name in _ORDER:
            if name not in nll:
                continue
            achieved = float(cost[name].mean())
            rows_out[name] = {
                "schedule": name, "ppl": perplexity(nll[name]), "ppl_ci": list(perplexity_interval(nll[name], indices, level)),
                "cost": achieved, "relative_cost_error": achieved / budget - 1.0,
                "within_tolerance": abs(achieved / budget - 1.0) <= BUDGET_TOLERANCE,
                "window_nll": [float(v) for v in nll[name]],
            }
        rows_out["best_static"]["actions"] = best_static[budget].to_dict(space)
        if "_best_static_actions" in collected[budget]:
            rows_out["best_static"]["actions"] = collected[budget]["_best_static_actions"]
        pairs = [("best_static", "uniform"), ("surprise", "best_static"), ("best_static", "random")]
        if policy:
            pairs = [("policy", "best_static"), ("policy", "uniform"), ("policy", "policy_shuffled")] + pairs
        comparisons = {f"{a}_vs_{b}": paired_comparison(nll[a], nll[b], indices, level) for a, b in pairs}
        gaps = {f"{a}_vs_best_static": gap_closed(rows_out[a]["ppl"], rows_out["best_static"]["ppl"], dense_row["ppl"])
                for a in ("policy", "surprise") if a in rows_out}
        entries.append({"budget": budget, "schedules": rows_out, "comparisons": comparisons, "gap_closed": gaps})
    data = {
        "kind": "sweep",
        "protocol": {
            "windows": int(windows.shape[0]), "context_length": context_length, "controlled_steps": steps,
            "schedules": "each at the target budget itself (not matched to another schedule)",
            "best_static": "searched on validation windows (search_best_static), never on these",
            "surprise": "the best static pair, the cheap action placed on the least surprising tokens (online)",
            "random": f"mean NLL per window over {random_seeds} seeds",
            "policy": "greedy (argmax) under its budget guard" if policy else None,
            "policy_shuffled": "the policy's own actions, each window's steps permuted (placement test)" if policy else None,
            "budget_guard": budget_guard, "tolerance": BUDGET_TOLERANCE,
            "bootstrap": {"resamples": resamples, "level": level, "unit": "window", "seed": seed},
            "action_grid": {"attention_keep": list(space.attention_keep), "activation_keep": list(space.activation_keep),
                            "bits": list(space.bits), "sparse_inputs": list(model.sol_config.sparse_inputs)},
        },
        "dense": dense_row,
        "budgets": entries,
        "elapsed_s": time.perf_counter() - started,
    }
    if metadata:
        data["metadata"] = metadata
    return EvaluationResult(data)


def best_static_from(data: dict[str, Any]) -> dict[float, StaticSchedule]:
    """The best static schedules an earlier sweep document used, by budget."""
    out = {}
    for entry in data["budgets"]:
        a = entry["schedules"]["best_static"]["actions"]
        out[entry["budget"]] = StaticSchedule(a["low"], a["high"], a["validation_ppl"], a["validation_cost"], a["candidates"])
    return out


def _run_policy(model, chunk, context_length, targets, budget_guard, add, budget, dense_nll, shuffle_seed) -> None:
    """The policy's run and its shuffled replay on one batch of windows (and the dense NLL, where
    ``dense_nll`` is a list to append to)."""
    controller = PolicyController(model.policy, budget_guard=budget_guard)
    run = run_episodes(model, chunk, context_length, controller, targets, with_dense=dense_nll is not None)
    add(budget, "policy", run)
    if dense_nll is not None:
        dense_nll.append(-run.dense_token_log_probs.double().mean(-1).cpu())
    shuffled = ScheduleController(model.space, _shuffled(run.actions, shuffle_seed))
    add(budget, "policy_shuffled", run_episodes(model, chunk, context_length, shuffled, targets))


def _reuse_baselines(baselines: dict[str, Any], dense: torch.Tensor, collected: dict) -> None:
    """Put the non-learned rows of an earlier sweep into ``collected`` (per-window NLL, and each
    row's mean cost for every window), after checking it scored the same windows."""
    earlier_dense = torch.tensor(baselines["dense"]["window_nll"], dtype=torch.float64)
    if earlier_dense.shape != dense.shape or not torch.allclose(earlier_dense, dense, rtol=0, atol=1e-4):
        raise ValueError("baselines were measured on other windows: the dense model's per-window NLL differs")
    for entry in baselines["budgets"]:
        for name, row in entry["schedules"].items():
            if name in ("policy", "policy_shuffled"):
                continue
            window_nll = torch.tensor(row["window_nll"], dtype=torch.float64)
            cost = torch.full_like(window_nll, row["cost"])  # per-window costs are not stored: the mean stands in
            part = [(window_nll, cost)]
            if name == "random":
                collected[entry["budget"]]["random_seed_earlier"] = part
            else:
                collected[entry["budget"]][name] = part
                if name == "best_static":
                    collected[entry["budget"]]["_best_static_actions"] = row["actions"]


def sweep_markdown(data: dict[str, Any]) -> str:
    """A Markdown table of a sweep: perplexity (interval) and achieved cost per schedule and budget,
    then the paired differences (baseline minus candidate: > 0 means the candidate is better)."""
    present = [s for s in _ORDER if any(s in e["schedules"] for e in data["budgets"])]
    lines = [f"Dense perplexity: {data['dense']['ppl']:.3f}. {data['protocol']['windows']} held-out windows, "
             f"{data['protocol']['controlled_steps']} controlled steps each.", "",
             "| budget | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for entry in data["budgets"]:
        cells = []
        for name in present:
            row = entry["schedules"].get(name)
            if row is None:
                cells.append("")
                continue
            flag = "" if row["within_tolerance"] else " (off target)"
            cells.append(f"{row['ppl']:.2f} [{row['ppl_ci'][0]:.2f}, {row['ppl_ci'][1]:.2f}] @ {row['cost']:.3f}{flag}")
        lines.append(f"| {entry['budget']:g} | " + " | ".join(cells) + " |")
    lines += ["", "| budget | comparison | ppl difference | 95 % interval | P(candidate better) |", "|---|---|---|---|---|"]
    for entry in data["budgets"]:
        for name, c in entry["comparisons"].items():
            low, high = c["ppl_difference_ci"]
            lines.append(f"| {entry['budget']:g} | {name.replace('_vs_', ' vs ')} | {c['ppl_difference']:+.3f} | "
                         f"[{low:+.3f}, {high:+.3f}] | {c['p_candidate_better']:.2f} |")
    lines += ["", "Best static schedules (searched on validation windows):", ""]
    for entry in data["budgets"]:
        actions = entry["schedules"]["best_static"]["actions"]
        lines.append(f"- {entry['budget']:g}: {actions['actions']} (validation ppl {actions['validation_ppl']:.2f})")
    return "\n".join(lines) + "\n"
