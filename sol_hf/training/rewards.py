"""GRPO reward arithmetic for counterfactual compute schedules (pure tensor functions).

Shapes: ``R = B * K`` rollout rows, b-major (row ``b * K + k`` is window ``b``, schedule ``k``),
``T`` controlled steps. Every function here is deterministic and has no trainer state, so the
unit tests check them against values worked out by hand.

The pipeline, as the authors' ``train.py`` (sol-method.md §3.4-3.6):

1. :func:`step_rewards` -- ``r_t = log p(x_{t+1})`` under the controlled step (``"loglik"``) or
   ``-KL(p_dense || p_controlled)`` (``"neg_kl"``).
   :func:`priced_rewards` optionally subtracts a per-step price on the step's cost (not in the
   authors' code: a Lagrangian term that gives each step its own cost signal).
2. :func:`discounted_returns` -- reward-to-go ``G_t = sum_{k>=t} gamma^(k-t) r_k``.
3. :func:`budget_penalty` -- per episode, ``sum_d w_d * max(|mean_d - target_d| - tol, 0)^2`` over
   the set budget dimensions; subtracted from every step's return.
4. :func:`group_advantages` -- process level (per step, relative to the K schedules of the same
   window) or outcome level (one number per episode), center or z-score, then optional global
   whitening over the whole batch.
"""

from __future__ import annotations

import torch

__all__ = [
    "REWARD_TYPES",
    "ADVANTAGE_LEVELS",
    "ADVANTAGE_NORMALIZATIONS",
    "step_rewards",
    "priced_rewards",
    "discounted_returns",
    "episode_means",
    "budget_penalty",
    "group_advantages",
]

REWARD_TYPES = ("loglik", "neg_kl")
ADVANTAGE_LEVELS = ("process", "outcome")
ADVANTAGE_NORMALIZATIONS = ("center", "zscore")


def step_rewards(
    token_log_probs: torch.Tensor, dense_kl: torch.Tensor | None = None, reward_type: str = "loglik"
) -> torch.Tensor:
    """Per-step rewards (R, T).

    Args:
        token_log_probs: (R, T) log-probability of each true next token under the controlled step.
        dense_kl: (R, T) ``KL(p_dense || p_controlled)`` of each step (needed for ``"neg_kl"``).
        reward_type: ``"loglik"`` (the authors' official reward) or ``"neg_kl"``.
    """
    if reward_type == "loglik":
        return token_log_probs.float()
    if reward_type == "neg_kl":
        if dense_kl is None:
            raise ValueError("reward_type='neg_kl' needs the per-step KL to the dense model (run_episodes(with_dense=True))")
        return -dense_kl.float()
    raise ValueError(f"reward_type must be one of {REWARD_TYPES}, got {reward_type!r}")


def priced_rewards(rewards: torch.Tensor, step_cost: torch.Tensor, price: float) -> torch.Tensor:
    """(R, T) rewards minus ``price`` times each step's achieved cost fraction (R, T).

    With the budget guard every sampled schedule stays near its budget, so the episode-level
    budget penalty rarely fires and each step's reward only ever favours the costlier action. A
    price makes a cheaper action win exactly where the reward it loses is below
    ``price * (cost saved)``: where it hurts least. ``price = 0`` returns the rewards unchanged.
    """
    if not (price >= 0.0 and price < float("inf")):
        raise ValueError(f"price must be a finite number >= 0, got {price}")
    if price == 0.0:
        return rewards.float()
    return rewards.float() - price * step_cost.float()


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """(R, T) rewards -> (R, T) reward-to-go ``G_t = r_t + gamma * G_{t+1}`` (``G_T = 0``).

    ``gamma = 0`` gives the raw per-step rewards (the authors' "no aggregation")."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    out = torch.empty_like(rewards, dtype=torch.float32)
    running = torch.zeros_like(rewards[:, 0], dtype=torch.float32)
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t].float() + gamma * running
        out[:, t] = running
    return out


def episode_means(step_cost: torch.Tensor, attention_keep: torch.Tensor, activation_keep: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """(R, T) per-step achieved values -> (R, 4) episode means over the budget dimensions
    ``(cost, attention, activation, bits / 16)`` (the layout of :class:`sol_hf.budget.BudgetTargets`)."""
    return torch.stack(
        [step_cost.float().mean(-1), attention_keep.float().mean(-1), activation_keep.float().mean(-1), bits.float().mean(-1) / 16.0],
        dim=-1,
    )


def budget_penalty(
    achieved: torch.Tensor,
    targets: torch.Tensor,
    is_set: torch.Tensor,
    weights: torch.Tensor | tuple[float, ...],
    tolerance: float = 0.02,
) -> torch.Tensor:
    """Symmetric squared hinge on each episode's mean vs its target (the authors' "huber").

    ``penalty = sum_d w_d * is_set_d * max(|achieved_d - target_d| - tolerance, 0)^2``.

    Args:
        achieved: (R, 4) episode means (see :func:`episode_means`).
        targets: (R, 4) targets in the same units; is_set: (R, 4) bool.
        weights: (4,) per-dimension weights (cost, attention, activation, bits); 0 disables a dimension.
    Returns:
        (R,) float32, >= 0. Under-spending is punished exactly like over-spending.
    """
    w = torch.as_tensor(weights, dtype=torch.float32, device=achieved.device)
    gap = (achieved.float() - targets.float()).abs()
    hinge = torch.clamp(gap - tolerance, min=0.0) ** 2
    return (hinge * is_set.float() * w).sum(-1)


def group_advantages(
    returns: torch.Tensor,
    group_size: int,
    level: str = "process",
    normalization: str = "center",
    whiten: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages (R, T) from penalised returns (R, T).

    Args:
        returns: (R, T) ``G_t - penalty`` per row and step, rows b-major in groups of ``group_size``.
        level: ``"process"`` -- each step's return relative to the same step of the group's other
            schedules (the authors' official choice); ``"outcome"`` -- one number per episode
            (``returns[:, 0]``, i.e. ``G_0 - penalty``; with ``gamma = 1`` the undiscounted sum)
            relative to the group, broadcast to every step.
        normalization: ``"center"`` subtracts the group mean; ``"zscore"`` also divides by the
            group's standard deviation (population std, plus ``eps``).
        whiten: finally z-score all advantages of the batch together (the authors' ``adv_whiten_global``).
    """
    rows, steps = returns.shape
    if group_size < 1 or rows % group_size:
        raise ValueError(f"{rows} rows do not split into groups of {group_size} schedules")
    if level not in ADVANTAGE_LEVELS:
        raise ValueError(f"advantage level must be one of {ADVANTAGE_LEVELS}, got {level!r}")
    if normalization not in ADVANTAGE_NORMALIZATIONS:
        raise ValueError(f"advantage normalization must be one of {ADVANTAGE_NORMALIZATIONS}, got {normalization!r}")
    values = returns.float() if level == "process" else returns[:, :1].float()
    grouped = values.view(rows // group_size, group_size, -1)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if normalization == "zscore":
        adv = adv / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    adv = adv.reshape(rows, -1).expand(rows, steps)
    if whiten:
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + eps)
    return adv.contiguous()
