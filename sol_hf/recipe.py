"""The training recipe of the documented result, in one place.

``RECIPE`` holds the settings of the policy behind docs/results.md's headline result (the issue-4
result: SmolLM2-135M, trained on library / howto / whatsnew, evaluated on held-out tutorial /
faq / reference; measured 2026-11-28). It is the single source of the defaults of
:func:`sol_hf.training.train_policy`, of ``sol-hf train`` and of ``examples/train_smollm2.py``
(tested: ``tests/test_recipe.py``). ``sol-hf demo`` starts from it and deliberately trains less
(``DEMO_TRAINING``).

Where each value comes from (docs/results.md, "The issue-4 result"): unified-cost budgets
(``budget_mode="cost"``, the range the policy can reach), a factorized action head, the 3x3x3 grid
(attention keep {0.1, 0.6, 1.0}, MLP-input keep {0.4, 0.8, 1.0}, MLP-output bits {5, 7, 16}),
context 256, 4 windows x 8 schedules x 16 controlled steps per update, 130 updates, lr 5e-4,
entropy bonus 0.01, budget guard 0.25, seed 0, every 10th training document held out for
validation, all training windows (7,254). Its reward is the authors' (log-likelihood, reward-to-go
discounted by 0.85, no cost price; the "result policy" row of the placement table) and the policy
does not read the base model's confidence. The result was trained with ``--threads 1`` (a run
setting, not part of the recipe). Settings of :class:`~sol_hf.training.SolGRPOConfig` not named
here (sampling temperature 1.3, gradient clipping 2.0, constant lr, penalty weights) were its
defaults then and are now.

This module imports nothing heavy, so ``sol-hf --help`` can show the defaults without torch.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from .data import TRAIN_SECTIONS

__all__ = ["RECIPE", "DEMO_TRAINING", "RECIPE_GRID"]

# The CPU-scaled grid of the documented run (3 x 3 x 3, the paper's axes: the activation axis
# prunes the MLP input only, bits fake-quantize the MLP output).
RECIPE_GRID = MappingProxyType({
    "attention_keep": (0.1, 0.6, 1.0),
    "activation_keep": (0.4, 0.8, 1.0),
    "bits": (5, 7, 16),
    "sparse_inputs": ("mlp_input",),
})

RECIPE: MappingProxyType[str, Any] = MappingProxyType({
    # data
    "sections": TRAIN_SECTIONS,
    "validation_every": 10,
    "max_windows": None,
    "context_length": 256,
    "rollout_steps": 16,
    # policy
    "grid": RECIPE_GRID,
    "action_head": "factorized",
    "observe_lm_confidence": False,
    # budgets
    "budget_mode": "cost",
    "cost_budget_range": None,
    "budget_guard": 0.25,
    # optimisation
    "steps": 130,
    "windows_per_step": 4,
    "num_generations": 8,
    "learning_rate": 5e-4,
    "entropy_coef": 0.01,
    "seed": 0,
    # reward
    "reward_type": "loglik",
    "reward_gamma": 0.85,
    "cost_price": 0.0,
})

# ``sol-hf demo``: the recipe trained briefly (20 updates instead of 130, context 128 instead of 256,
# at most 400 windows) with mixed per-axis / unified-cost budgets. A short demo, not the result's setting.
DEMO_TRAINING: MappingProxyType[str, Any] = MappingProxyType(
    {**RECIPE, "steps": 20, "context_length": 128, "max_windows": 400, "budget_mode": "mixed"}
)
