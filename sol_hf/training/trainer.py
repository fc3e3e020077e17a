"""SolGRPOTrainer: GRPO over counterfactual compute schedules, as a TRL ``GRPOTrainer``.

What changes relative to TRL's GRPO (and nothing else):

* ``_generate_and_score_completions`` -- instead of sampling token completions, each window
  (``context_length + T + 1`` tokens) is prefilled densely once, its cache is replicated K times,
  and the policy samples K action schedules over T teacher-forced steps in one batch of B x K rows
  (:func:`sol_hf.episodes.run_episodes`). Per-step rewards, discounted returns, the budget
  penalty and group-relative (B*K, T) advantages come from :mod:`sol_hf.training.rewards`.
* ``compute_loss`` -- the policy's log-probabilities of the sampled actions are recomputed with
  grad in one parallel pass over the stored observations (``SolPolicy.forward``), under the same
  guard mask and temperature the actions were drawn with; PPO-clip with ``args.epsilon`` plus
  ``args.entropy_coef`` times the entropy.
* Saving -- checkpoints and the final output are policy artifacts (``sol_config.json``,
  ``policy.safetensors``, ``README.md``); resuming reloads the policy from them, and the Trainer
  restores the optimizer, scheduler, RNG states and step.

The model the Trainer sees is :class:`SolPolicyTrainingModel`, a ``PreTrainedModel`` whose only
parameters are the policy's (the frozen base model is held outside the module tree), so the
optimizer, DDP, ``state_dict`` and gradient clipping touch the policy and nothing else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from trl import GRPOTrainer

from ..budget import BudgetTargets
from ..episodes import run_episodes
from ..modeling import SolForCausalLM
from ..policy import PolicyController, PolicyObservation
from .config import SolGRPOConfig
from .rewards import budget_penalty, discounted_returns, episode_means, group_advantages, priced_rewards, step_rewards

__all__ = ["SolGRPOTrainer", "SolPolicyTrainingModel", "sol_episode_reward", "sample_budget_targets"]


def sol_episode_reward(completions=None, **kwargs):
    """Placeholder reward function for TRL (which requires ``reward_funcs``).

    SOL's rewards are not a function of generated text: they are the per-step log-likelihoods
    of the true tokens under each compute schedule (or -KL to the dense model), computed inside
    :meth:`SolGRPOTrainer._generate_and_score_completions`. TRL never calls this function there;
    calling it directly is a mistake and raises.
    """
    raise RuntimeError(
        "sol_episode_reward is a placeholder: SolGRPOTrainer computes per-step rewards from its teacher-forced "
        "episodes (see sol_hf.training.rewards)"
    )


class SolPolicyTrainingModel(PreTrainedModel):
    """What ``transformers.Trainer`` trains: the policy, with the frozen SOL model beside it.

    ``self.policy`` is the only submodule (so ``parameters()``/``state_dict()`` hold the policy
    only); the :class:`SolForCausalLM` is reachable as ``self.sol_model`` but not registered.
    ``forward`` maps stored episodes to the log-probabilities of their actions.
    """

    config_class = PretrainedConfig
    base_model_prefix = "policy"
    main_input_name = "features"
    _no_split_modules: list[str] = []
    accepts_loss_kwargs = False

    def __init__(self, sol_model: SolForCausalLM):
        config = PretrainedConfig.from_dict(sol_model.config.to_dict())
        super().__init__(config)
        self.policy = sol_model.policy
        object.__setattr__(self, "sol_model", sol_model)
        self.generation_config = GenerationConfig()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # the policy is initialised by SolPolicy itself
        return None

    def forward(
        self,
        hidden: torch.Tensor,
        token_embedding: torch.Tensor,
        features: torch.Tensor,
        previous_action: torch.Tensor,
        actions: torch.Tensor,
        allowed: torch.Tensor | None = None,
        temperature: float = 1.0,
        lm_confidence: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Episodes (R, T, ...) -> ((R, T) log-prob of ``actions``, (R, T) entropy) under the
        tempered, guard-masked distribution the actions were sampled from."""
        log_probs = self.policy(PolicyObservation(hidden, token_embedding, features, previous_action, lm_confidence))
        behaviour = PolicyController.behaviour_log_probs(log_probs, allowed, temperature)
        chosen = behaviour.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        finite = torch.where(torch.isfinite(behaviour), behaviour, torch.zeros_like(behaviour))  # no 0 * -inf
        entropy = -(behaviour.exp() * finite).sum(-1)
        return chosen, entropy


