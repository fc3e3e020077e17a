"""Supervised warm start: teach a policy *where* the best static mixture's cheap steps belong.

The best static schedule at a budget mixes two actions, ``low`` (cheap) and ``high``, in a fixed
share and is blind to the text. The oracle places the same mixture by hindsight: it measures each
controlled step's *sensitivity*, the increase of the window's total NLL when only that step takes
``low`` and every other step takes ``high`` (relative to all ``high``; the effect on later tokens
through the KV cache included), and gives ``low`` to the least sensitive steps. The policy is then
trained by cross-entropy to play the oracle's actions from what it observes online; GRPO can
start from there (``train_policy(..., warm_start_updates=N)``).

One update, for a batch of B windows of ``context_length + T + 1`` tokens:

1. :func:`step_sensitivities`: one batched :func:`~sol_hf.episodes.run_episodes` call with
   ``T + 1`` rows per window (row 0 all ``high``; row ``t + 1`` takes ``low`` at step ``t`` only).
2. Each window draws a budget among those of ``best_static``; :func:`low_share` is the share of
   ``low`` steps whose mean cost meets it; :func:`oracle_schedule` gives ``low`` to the
   ``round(share * T)`` least sensitive steps.
3. :func:`imitation_episodes` runs the policy over the windows at their budgets while the oracle
   schedule is played (:class:`ScheduledPolicyController`), recording the policy's observations;
   :func:`imitation_loss` is the mean negative log-probability (the policy's own distribution over
   the action grid: no budget guard, temperature 1) of the oracle's actions. AdamW updates the
   policy only; the base model stays frozen.

The observations of step 3 depend on the schedule played, never on the policy's outputs, so an
:class:`OracleBatch` can be scored again after training (tests do).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..budget import parse_compute_budget
from ..episodes import run_episodes
from ..modeling import SolForCausalLM
from ..policy import DecisionContext, PolicyController, PolicyObservation, ScheduleController, SolPolicy

__all__ = [
    "OracleBatch",
    "ScheduledPolicyController",
    "step_sensitivities",
    "low_share",
    "oracle_schedule",
    "oracle_batch",
    "imitation_episodes",
    "imitation_loss",
    "warm_start_policy",
]


class ScheduledPolicyController(PolicyController):
    """Runs the policy step by step (its cache and observations advance as in a real run) but
    plays a given schedule instead of the policy's choice: teacher forcing for the actions.

    Args:
        policy: the policy whose observations are recorded.
        schedule: (R, T) int64 actions to play, one row per episode row.
    """

    def __init__(self, policy: SolPolicy, schedule: torch.Tensor):
        super().__init__(policy, do_sample=False, budget_guard=None)
        self.player = ScheduleController(policy.space, schedule)  # validates the schedule

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        super().decide(ctx)  # policy step: cache and last_log_probs as in a greedy run
        return self.player.decide(ctx)


@dataclass
class OracleBatch:
    """One batch of windows with their oracle schedules and the policy's observations under them.

    Attributes:
        budgets: (B,) float cost budget of each window.
        low, high: (B,) int64 the best static pair at each window's budget.
        sensitivity: (B, T) float64 NLL increase (nats, summed over the window) when only step t
            takes ``low``, relative to all ``high``.
        actions: (B, T) int64 the oracle schedule.
        observations: the policy's observations along the oracle schedule, fields (B, T, ...).
        cost: (B,) mean achieved cost of the oracle schedule (policy overhead included).
    """

    budgets: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    sensitivity: torch.Tensor
    actions: torch.Tensor
    observations: PolicyObservation
    cost: torch.Tensor


def _steps(windows: torch.Tensor, context_length: int) -> int:
    if windows.dim() != 2:
        raise ValueError(f"windows must be (B, L) token ids, got shape {tuple(windows.shape)}")
    steps = windows.shape[1] - context_length - 1
    if steps < 1:
        raise ValueError(f"windows of {windows.shape[1]} tokens leave no controlled step after a {context_length}-token context")
    return steps


def step_sensitivities(model: SolForCausalLM, windows: torch.Tensor, context_length: int,
                       low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Each controlled step's sensitivity to ``low``, in one batched episode run.

    Args:
        windows: (B, context_length + T + 1) token ids.
        low, high: (B,) int64 action indices per window.
    Returns:
        (B, T) float64: total NLL of the window's T tokens with ``low`` at step t only (``high``
        elsewhere) minus the total NLL with ``high`` everywhere.
    """
    steps = _steps(windows, context_length)
    batch = windows.shape[0]
    probe = torch.zeros(steps + 1, steps, dtype=torch.bool)  # (T+1, T): row t+1 probes step t
    probe[torch.arange(1, steps + 1), torch.arange(steps)] = True
    schedule = torch.where(probe.unsqueeze(0), low.view(-1, 1, 1).cpu(), high.view(-1, 1, 1).cpu())
    run = run_episodes(model, windows, context_length, ScheduleController(model.space, schedule.reshape(-1, steps)),
                       parse_compute_budget(1.0, batch), repeats=steps + 1)
    total = (-run.token_log_probs.double()).sum(-1).view(batch, steps + 1).cpu()
    return total[:, 1:] - total[:, :1]


