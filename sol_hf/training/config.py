"""SolGRPOConfig: TRL's GRPOConfig plus the fields of SOL's counterfactual-schedule GRPO.

Defaults follow the authors' official configs (sol-method.md §3.8: process-level GRPO,
log-likelihood reward, sum aggregation with gamma 0.85, policy temperature 1.3, entropy bonus
0.05, lr 1e-4, grad-clip 2.0, penalty tolerance 0.02, no LR schedule) except where noted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from .rewards import ADVANTAGE_LEVELS, ADVANTAGE_NORMALIZATIONS, REWARD_TYPES

__all__ = ["SolGRPOConfig", "BUDGET_MODES"]

BUDGET_MODES = ("per_axis", "cost", "mixed")


@dataclass
class SolGRPOConfig(GRPOConfig):
    """Configuration of :class:`~sol_hf.training.SolGRPOTrainer`.

    Batch semantics (TRL's): a training row is one *schedule* of one window, so
    ``per_device_train_batch_size`` counts rows = windows x ``num_generations``; it must be a
    multiple of ``num_generations`` so that every window's K schedules run on one process (one
    dense prefill per window). The authors' 1B run is 8 windows x 16 schedules = 128 rows per
    update.

    TRL fields that SOL reads with a SOL meaning:
        num_generations: K, counterfactual schedules per window (authors: 16; 32 for their
            largest grid). Default 16.
        temperature: the *policy's* sampling temperature (authors: 1.3). Default 1.3.
        epsilon / epsilon_high: PPO clip range of the policy ratio (0.2).
        entropy_coef: entropy bonus on the policy's (tempered, guard-masked) action
            distribution (authors: 0.05). Default 0.05.
        num_iterations: policy updates per generated batch (authors: 1).
        learning_rate 1e-4, max_grad_norm 2.0, lr_scheduler_type "constant" (the authors' AdamW
            without a schedule).
    CPU-minded defaults: ``bf16`` only on CUDA, ``report_to="none"``, ``logging_steps=1``,
    ``save_strategy="no"``, activation (gradient) checkpointing off (only the small policy has grads),
    ``use_cpu=True`` when CUDA is absent (so ``accelerate launch --multi_gpu --num_processes N``,
    i.e. torchrun, gives N gloo DDP processes on CPU; accelerate's ``--cpu`` flag with N > 1
    needs mpirun instead).
    TRL fields about LM generation and its loss (max_completion_length, top_p, loss_type,
    scale_rewards, vLLM, ...) are not used: actions are not tokens. ``beta`` (KL to a
    reference model) must stay 0 and ``use_adaptive_entropy`` False.

    SOL fields (all documented with the authors' value):
        context_length: tokens of the dense prefill (authors: 1024; 512 for 3B/8B). Windows are
            ``context_length + rollout_steps + 1`` tokens.
        rollout_steps: T, teacher-forced controlled decode steps per episode (authors: 16).
        reward_type: ``"loglik"`` (log p of the true next token under the controlled step, the
            authors' official reward) or ``"neg_kl"`` (``-KL(p_dense || p_controlled)``).
        cost_price: subtract ``cost_price * cost_t`` (the step's achieved cost fraction) from each
            step's reward (not in the authors' code; default 0). With ``budget_guard`` on, sampled
            schedules stay on budget and the penalty rarely fires, so without a price every step's
            reward favours the costlier action; a price lets the cheap action win where it hurts
            least. It is in the reward's units per unit of cost (nats for both reward types).
        reward_gamma: discount of the reward-to-go ``G_t`` (authors: 0.85 with "sum"
            aggregation); 0 uses the raw per-step reward.
        advantage_level: ``"process"`` (per step, authors) or ``"outcome"`` (one per episode).
        advantage_normalization: ``"center"`` (authors) or ``"zscore"`` within each window's group.
        whiten_advantages: z-score all advantages of a generation batch together (authors: True).
        budget_penalty_weights: weights of the penalty per budget dimension
            ``(cost, attention, activation, bits)`` (authors: attention 100, MLP 100, bits 200; they had
            no unified-cost budget: 100 here). A dimension with one grid level gets weight 0.
        budget_tolerance: dead zone of the symmetric squared hinge on |episode mean - target|
            (authors: 0.02, hard-coded there).
        budget_mode: how each window's targets are drawn: ``"per_axis"`` (attention, MLP and bits
            targets, each uniform in its range: the paper), ``"cost"`` (one unified cost-fraction
            target uniform in ``cost_budget_range``) or ``"mixed"`` (each window picks one of the
            two with equal probability).
        cost_budget_range: (low, high) unified cost fraction; ``None`` uses the policy's
            ``SolConfig.budget_range`` raised to the cheapest reachable cost.
        attention_budget_range, activation_budget_range: (low, high) keep fractions (authors: (0.1, 1.0)
            and (0.4, 1.0)).
        bits_budget_range: (low, high) bits (authors: (5, 16), i.e. q_ratio in [0.3125, 1]).
        budget_guard: slack of :func:`sol_hf.policy.budget_guard_mask` while sampling schedules:
            only actions within this slack of what the step should spend are allowed, so every
            episode lands near its target. ``None`` disables it (the authors have no guard).
    """

    # --- TRL fields with SOL defaults -------------------------------------------------------
    num_generations: int | None = field(default=16, metadata={"help": "K counterfactual schedules per window (authors: 16)."})
    per_device_train_batch_size: int = field(
        default=128, metadata={"help": "Rows (windows x num_generations) per device and step (authors: 8 x 16)."}
    )
    temperature: float = field(default=1.3, metadata={"help": "Policy sampling temperature (authors: 1.3)."})
    entropy_coef: float = field(default=0.05, metadata={"help": "Entropy bonus of the policy's action distribution (authors: 0.05)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (authors: 1e-4)."})
    max_grad_norm: float = field(default=2.0, metadata={"help": "Gradient clipping (authors: 2.0)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Authors: no LR schedule."})
    report_to: str | list[str] | None = field(default="none", metadata={"help": "Logging integrations (none by default)."})
    bf16: bool | None = field(default=None, metadata={"help": "None: True on CUDA, False on CPU (the base runs in its own dtype)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N updates."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy (checkpoints hold the policy only)."})
    # TRL turns checkpointing on by default. transformers renamed the switch
    # ``activation_checkpointing`` and warns when the old name is set, so set whichever it reads.
    if "activation_checkpointing" in GRPOConfig.__dataclass_fields__:
        activation_checkpointing: bool = field(default=False, metadata={"help": "Not needed: only the small policy has grads."})
        gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias of activation_checkpointing."})
    else:  # transformers before the rename
        gradient_checkpointing: bool = field(default=False, metadata={"help": "Not needed: only the small policy has grads."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "Every policy parameter gets a grad."})

    # --- SOL fields -----------------------------------------------------------------------------
    context_length: int = field(default=1024, metadata={"help": "Dense prefill tokens (authors: 1024)."})
    rollout_steps: int = field(default=16, metadata={"help": "T controlled steps per episode (authors: 16)."})
    reward_type: str = field(default="loglik", metadata={"help": "'loglik' (authors) or 'neg_kl'."})
    reward_gamma: float = field(default=0.85, metadata={"help": "Discount of the reward-to-go (authors: 0.85)."})
    cost_price: float = field(
        default=0.0,
        metadata={"help": "Per-step price on the step's cost fraction: r_t - cost_price * cost_t (a Lagrangian term "
                  "that makes the cheap action win where it hurts least). 0: the authors' reward."},
    )
    advantage_level: str = field(default="process", metadata={"help": "'process' (authors) or 'outcome'."})
    advantage_normalization: str = field(default="center", metadata={"help": "'center' (authors) or 'zscore'."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Global z-score of advantages (authors: True)."})
    budget_penalty_weights: tuple[float, float, float, float] = field(
        default=(100.0, 100.0, 100.0, 200.0),
        metadata={"help": "Penalty weights for (cost, attention, activation, bits) (authors: -, 100, 100, 200)."},
    )
    budget_tolerance: float = field(default=0.02, metadata={"help": "Dead zone of the squared hinge (authors: 0.02)."})
    budget_mode: str = field(default="per_axis", metadata={"help": "'per_axis' (paper), 'cost' or 'mixed'."})
    cost_budget_range: tuple[float, float] | None = field(
        default=None, metadata={"help": "Unified cost range; None: SolConfig.budget_range, floored at the cheapest cost."}
    )
    attention_budget_range: tuple[float, float] = field(default=(0.1, 1.0), metadata={"help": "Authors: U[0.1, 1]."})
    activation_budget_range: tuple[float, float] = field(default=(0.4, 1.0), metadata={"help": "Authors: U[0.4, 1]."})
    bits_budget_range: tuple[float, float] = field(default=(5.0, 16.0), metadata={"help": "Authors: bits in [5, 16]."})
    budget_guard: float | None = field(default=None, metadata={"help": "Guard slack while sampling; None: off (authors)."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if not torch.cuda.is_available():
            # Without it, processes started by torchrun / `accelerate launch --multi_gpu` on a
            # CPU-only machine do not join one DDP group.
            self.use_cpu = True
        super().__post_init__()
        if self.reward_type not in REWARD_TYPES:
            raise ValueError(f"reward_type must be one of {REWARD_TYPES}, got {self.reward_type!r}")
        if self.advantage_level not in ADVANTAGE_LEVELS:
            raise ValueError(f"advantage_level must be one of {ADVANTAGE_LEVELS}, got {self.advantage_level!r}")
        if self.advantage_normalization not in ADVANTAGE_NORMALIZATIONS:
            raise ValueError(
                f"advantage_normalization must be one of {ADVANTAGE_NORMALIZATIONS}, got {self.advantage_normalization!r}"
            )
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"budget_mode must be one of {BUDGET_MODES}, got {self.budget_mode!r}")
        if not (self.cost_price >= 0.0 and math.isfinite(self.cost_price)):
            raise ValueError(f"cost_price must be a finite number >= 0, got {self.cost_price}")
        if not 0.0 <= self.reward_gamma <= 1.0:
            raise ValueError(f"reward_gamma must lie in [0, 1], got {self.reward_gamma}")
        if self.context_length < 1 or self.rollout_steps < 1:
            raise ValueError(f"context_length and rollout_steps must be positive, got {self.context_length}, {self.rollout_steps}")
        if len(tuple(self.budget_penalty_weights)) != 4:
            raise ValueError(f"budget_penalty_weights needs 4 weights (cost, attention, activation, bits), got {self.budget_penalty_weights}")
        self.budget_penalty_weights = tuple(float(w) for w in self.budget_penalty_weights)
        for name, lo_min, hi_max in (
            ("attention_budget_range", 0.0, 1.0), ("activation_budget_range", 0.0, 1.0), ("bits_budget_range", 2.0, 16.0),
            ("cost_budget_range", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            low, high = (float(v) for v in value)
            if not (lo_min < low <= high <= hi_max):
                raise ValueError(f"{name} must satisfy {lo_min} < low <= high <= {hi_max}, got {value}")
            setattr(self, name, (low, high))
        if self.budget_guard is not None and self.budget_guard < 0:
            raise ValueError(f"budget_guard must be >= 0 or None, got {self.budget_guard}")
        if self.beta != 0.0:
            raise ValueError("SolGRPOConfig.beta must be 0: there is no reference policy (the authors' kl_pi_ref_coef is 0)")
        if self.use_adaptive_entropy:
            raise ValueError("SolGRPOConfig does not support use_adaptive_entropy; set entropy_coef instead")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of num_generations "
                f"({self.num_generations}) so each window's schedules share one process and one dense prefill"
            )

    @property
    def window_length(self) -> int:
        """Tokens per training window: ``context_length + rollout_steps + 1``."""
        return self.context_length + self.rollout_steps + 1
