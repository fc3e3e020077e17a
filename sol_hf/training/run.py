"""One-call training: text -> windows -> SolGRPOTrainer -> policy artifact (what ``sol-hf train`` calls)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PrinterCallback

from ..recipe import RECIPE
from .progress import UpdateLines

__all__ = ["windows_dataset", "split_texts", "train_policy", "DEFAULT_GRID", "RECIPE"]

# The CPU-scaled grid of the documented reference run (``RECIPE["grid"]``: 3 x 3 x 3, the paper's
# axes: the activation axis prunes the MLP input only, bits fake-quantize the MLP output).
DEFAULT_GRID = dict(RECIPE["grid"])


def windows_dataset(windows: torch.Tensor):
    """(N, L) token windows -> ``datasets.Dataset`` with an ``input_ids`` column (what the trainer reads)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": windows.tolist()})


def split_texts(texts: Sequence[str], validation_every: int = 10) -> tuple[list[str], list[str]]:
    """Split documents (never windows) into (train, validation): every ``validation_every``-th
    document goes to validation, so no window of a validation document is trained on."""
    if validation_every < 2:
        raise ValueError(f"validation_every must be >= 2, got {validation_every}")
    train = [t for i, t in enumerate(texts) if i % validation_every != validation_every - 1]
    validation = [t for i, t in enumerate(texts) if i % validation_every == validation_every - 1]
    return train, validation