def low_share(model: SolForCausalLM, context_length: int, steps: int, low: int, high: int, budget: float) -> float:
    """Share of steps taking ``low`` (the rest ``high``) whose mean cost meets ``budget``, in [0, 1].

    Costs are the cost table's (policy overhead included: the policy plays the schedule) averaged
    over the T steps' lengths ``context_length + 1 .. context_length + T``. 0 when the two actions
    cost the same.
    """
    lengths = torch.arange(context_length + 1, context_length + steps + 1)
    costs = model.cost_model.cost_table(lengths, True).double().mean(0)  # (N,)
    c_low, c_high = float(costs[low]), float(costs[high])
    if c_high - c_low <= 1e-9:
        return 0.0
    return min(1.0, max(0.0, (c_high - budget) / (c_high - c_low)))


def oracle_schedule(sensitivity: torch.Tensor, low: torch.Tensor, high: torch.Tensor, n_low: torch.Tensor) -> torch.Tensor:
    """(B, T) sensitivities, (B,) actions and (B,) counts -> (B, T) int64 schedule: ``low`` at each
    row's ``n_low`` least sensitive steps (ties: the earlier step), ``high`` elsewhere."""
    rank = sensitivity.argsort(dim=1, stable=True).argsort(dim=1)
    return torch.where(rank < n_low.view(-1, 1), low.view(-1, 1), high.view(-1, 1)).long()


def imitation_episodes(model: SolForCausalLM, windows: torch.Tensor, context_length: int, schedule: torch.Tensor,
                       budgets: torch.Tensor):
    """Play ``schedule`` (B, T) over ``windows`` at per-window ``budgets`` (B,) while the policy
    runs alongside; returns the :class:`~sol_hf.episodes.EpisodeBatch` with its observations."""
    controller = ScheduledPolicyController(model.policy, schedule)
    return run_episodes(model, windows, context_length, controller, parse_compute_budget(budgets.float(), windows.shape[0]))


def _check_best_static(best_static: Mapping) -> list[float]:
    if not best_static:
        raise ValueError("best_static is empty: run sol_hf.evaluation.search_best_static first")
    budgets = sorted(float(b) for b in best_static)
    for b in budgets:
        if math.isnan(b) or not (0.0 < b <= 1.0):
            raise ValueError(f"budgets of best_static must lie in (0, 1], got {b}")
    return budgets


def oracle_batch(model: SolForCausalLM, windows: torch.Tensor, context_length: int, best_static: Mapping,
                 budgets: torch.Tensor) -> OracleBatch:
    """Steps 1-3 of the module docstring for ``windows`` (B, L) at ``budgets`` (B,), each a key of
    ``best_static`` (``{budget: StaticSchedule}``)."""
    steps = _steps(windows, context_length)
    _check_best_static(best_static)
    by_budget = {float(b): s for b, s in best_static.items()}
    missing = sorted({float(b) for b in budgets} - set(by_budget))
    if missing:
        raise ValueError(f"budgets {missing} are not keys of best_static")
    pairs = [by_budget[float(b)] for b in budgets]
    low = torch.tensor([p.low for p in pairs], dtype=torch.long)
    high = torch.tensor([p.high for p in pairs], dtype=torch.long)
    sensitivity = step_sensitivities(model, windows, context_length, low, high)
    n_low = torch.tensor([round(low_share(model, context_length, steps, p.low, p.high, float(b)) * steps)
                          for p, b in zip(pairs, budgets)])
    actions = oracle_schedule(sensitivity, low, high, n_low)
    run = imitation_episodes(model, windows, context_length, actions, budgets)
    return OracleBatch(budgets.double(), low, high, sensitivity, actions, run.observations,
                       run.step_cost.double().mean(-1).cpu())