def _uniform(generator: torch.Generator | None, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def sample_budget_targets(
    n: int, args: SolGRPOConfig, cheapest_cost: float, sol_budget_range: tuple[float, float],
    generator: torch.Generator | None = None,
) -> BudgetTargets:
    """Per-window targets drawn as ``args.budget_mode`` says (uniform in each configured range).

    ``per_axis`` sets attention, MLP and bits (stored as bits/16); ``cost`` sets the unified cost
    fraction (range floored at ``cheapest_cost``); ``mixed`` picks one of the two per window.
    """
    values = torch.ones(n, 4)
    is_set = torch.zeros(n, 4, dtype=torch.bool)
    low, high = args.cost_budget_range or sol_budget_range
    low = min(max(low, cheapest_cost), high)
    values[:, 0] = _uniform(generator, n, low, high)
    values[:, 1] = _uniform(generator, n, *args.attention_budget_range)
    values[:, 2] = _uniform(generator, n, *args.activation_budget_range)
    values[:, 3] = _uniform(generator, n, *args.bits_budget_range) / 16.0
    if args.budget_mode == "cost":
        use_cost = torch.ones(n, dtype=torch.bool)
    elif args.budget_mode == "per_axis":
        use_cost = torch.zeros(n, dtype=torch.bool)
    else:
        use_cost = torch.rand(n, generator=generator) < 0.5
    is_set[:, 0] = use_cost
    is_set[:, 1:] = ~use_cost.unsqueeze(-1)
    values = torch.where(is_set, values, torch.ones_like(values))
    return BudgetTargets(values, is_set)


class SolGRPOTrainer(GRPOTrainer):
    """Train a :class:`~sol_hf.SolPolicy` with GRPO on teacher-forced counterfactual schedules.

    Args:
        model: the :class:`SolForCausalLM` whose ``policy`` is trained (its base stays frozen).
        args: a :class:`SolGRPOConfig`.
        train_dataset: a ``datasets.Dataset`` with an ``input_ids`` column of windows of
            ``args.window_length`` tokens (see :func:`sol_hf.training.windows_dataset`).
        processing_class: the base model's tokenizer (TRL requires one; it is only saved aside).
        reward_funcs: leave ``None``; TRL requires one, :func:`sol_episode_reward` is passed.
        callbacks, optimizers: as ``transformers.Trainer``.
    """

    _tag_names = ["trl", "grpo", "sol_hf"]

    def __init__(
        self,
        model: SolForCausalLM,
        args: SolGRPOConfig,
        train_dataset=None,
        processing_class=None,
        reward_funcs: Callable | list[Callable] | None = None,
        callbacks=None,
        optimizers=(None, None),
    ):
        if not isinstance(model, SolForCausalLM):
            raise TypeError(f"SolGRPOTrainer trains the policy of a SolForCausalLM, got {type(model).__name__}")
        if not isinstance(args, SolGRPOConfig):
            raise TypeError(f"args must be a SolGRPOConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("pass the base model's tokenizer as processing_class (TRL requires one)")
        if train_dataset is not None and "input_ids" not in train_dataset.column_names:
            raise ValueError(
                f"train_dataset needs an 'input_ids' column of {args.window_length}-token windows "
                f"(context_length + rollout_steps + 1); got columns {train_dataset.column_names}. "
                f"Build it with sol_hf.training.windows_dataset."
            )
        self.sol_model = model
        self.sol_model.eval()
        carrier = SolPolicyTrainingModel(model)
        super().__init__(
            model=carrier,
            reward_funcs=reward_funcs if reward_funcs is not None else [sol_episode_reward],
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        space = model.space
        weights = torch.tensor(args.budget_penalty_weights, dtype=torch.float32)
        # As the authors: an axis with a single grid level cannot be steered, so it is not penalised.
        for i, levels in enumerate((space.attention_keep, space.activation_keep, space.bits), start=1):
            if len(levels) < 2:
                weights[i] = 0.0
        self._penalty_weights = weights
        self._cheapest_cost = model.cost_model.cheapest_cost(args.context_length + 1, with_policy=True)

    # -- generation: counterfactual schedules ---------------------------------------------------
    def _windows_of(self, inputs: list[dict[str, Any]]) -> torch.Tensor:
        """TRL's generation batch (each window repeated K times in a row) -> (B, L) windows."""
        k = self.num_generations
        if len(inputs) % k:
            raise ValueError(f"generation batch of {len(inputs)} rows is not a whole number of groups of {k}")
        rows = [list(x["input_ids"]) for x in inputs]
        windows = torch.tensor(rows[::k], dtype=torch.long)
        for b in range(len(rows) // k):
            if any(rows[b * k + j] != rows[b * k] for j in range(1, k)):
                raise RuntimeError(
                    "a window's K schedules were split across the batch; per_device_train_batch_size * "
                    "steps_per_generation must be a multiple of num_generations"
                )
        expected = self.args.window_length
        if windows.shape[1] != expected:
            raise ValueError(
                f"windows have {windows.shape[1]} tokens; context_length + rollout_steps + 1 = {expected}"
            )
        return windows

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        args = self.args
        mode = "train" if self.model.training else "eval"
        start = time.perf_counter()
        windows = self._windows_of(inputs)
        k = self.num_generations
        targets = sample_budget_targets(
            windows.shape[0], args, self._cheapest_cost, self.sol_model.sol_config.budget_range
        )
        controller = PolicyController(
            self.sol_model.policy, do_sample=True, temperature=args.temperature, budget_guard=args.budget_guard
        )
        with torch.no_grad():
            batch = run_episodes(
                self.sol_model, windows, args.context_length, controller, targets, repeats=k,
                with_dense=args.reward_type == "neg_kl",
            )
            scored = self.score_episodes(batch)
        self._log_episodes(mode, batch, scored, time.perf_counter() - start)
        obs = batch.observations
        out = {
            "hidden": obs.hidden,
            "token_embedding": obs.token_embedding,
            "features": obs.features,
            "previous_action": obs.previous_action,
            "actions": batch.actions,
            "old_log_probs": batch.behaviour_log_probs,
            "advantages": scored["advantages"],
        }
        if batch.allowed is not None:
            out["allowed"] = batch.allowed
        if obs.lm_confidence is not None:
            out["lm_confidence"] = obs.lm_confidence
        return {name: t.to(self.accelerator.device) for name, t in out.items()}

    def score_episodes(self, batch) -> dict[str, torch.Tensor]:
        """Rewards, returns, penalties and (R, T) advantages of an :class:`EpisodeBatch`."""
        args = self.args
        rewards = step_rewards(batch.token_log_probs, batch.dense_kl, args.reward_type)
        returns = discounted_returns(priced_rewards(rewards, batch.step_cost, args.cost_price), args.reward_gamma)
        achieved = episode_means(batch.step_cost, batch.attention_keep, batch.activation_keep, batch.bits)
        penalty = budget_penalty(
            achieved, batch.targets.values, batch.targets.is_set, self._penalty_weights, args.budget_tolerance
        )
        advantages = group_advantages(
            returns - penalty.unsqueeze(-1), self.num_generations, args.advantage_level,
            args.advantage_normalization, args.whiten_advantages,
        )
        return {"rewards": rewards, "returns": returns, "achieved": achieved, "penalty": penalty, "advantages": advantages}

    def _log_episodes(self, mode: str, batch, scored: dict[str, torch.Tensor], seconds: float) -> None:
        metrics = self._metrics[mode]
        gather = self.accelerator.gather
        rewards = gather(scored["rewards"].mean(-1))
        metrics["reward"].append(rewards.mean().item())
        metrics["reward_std"].append(rewards.std().item() if rewards.numel() > 1 else 0.0)
        metrics["nll"].append(-gather(batch.token_log_probs.float().mean(-1)).mean().item())
        metrics["budget/penalty"].append(gather(scored["penalty"]).mean().item())
        achieved, targets = scored["achieved"], batch.targets
        gap = ((achieved - targets.values).abs() * targets.is_set).sum(0) / targets.is_set.sum(0).clamp_min(1)
        for i, name in enumerate(("cost", "attention", "activation", "bits")):
            metrics[f"budget/{name}"].append(gather(achieved[:, i]).mean().item())
            metrics[f"budget/{name}_abs_gap"].append(gather(gap[i : i + 1]).mean().item())
        metrics["episode_time"].append(seconds)

    # -- loss ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("SolGRPOTrainer does not return outputs")
        args = self.args
        log_probs, entropy = model(
            hidden=inputs["hidden"], token_embedding=inputs["token_embedding"], features=inputs["features"],
            previous_action=inputs["previous_action"], actions=inputs["actions"], allowed=inputs.get("allowed"),
            temperature=args.temperature, lm_confidence=inputs.get("lm_confidence"),
        )
        advantages = inputs["advantages"]
        ratio = torch.exp(log_probs - inputs["old_log_probs"])
        clipped = torch.clamp(ratio, 1.0 - self.epsilon_low, 1.0 + self.epsilon_high)
        surrogate = torch.minimum(ratio * advantages, clipped * advantages)
        loss = -surrogate.mean() - args.entropy_coef * entropy.mean()
        mode = "train" if self.model.training else "eval"
        with torch.no_grad():
            is_clipped = ((ratio < 1.0 - self.epsilon_low) & (advantages < 0)) | ((ratio > 1.0 + self.epsilon_high) & (advantages > 0))
            gather = self.accelerator.gather
            self._metrics[mode]["entropy"].append(gather(entropy.mean().reshape(1)).mean().item())
            self._metrics[mode]["clip_ratio"].append(gather(is_clipped.float().mean().reshape(1)).mean().item())
        return loss

    # -- saving and resuming: policy artifacts only -------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_policy_artifact(self.sol_model, output_dir)

    def _save_checkpoint(self, model, trial):
        # transformers.Trainer's checkpointing (policy artifact via _save, optimizer, scheduler,
        # RNG, trainer state), without TRL's model card: the artifact writes its own README.md.
        super(GRPOTrainer, self)._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            _write_training_args(self.args, folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_policy_weights(self.sol_model.policy, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None:
            load_policy_weights(self.sol_model.policy, best)

    def create_model_card(self, *args, **kwargs) -> None:  # the policy artifact has its own card
        return None


def save_policy_artifact(model: SolForCausalLM, output_dir: str) -> None:
    """Write the policy artifact of ``model`` to ``output_dir`` (``sol_config.json``,
    ``policy.safetensors``, ``README.md``), never base weights."""
    model.save_pretrained(output_dir)


def load_policy_weights(policy: nn.Module, folder: str) -> None:
    """Load ``policy.safetensors`` from a checkpoint folder into ``policy`` (strict, safetensors only)."""
    from safetensors.torch import load_file

    path = os.path.join(folder, "policy.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} holds no policy.safetensors: not a SolGRPOTrainer checkpoint")
    tensors = load_file(path, device=str(next(policy.parameters()).device))
    policy.load_state_dict(tensors, strict=True)


def _write_training_args(args: SolGRPOConfig, output_dir: str) -> None:
    """The training arguments as JSON (``transformers`` pickles them; sol_hf never writes pickle
    into an artifact folder)."""
    with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as f:
        f.write(args.to_json_string())
