"""Compute budgets: parsing what users pass, and tracking what each row has spent.

A budget is one of
  * a float in (0, 1]: the target average cost fraction of the controlled decode steps;
  * a 1-D tensor/list of such floats, one per batch row;
  * a dict of per-axis nominal targets, as the paper: ``{"attention": 0.5, "activation": 0.7, "bits": 8}``
    (axes left out stay dense).

Internally every budget becomes a (B, 4) target tensor over the dimensions
``("cost", "attention", "activation", "bits")`` plus a (B, 4) bool telling which are set; bits are
stored as ``bits / 16`` so every dimension lives in (0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

__all__ = ["BUDGET_AXES", "BudgetTargets", "parse_compute_budget", "BudgetTracker", "NUM_BUDGET_FEATURES"]

BUDGET_AXES = ("cost", "attention", "activation", "bits")
AXIS_KEYS = ("attention", "activation", "bits")
NUM_BUDGET_FEATURES = 1 + 3 * len(BUDGET_AXES)


@dataclass
class BudgetTargets:
    """Per-row targets. ``values`` (B, 4) float32 in (0, 1]; ``is_set`` (B, 4) bool."""

    values: torch.Tensor
    is_set: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.values.shape[0]

    @property
    def is_dense(self) -> torch.Tensor:
        """(B,) bool: rows whose every set target is 1.0 (full budget: run the base model)."""
        return ((self.values >= 1.0) | ~self.is_set).all(-1)

    def repeat_interleave(self, repeats: int) -> "BudgetTargets":
        return BudgetTargets(self.values.repeat_interleave(repeats, 0), self.is_set.repeat_interleave(repeats, 0))


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1] (1.0 = dense), got {value}")
    return value


def parse_compute_budget(budget: object, batch_size: int, device: torch.device | str = "cpu") -> BudgetTargets | None:
    """Turn a user's ``compute_budget`` into :class:`BudgetTargets`; ``None`` means dense.

    Raises a ``TypeError``/``ValueError`` naming ``compute_budget`` for anything malformed.
    """
    if budget is None:
        return None
    values = torch.ones(batch_size, len(BUDGET_AXES), dtype=torch.float32)
    is_set = torch.zeros(batch_size, len(BUDGET_AXES), dtype=torch.bool)
    if isinstance(budget, dict):
        if not budget:
            raise ValueError("compute_budget dict is empty; give at least one of 'attention', 'activation', 'bits'")
        if "mlp" in budget:
            raise ValueError(
                "compute_budget['mlp'] was renamed 'activation' in sol_hf's format 2: the axis keeps a fraction of "
                "the input channels of every projection SolConfig.sparse_inputs names (the MLP input alone under "
                "SolConfig.from_preset('paper')). Pass {'activation': ...}."
            )
        unknown = sorted(set(budget) - set(AXIS_KEYS))
        if unknown:
            raise ValueError(
                f"compute_budget has unknown axes {unknown}; per-axis budgets take 'attention' (keep fraction), "
                f"'activation' (keep fraction) and 'bits' (2..16). For a unified cost budget pass a float."
            )
        for key, value in budget.items():
            col = BUDGET_AXES.index(key)
            if key == "bits":
                if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
                    raise TypeError(f"compute_budget['bits'] must be a number of bits in [2, 16], got {value!r}")
                if not (2 <= float(value) <= 16):
                    raise ValueError(f"compute_budget['bits'] must lie in [2, 16], got {value}")
                values[:, col] = float(value) / 16.0
            else:
                values[:, col] = _check_fraction(f"compute_budget['{key}']", value)
            is_set[:, col] = True
    elif isinstance(budget, (torch.Tensor, list, tuple)):
        tensor = torch.as_tensor(budget, dtype=torch.float32) if not isinstance(budget, torch.Tensor) else budget
        if tensor.dim() == 0:
            return parse_compute_budget(float(tensor), batch_size, device)
        if tensor.dim() != 1 or tensor.shape[0] != batch_size:
            raise ValueError(
                f"compute_budget tensor must have shape ({batch_size},), one budget per batch row; got {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            tensor = tensor.float()
        cpu = tensor.detach().float().cpu()  # validation happens once, before decoding
        if torch.isnan(cpu).any() or (cpu <= 0).any() or (cpu > 1).any():
            raise ValueError(f"compute_budget values must lie in (0, 1] (1.0 = dense), got {cpu.tolist()}")
        values[:, 0] = cpu
        is_set[:, 0] = True
    elif isinstance(budget, str):
        raise TypeError(f"compute_budget must be a float in (0, 1], a per-row tensor or a per-axis dict, got the string {budget!r}")
    else:
        values[:, 0] = _check_fraction("compute_budget", budget)
        is_set[:, 0] = True
    return BudgetTargets(values.to(device), is_set.to(device))


class BudgetTracker:
    """Running per-row spend over the controlled steps; all tensors stay on the device.

    ``spent`` (B, 4) sums the achieved cost fraction, attention keep, activation keep and bits/16 of
    every controlled step so far. The count of controlled steps is kept twice: ``count``, a 0-d
    float64 device tensor that the device math reads (a captured CUDA graph or a compiled step
    replays reading its current value, where a Python int would be baked in as a constant), and
    ``steps``, the same count as a host int for the host's loop (the report, a controller's step
    index). They advance together in :meth:`update`.
    """

    def __init__(self, targets: BudgetTargets, max_steps: int):
        self.targets = targets
        self.max_steps = max(int(max_steps), 1)
        self.spent = torch.zeros_like(targets.values, dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64, device=targets.values.device)
        self.steps = 0

    def requirement(self) -> torch.Tensor:
        """(B, 4): what this step should spend so the running mean lands on target."""
        return (self.targets.values.double() * (self.count + 1) - self.spent).float()

    def features(self) -> torch.Tensor:
        """(B, 13) policy features: progress, then (target, is_set, running mean - target) per dimension."""
        targets = self.targets.values
        is_set = self.targets.is_set.float()
        deviation = torch.where(self.count > 0, self._mean().float() - targets, 0.0)
        progress = ((self.count + 1) / self.max_steps).float().expand_as(targets[:, :1])
        return torch.cat([progress, targets, is_set, deviation * is_set], dim=-1)

    def update(self, cost: torch.Tensor, attention_keep: torch.Tensor, activation_keep: torch.Tensor, bits: torch.Tensor) -> None:
        """Add one step's achieved (B,) values."""
        step = torch.stack([cost.double(), attention_keep.double(), activation_keep.double(), bits.double() / 16.0], dim=-1)
        self.spent += step
        self.count += 1
        self.steps += 1

    def means(self) -> torch.Tensor:
        """(B, 4) achieved means over the controlled steps (ones if none)."""
        return torch.where(self.count > 0, self._mean(), 1.0)

    def _mean(self) -> torch.Tensor:
        """(B, 4) ``spent / count`` (zeros before the first step)."""
        return self.spent / self.count.clamp_min(1)