def imitation_loss(policy: SolPolicy, batch: OracleBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(scalar loss with grad, scalar accuracy): the mean negative log-probability of the oracle's
    actions under the policy (its joint distribution over the grid, no guard, temperature 1) and
    the share of steps where the policy's most likely action is the oracle's."""
    obs = batch.observations
    device = next(policy.parameters()).device
    log_probs = policy(PolicyObservation(*(None if f is None else f.to(device) for f in (
        obs.hidden, obs.token_embedding, obs.features, obs.previous_action, obs.lm_confidence))))  # (B, T, N)
    actions = batch.actions.to(device)
    loss = -log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1).mean()
    accuracy = (log_probs.detach().argmax(-1) == actions).float().mean()
    return loss, accuracy


def _draw(windows: torch.Tensor, budgets: list[float], batch_size: int, generator: torch.Generator):
    """A batch of windows (without replacement within the batch) and one budget per window."""
    pick = torch.randperm(windows.shape[0], generator=generator)[:batch_size]
    chosen = torch.randint(len(budgets), (pick.shape[0],), generator=generator)
    return windows[pick], torch.tensor(budgets, dtype=torch.float64)[chosen]


def warm_start_policy(
    model: SolForCausalLM,
    windows: torch.Tensor,
    context_length: int,
    best_static: Mapping,
    *,
    updates: int,
    batch_size: int = 4,
    learning_rate: float = 5e-4,
    max_grad_norm: float | None = 2.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model.policy`` to imitate the oracle placement of the best static mixture.

    Args:
        model: the :class:`SolForCausalLM`; only its policy changes.
        windows: (N, context_length + T + 1) training token ids (never held-out text).
        best_static: ``{budget: StaticSchedule}`` from :func:`sol_hf.evaluation.search_best_static`
            (``low`` is the cheap action, ``high`` the dear one); each window of an update draws
            one of its budgets uniformly.
        updates: AdamW steps, each on ``batch_size`` windows drawn at random (seeded by ``seed``).
        learning_rate, max_grad_norm: AdamW learning rate and gradient-norm clip (None: no clip).
        progress: print one line per update.
    Returns:
        ``{"updates": [...], "budgets": [...], "wall_s": ...}``; each update's entry holds ``loss``
        (mean NLL of the oracle's actions, before the step), ``accuracy`` (share of steps where the
        policy's most likely action is the oracle's, before the step), ``sensitivity_spread``
        (mean over windows of the standard deviation of the T sensitivities, nats),
        ``low_share`` (mean share of ``low`` steps), ``oracle_cost`` (mean achieved cost) and
        ``seconds``.

    Before GRPO: ``train_policy(..., warm_start_updates=N)`` does this after building the model
    (best static searched on training windows), or by hand::

        best = search_best_static(model, train_windows[:16], context_length, budgets)
        warm_start_policy(model, train_windows, context_length, best, updates=N)
        SolGRPOTrainer(model, args, ...).train()
    """
    budgets = _check_best_static(best_static)
    _steps(windows, context_length)
    if updates < 1 or batch_size < 1:
        raise ValueError(f"updates and batch_size must be >= 1, got {updates} and {batch_size}")
    policy = model.policy
    optimizer = torch.optim.AdamW(policy.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    log: list[dict[str, float]] = []
    started = time.perf_counter()
    was_training = policy.training
    policy.train()
    try:
        for update in range(updates):
            t0 = time.perf_counter()
            chunk, chunk_budgets = _draw(windows, budgets, batch_size, generator)
            batch = oracle_batch(model, chunk, context_length, best_static, chunk_budgets)
            loss, accuracy = imitation_loss(policy, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
            optimizer.step()
            entry = {
                "loss": loss.item(), "accuracy": accuracy.item(),
                "sensitivity_spread": float(batch.sensitivity.std(dim=1).mean()) if batch.sensitivity.shape[1] > 1 else 0.0,
                "low_share": float(((batch.actions == batch.low.view(-1, 1)) & (batch.low != batch.high).view(-1, 1)).double().mean()),
                "oracle_cost": float(batch.cost.mean()), "seconds": time.perf_counter() - t0,
            }
            log.append(entry)
            if progress:
                print(f"warm start {update + 1}/{updates}: loss {entry['loss']:.4f}, accuracy {entry['accuracy']:.3f}, "
                      f"sensitivity spread {entry['sensitivity_spread']:.4f}, {entry['seconds']:.1f} s", flush=True)
    finally:
        policy.train(was_training)
    return {"updates": log, "budgets": budgets, "wall_s": time.perf_counter() - started}