def train_policy(
    base: str | None = None,
    output_dir: str = "outputs/sol-policy",
    *,
    sections: Sequence[str] | None = RECIPE["sections"],
    text_root: str | None = None,
    texts: Sequence[str] | None = None,
    grid: dict[str, Sequence[float]] | None = None,
    budget_mode: str = RECIPE["budget_mode"],
    cost_budget_range: tuple[float, float] | None = RECIPE["cost_budget_range"],
    attention_budget_range: tuple[float, float] = (0.1, 1.0),
    activation_budget_range: tuple[float, float] = (0.4, 1.0),
    bits_budget_range: tuple[float, float] = (5.0, 16.0),
    budget_guard: float | None = RECIPE["budget_guard"],
    action_head: str = RECIPE["action_head"],
    observe_lm_confidence: bool = RECIPE["observe_lm_confidence"],
    learning_rate: float = RECIPE["learning_rate"],
    entropy_coef: float = RECIPE["entropy_coef"],
    reward_type: str = RECIPE["reward_type"],
    reward_gamma: float = RECIPE["reward_gamma"],
    cost_price: float = RECIPE["cost_price"],
    steps: int = RECIPE["steps"],
    seed: int = RECIPE["seed"],
    context_length: int = RECIPE["context_length"],
    rollout_steps: int = RECIPE["rollout_steps"],
    windows_per_step: int = RECIPE["windows_per_step"],
    num_generations: int = RECIPE["num_generations"],
    max_windows: int | None = RECIPE["max_windows"],
    validation_every: int = RECIPE["validation_every"],
    run_dir: str | None = None,
    sol_config_overrides: dict[str, Any] | None = None,
    progress: bool = True,
    callbacks: Sequence[Any] | None = None,
    warm_start_updates: int = 0,
    warm_start_budgets: Sequence[float] | None = None,
    warm_start_search_windows: int = 16,
    **config_overrides: Any,
) -> str:
    """Train a SOL policy for ``base`` on text windows and write the policy artifact.

    Every default is :data:`sol_hf.recipe.RECIPE`, the recipe of the documented result
    (docs/results.md): ``train_policy()`` with no arguments trains that policy.

    Args:
        base: local path or Hub id of the base causal LM (``None``: the embedded SmolLM2-135M).
        output_dir: where the policy artifact (and nothing else) is written.
        run_dir: checkpoints (with ``save_steps`` in ``config_overrides``), the training log and
            the validation windows (default: ``output_dir + "-run"``).
        sections / text_root: Python-documentation sections to train on (default: ``TRAIN_SECTIONS``,
            library / howto / whatsnew)
            under ``text_root`` (default: Debian's python3.11-doc); ignored when ``texts`` is given.
        grid: ``{"attention_keep": [...], "activation_keep": [...], "bits": [...]}`` (default: the
            3x3x3 grid of the issue's reference run, ``RECIPE["grid"]``).
        budget_mode, *_budget_range, budget_guard: see :class:`SolGRPOConfig`. The defaults are the
            recipe our validation favoured on SmolLM2 (not the paper's): unified-cost budgets
            (bits cost almost nothing under the byte cost model, so per-axis bit targets only
            force quality losses), guard slack 0.25 (the evaluator's default).
        action_head: ``"factorized"`` (one softmax per axis: learns axis preferences in few
            updates) or ``"joint"`` (the paper's single softmax over the grid).
        observe_lm_confidence: the policy also reads the base model's confidence
            (:class:`SolConfig` field; ``sol_config_overrides`` wins if it names it too).
        learning_rate, entropy_coef: AdamW lr (paper: 1e-4) and entropy bonus (paper: 0.05).
        reward_type, reward_gamma, cost_price: the per-step reward (see :class:`SolGRPOConfig`;
            the recipe is the authors': log-likelihood, discount 0.85, no cost price).
        steps: policy updates (``max_steps``).
        context_length, rollout_steps: window layout (dense prefill, controlled steps).
        windows_per_step, num_generations: B windows x K schedules per update and process.
        max_windows: cap on training windows (after the validation split).
        validation_every: every n-th document is held out as validation (written to
            ``run_dir/validation_windows.safetensors`` for tuning; never the evaluation sections).
        sol_config_overrides: extra :class:`SolConfig` fields (page size, policy size, ...).
        callbacks: ``transformers.TrainerCallback`` instances handed to the trainer.
        warm_start_updates: supervised updates before GRPO (0, the recipe: none): the policy learns
            to imitate the oracle placement of the best static mixture
            (:func:`sol_hf.training.warm_start.warm_start_policy`, ``windows_per_step`` windows
            per update, the same learning rate). The best static pairs are searched first
            (:func:`sol_hf.evaluation.search_best_static`) on ``warm_start_search_windows``
            training windows (never the validation ones) at ``warm_start_budgets`` (default: the
            midpoints of five equal bins of the training cost range). Unified-cost or mixed
            budgets only. Its log is ``"warm_start"`` in ``training_log.json``.
        **config_overrides: extra :class:`SolGRPOConfig` fields (temperature, save_steps, ...).
    Returns:
        ``output_dir``.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..assets import smollm2_path
    from ..config import SolConfig
    from ..data import PYTHON_DOCS_ROOT, python_docs_texts, text_windows
    from ..modeling import SolForCausalLM
    from .config import SolGRPOConfig
    from .trainer import SolGRPOTrainer

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if warm_start_updates < 0:
        raise ValueError(f"warm_start_updates must be >= 0, got {warm_start_updates}")
    if warm_start_updates and budget_mode == "per_axis":
        raise ValueError("the warm start imitates best static mixtures at unified cost budgets: use budget_mode 'cost' or 'mixed'")
    base = base or smollm2_path()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    grid = dict(DEFAULT_GRID, **(grid or {}))
    sol_config = SolConfig(**grid, **{"action_head": action_head, "observe_lm_confidence": observe_lm_confidence,
                                      **(sol_config_overrides or {})})
    model = SolForCausalLM(base_model, sol_config)

    if texts is None:
        texts = python_docs_texts(tuple(sections or RECIPE["sections"]), text_root or PYTHON_DOCS_ROOT)
    train_texts, validation_texts = split_texts(list(texts), validation_every)
    window_length = context_length + rollout_steps + 1
    train_windows = text_windows(train_texts, tokenizer, window_length, max_windows=max_windows)
    run_dir = run_dir or output_dir.rstrip("/") + "-run"
    os.makedirs(run_dir, exist_ok=True)
    if validation_texts:
        try:
            validation = text_windows(validation_texts, tokenizer, window_length)
            save_file({"windows": validation.contiguous()}, os.path.join(run_dir, "validation_windows.safetensors"))
        except ValueError:
            pass  # no validation document is long enough for a window
    warm_log = None
    if warm_start_updates:
        warm_log = _warm_start(model, train_windows, context_length, cost_budget_range, warm_start_budgets,
                               warm_start_search_windows, warm_start_updates, windows_per_step, learning_rate, seed, progress)

    args = SolGRPOConfig(
        output_dir=os.path.join(run_dir, "checkpoints"),
        max_steps=steps,
        seed=seed,
        context_length=context_length,
        rollout_steps=rollout_steps,
        num_generations=num_generations,
        per_device_train_batch_size=windows_per_step * num_generations,
        budget_mode=budget_mode,
        cost_budget_range=cost_budget_range,
        attention_budget_range=attention_budget_range,
        activation_budget_range=activation_budget_range,
        bits_budget_range=bits_budget_range,
        budget_guard=budget_guard,
        learning_rate=learning_rate,
        entropy_coef=entropy_coef,
        reward_type=reward_type,
        reward_gamma=reward_gamma,
        cost_price=cost_price,
        disable_tqdm=True,  # progress: one readable line per update (UpdateLines), not a bar plus raw dicts
        **config_overrides,
    )
    trainer = SolGRPOTrainer(
        model, args, train_dataset=windows_dataset(train_windows), processing_class=tokenizer,
        callbacks=list(callbacks) if callbacks else None,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dictionary
    if progress:
        trainer.add_callback(UpdateLines())
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=config_overrides.get("resume_from_checkpoint"))
    elapsed = time.perf_counter() - started
    trainer.save_model(output_dir)
    if trainer.args.should_save:
        with open(os.path.join(run_dir, "training_log.json"), "w", encoding="utf-8") as f:
            json.dump(
                {"train_windows": int(train_windows.shape[0]), "steps": steps, "wall_s": elapsed,
                 "log_history": trainer.state.log_history, **({"warm_start": warm_log} if warm_log else {})},
                f, indent=1,
            )
    return output_dir


def default_warm_start_budgets(model, context_length: int, cost_budget_range: tuple[float, float] | None,
                               count: int = 5) -> list[float]:
    """The midpoints of ``count`` equal bins of the training cost range (``cost_budget_range``, or
    the policy's ``SolConfig.budget_range``), its low end raised to the cheapest cost reachable
    with the policy at ``context_length + 1`` tokens."""
    low, high = cost_budget_range or model.sol_config.budget_range
    low = min(max(low, model.cost_model.cheapest_cost(context_length + 1, with_policy=True)), high)
    return [round(low + (high - low) * (i + 0.5) / count, 4) for i in range(count)]


def _warm_start(model, train_windows: torch.Tensor, context_length: int, cost_budget_range, budgets, search_windows: int,
                updates: int, batch_size: int, learning_rate: float, seed: int, progress: bool) -> dict[str, Any]:
    """Search the best static pairs on training windows, then :func:`warm_start_policy`; returns its log
    with the pairs."""
    from ..data import evenly_spaced
    from ..evaluation.sweep import search_best_static
    from .warm_start import warm_start_policy

    budgets = list(budgets) if budgets is not None else default_warm_start_budgets(model, context_length, cost_budget_range)
    best = search_best_static(model, evenly_spaced(train_windows, search_windows), context_length, budgets, progress=progress)
    log = warm_start_policy(model, train_windows, context_length, best, updates=updates, batch_size=batch_size,
                            learning_rate=learning_rate, seed=seed, progress=progress)
    log["best_static"] = {str(b): s.to_dict(model.space) for b, s in best.items()}
    return log
