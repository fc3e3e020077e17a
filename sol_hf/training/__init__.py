"""Training SOL policies with GRPO on teacher-forced counterfactual compute schedules (TRL)."""

from .config import BUDGET_MODES, SolGRPOConfig
from .rewards import budget_penalty, discounted_returns, episode_means, group_advantages, priced_rewards, step_rewards
from .run import DEFAULT_GRID, RECIPE, split_texts, train_policy, windows_dataset
from .trainer import SolGRPOTrainer, SolPolicyTrainingModel, sample_budget_targets, sol_episode_reward
from .warm_start import warm_start_policy

__all__ = [
    "SolGRPOConfig",
    "SolGRPOTrainer",
    "SolPolicyTrainingModel",
    "BUDGET_MODES",
    "DEFAULT_GRID",
    "RECIPE",
    "train_policy",
    "warm_start_policy",
    "windows_dataset",
    "split_texts",
    "sample_budget_targets",
    "sol_episode_reward",
    "step_rewards",
    "priced_rewards",
    "discounted_returns",
    "episode_means",
    "budget_penalty",
    "group_advantages",
]
