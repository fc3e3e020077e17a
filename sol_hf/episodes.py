"""Teacher-forced controlled episodes: the shared core of training and evaluation.

An episode is a text window of ``context_length + steps + 1`` tokens. The first
``context_length`` tokens are prefilled densely (exactly the base model); then ``steps``
controlled decode steps process the following tokens one at a time, each row under the action
its controller picks, and score the next true token. The token path never depends on the
actions (teacher forcing), so rows that share a prefix differ only in their schedules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .budget import BudgetTargets
from .cache import page_bounds_cache
from .modeling import SolForCausalLM, _cache_of
from .policy import Controller, PolicyController, PolicyObservation
from .runtime.step import ControlledStep

__all__ = ["EpisodeBatch", "run_episodes"]


@dataclass
class EpisodeBatch:
    """What ``R = B * repeats`` rows did over ``T`` controlled steps (rows b-major: row
    ``b * repeats + k`` is window ``b``, schedule ``k``).

    Attributes:
        token_log_probs: (R, T) log-probability of each true next token under the controlled step.
        token_is_greedy: (R, T) bool, whether each true next token is the controlled step's argmax.
        dense_token_log_probs: (B, T) the same under the dense base model (only if requested).
        dense_kl: (R, T) ``KL(p_dense || p_controlled)`` of each step's next-token distribution
            (only with ``with_dense``).
        actions: (R, T) int64 action indices.
        step_cost: (R, T) achieved cost fraction of each step (bytes read / dense bytes).
        attention_keep, activation_keep: (R, T) nominal per-axis values; bits: (R, T) int64.
        observations: policy observations with a T axis (only for policy controllers).
        allowed: (R, T, N) bool budget-guard masks the actions were drawn under (policy only).
        behaviour_log_probs: (R, T) log-probability of each action when it was drawn (policy only).
        targets: the rows' :class:`BudgetTargets`.
    """

    token_log_probs: torch.Tensor
    token_is_greedy: torch.Tensor
    actions: torch.Tensor
    step_cost: torch.Tensor
    attention_keep: torch.Tensor
    activation_keep: torch.Tensor
    bits: torch.Tensor
    targets: BudgetTargets
    dense_token_log_probs: torch.Tensor | None = None
    dense_kl: torch.Tensor | None = None
    observations: PolicyObservation | None = None
    allowed: torch.Tensor | None = None
    behaviour_log_probs: torch.Tensor | None = None


@torch.no_grad()
def run_episodes(
    model: SolForCausalLM,
    windows: torch.Tensor,
    context_length: int,
    controller: Controller,
    targets: BudgetTargets,
    repeats: int = 1,
    with_dense: bool = False,
    on_step: Callable[[], None] | None = None,
) -> EpisodeBatch:
    """Run controlled teacher-forced episodes.

    Args:
        windows: (B, context_length + T + 1) token ids, no padding.
        controller: picks the actions (``PolicyController`` rows also record what training needs).
        targets: per-window budget targets (B rows); repeated ``repeats`` times with the windows.
        repeats: schedules per window (GRPO's K counterfactual rollouts share one dense prefill).
        with_dense: also score the T tokens with the dense model and record each step's KL to it
            (for KL rewards and reports).
        on_step: called after each of the T controlled steps (progress reporting).
    """
    device = model.device
    windows = windows.to(device)
    batch, total = windows.shape
    steps = total - context_length - 1
    if steps < 1:
        raise ValueError(f"windows of {total} tokens leave no controlled step after a {context_length}-token context")
    # Only the last position's hidden state is needed: skip the LM head on the other positions.
    # Quest: a cache that keeps the page key bounds up to date as tokens are appended, so the
    # controlled steps do not recompute them from every cached key.
    cache = page_bounds_cache(model.config, model.sol_config.page_size) if model.sol_config.selection == "quest" else None
    prefill = model(windows[:, :context_length], cache=cache, use_cache=True, logits_to_keep=1)
    cache = prefill.cache
    hidden = prefill.last_hidden_state[:, -1]
    previous_logits = prefill.logits[:, -1]  # (B, V): what the base model expected of the first controlled token
    dense_scores = dense_log_probs = None
    if with_dense:
        dense = model(windows[:, context_length : context_length + steps], cache=_clone_cache(cache), use_cache=True)
        dense_log_probs = torch.log_softmax(dense.logits.float(), -1)  # (B, T, V)
        dense_scores = dense_log_probs.gather(-1, windows[:, context_length + 1 :].unsqueeze(-1)).squeeze(-1)
        if repeats > 1:
            dense_log_probs = dense_log_probs.repeat_interleave(repeats, 0)
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        hidden = hidden.repeat_interleave(repeats, 0)
        previous_logits = previous_logits.repeat_interleave(repeats, 0)
        windows = windows.repeat_interleave(repeats, 0)
        targets = targets.repeat_interleave(repeats)
    targets = BudgetTargets(targets.values.to(device), targets.is_set.to(device))
    # Each row stands for one decode of its own: charge it what it would read decoded alone.
    session = ControlledStep(model, controller, targets, steps, count_executed=False)
    is_policy = controller.uses_policy
    record: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("lp", "greedy", "kl", "a", "cost", "ak", "mk", "bits", "h", "e", "f", "prev", "c", "allowed", "blp")
    }
    for t in range(steps):
        position = context_length + t
        tokens = windows[:, position]
        lengths = torch.full((windows.shape[0],), position + 1, device=device)
        actions = session.decide(tokens, lengths, hidden, previous_logits)
        step = session.state(actions.unsqueeze(1), cache=cache)
        out, hidden = model._controlled_forward(step, input_ids=tokens.unsqueeze(1), cache=cache, use_cache=True)
        cost = session.account(actions, step)
        cache = _cache_of(out)
        hidden = hidden[:, -1]
        previous_logits = out.logits[:, -1]
        if on_step is not None:
            on_step()
        values = model.space.values(actions)
        log_probs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        true_next = windows[:, position + 1]
        record["lp"].append(log_probs.gather(-1, true_next.unsqueeze(-1)).squeeze(-1))
        record["greedy"].append(log_probs.argmax(-1) == true_next)
        if dense_log_probs is not None:  # KL(p_dense || p_controlled) of this step
            reference = dense_log_probs[:, t]
            record["kl"].append((reference.exp() * (reference - log_probs)).sum(-1))
        record["a"].append(actions)
        record["cost"].append(cost)
        record["ak"].append(values["attention_keep"])
        record["mk"].append(values["activation_keep"])
        record["bits"].append(values["bits"])
        if is_policy:
            assert isinstance(controller, PolicyController)
            observation = session.observation
            record["h"].append(observation.hidden)
            record["e"].append(observation.token_embedding)
            record["f"].append(observation.features)
            record["prev"].append(observation.previous_action)
            if observation.lm_confidence is not None:
                record["c"].append(observation.lm_confidence)
            if controller.last_allowed is not None:
                record["allowed"].append(controller.last_allowed)
            record["blp"].append(controller.last_log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1))
    stack = lambda key: torch.stack(record[key], dim=1)  # noqa: E731
    result = EpisodeBatch(
        token_log_probs=stack("lp"), token_is_greedy=stack("greedy"), actions=stack("a"), step_cost=stack("cost"), attention_keep=stack("ak"),
        activation_keep=stack("mk"), bits=stack("bits"), targets=targets, dense_token_log_probs=dense_scores,
        dense_kl=stack("kl") if record["kl"] else None,
    )
    if is_policy:
        result.observations = PolicyObservation(
            stack("h"), stack("e"), stack("f"), stack("prev"), stack("c") if record["c"] else None
        )
        result.allowed = stack("allowed") if record["allowed"] else None
        result.behaviour_log_probs = stack("blp")
    return result


def _clone_cache(cache):
    return copy.deepcopy(cache)
