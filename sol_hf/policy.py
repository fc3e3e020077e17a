"""SolPolicy (the learned controller) and the non-learned uniform and random controllers.

Every controller answers one question per decode step: which action does each batch row take?
They share :class:`DecisionContext` as input and return (B,) int64 action indices on the device,
without host syncs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .actions import ActionSpace
from .budget import NUM_BUDGET_FEATURES, BudgetTargets
from .config import SolConfig

__all__ = [
    "SolPolicy",
    "PolicyObservation",
    "DecisionContext",
    "Controller",
    "PolicyController",
    "UniformController",
    "RandomController",
    "ScheduleController",
    "SurpriseRuleController",
    "budget_guard_mask",
    "lm_confidence_features",
    "NUM_LM_CONFIDENCE_FEATURES",
    "policy_hidden_size_for",
]

SCALAR_EMBED = 64
BUDGET_HEAD_HIDDEN = 32
NUM_LM_CONFIDENCE_FEATURES = 3


@dataclass
class PolicyObservation:
    """What the policy sees at one step (or a sequence of steps, with a T axis after B).

    Attributes:
        hidden: (B, [T,] H) the base model's final hidden state at the previous position.
        token_embedding: (B, [T,] H) input embedding of the token being processed.
        features: (B, [T,] 13) budget features (see ``BudgetTracker.features``).
        previous_action: (B, [T]) int64; ``num_actions`` means "no previous action".
        lm_confidence: (B, [T], 3) :func:`lm_confidence_features` of the base model's previous
            next-token distribution; only for policies with ``observe_lm_confidence``.
    """

    hidden: torch.Tensor
    token_embedding: torch.Tensor
    features: torch.Tensor
    previous_action: torch.Tensor
    lm_confidence: torch.Tensor | None = None


def lm_confidence_features(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """How sure the base model was of the token now being processed.

    Args:
        logits: (B, V) the base model's next-token logits at the previous position.
        tokens: (B,) the token that came (the input of the current step).
    Returns:
        (B, 3) float32 in [0, 1]: entropy / log(V), probability of ``tokens``, top probability.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs.clamp_min(-1e4)).sum(-1) / math.log(logits.shape[-1])
    chosen = probs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return torch.stack([entropy.clamp(0.0, 1.0), chosen, probs.amax(-1)], dim=-1)


def policy_hidden_size_for(config: SolConfig, lm_hidden_size: int, base_parameters: int) -> int:
    """Width giving a policy of about ``config.policy_param_fraction`` of the base's parameters."""
    target = config.policy_param_fraction * base_parameters
    n_out = config.num_actions if config.action_head == "joint" else sum(
        len(a) for a in (config.attention_keep, config.activation_keep, config.bits)
    )
    # params(d) ~ a*d^2 + b*d: blocks 12 d^2 each; obs projection, positions and the head linear in d.
    a = 12.0 * config.policy_layers
    b = 2 * lm_hidden_size + SCALAR_EMBED + config.action_embedding_size + config.policy_max_steps + n_out + 10
    d = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    step = 8 * config.policy_heads
    return int(min(1024, max(64, step * round(d / step))))


class _Block(nn.Module):
    """Pre-LN causal self-attention + GELU MLP, with an incremental cache."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        return x.view(b, t, self.heads, w // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None, max_len: int):
        """x: (B, T, W). With ``cache`` (k, v) of (B, heads, t, W/heads), T must be 1."""
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)[:, :, -max_len:]
            v = torch.cat([cache[1], v], dim=2)[:, :, -max_len:]
            attn = F.scaled_dot_product_attention(q, k, v)
        else:
            t = x.shape[1]
            # Same window as the incremental path: each step attends to at most max_len steps.
            idx = torch.arange(t, device=x.device)
            mask = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - max_len)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, h, t, d = attn.shape
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, h * d))
        x = x + self.mlp(self.norm2(x))
        return x, (k, v)


class SolPolicy(nn.Module):
    """A small causal transformer over decode steps that outputs action logits.

    Per step it reads the base model's final hidden state of the previous token, the current
    token's embedding, 13 budget features, the previous action and, with
    ``observe_lm_confidence``, how sure the base model was of the current token (see
    :class:`PolicyObservation`). Budget targets also enter directly through ``budget_head``,
    an MLP whose output is added to the logits (as the paper).

    ``step`` runs one step with a cache; ``forward`` runs a whole (B, T) episode in parallel and
    gives the same logits (used for the training loss).
    """

    def __init__(self, config: SolConfig, lm_hidden_size: int):
        super().__init__()
        if config.policy_hidden_size is None:
            raise ValueError("SolPolicy needs a resolved config.policy_hidden_size (see policy_hidden_size_for)")
        self.config = config
        self.space = ActionSpace(config)
        width = config.policy_hidden_size
        self.lm_hidden_size = lm_hidden_size
        n = self.space.num_actions
        self.axis_sizes = self.space.shape
        n_out = n if config.action_head == "joint" else sum(self.axis_sizes)
        self.hidden_norm = nn.LayerNorm(lm_hidden_size, elementwise_affine=False)
        self.embedding_norm = nn.LayerNorm(lm_hidden_size, elementwise_affine=False)
        n_scalars = NUM_BUDGET_FEATURES + (NUM_LM_CONFIDENCE_FEATURES if config.observe_lm_confidence else 0)
        self.scalar_proj = nn.Sequential(nn.Linear(n_scalars, SCALAR_EMBED), nn.GELU(), nn.LayerNorm(SCALAR_EMBED))
        self.action_embedding = nn.Embedding(n + 1, config.action_embedding_size)
        self.obs_proj = nn.Linear(2 * lm_hidden_size + SCALAR_EMBED + config.action_embedding_size, width)
        self.position = nn.Embedding(config.policy_max_steps, width)
        self.blocks = nn.ModuleList(_Block(width, config.policy_heads) for _ in range(config.policy_layers))
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_out)
        self.budget_head = nn.Sequential(
            nn.Linear(2 * 4, BUDGET_HEAD_HIDDEN), nn.GELU(), nn.Linear(BUDGET_HEAD_HIDDEN, n_out)
        )
        nn.init.zeros_(self.budget_head[-1].weight)
        nn.init.zeros_(self.budget_head[-1].bias)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    # -- the network ---------------------------------------------------------------------------
    def _embed(self, obs: PolicyObservation, positions: torch.Tensor) -> torch.Tensor:
        scalars = obs.features.float()
        if self.config.observe_lm_confidence:
            if obs.lm_confidence is None:
                raise ValueError("this policy observes the base model's confidence (observe_lm_confidence=True) "
                                 "but the observation has no lm_confidence")
            scalars = torch.cat([scalars, obs.lm_confidence.float()], dim=-1)
        x = torch.cat(
            [
                self.hidden_norm(obs.hidden.float()),
                self.embedding_norm(obs.token_embedding.float()),
                self.scalar_proj(scalars),
                self.action_embedding(obs.previous_action),
            ],
            dim=-1,
        )
        return self.obs_proj(x) + self.position(positions.clamp(max=self.config.policy_max_steps - 1))

    def _logits(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        targets = features.float()[..., 1:9]  # (target, is_set) of the four budget dimensions
        raw = self.head(self.final_norm(x)) + self.budget_head(targets)
        return self.joint_log_probs(raw)

    def joint_log_probs(self, raw: torch.Tensor) -> torch.Tensor:
        """Head output -> (..., N) log-probabilities over the flat action grid."""
        if self.config.action_head == "joint":
            return F.log_softmax(raw.float(), dim=-1)
        na, nm, nb = self.axis_sizes
        la, lm, lb = raw.float().split([na, nm, nb], dim=-1)
        la, lm, lb = F.log_softmax(la, -1), F.log_softmax(lm, -1), F.log_softmax(lb, -1)
        joint = la[..., :, None, None] + lm[..., None, :, None] + lb[..., None, None, :]
        return joint.flatten(-3)

    def forward(self, obs: PolicyObservation) -> torch.Tensor:
        """Whole episodes: fields with shape (B, T, ...) -> (B, T, N) log-probabilities."""
        t = obs.previous_action.shape[1]
        positions = torch.arange(t, device=obs.previous_action.device).unsqueeze(0)
        x = self._embed(obs, positions)
        for block in self.blocks:
            x, _ = block(x, None, self.config.policy_max_steps)
        return self._logits(x, obs.features)

    def step(self, obs: PolicyObservation, cache: list | None, position: int) -> tuple[torch.Tensor, list]:
        """One step: fields with shape (B, ...) -> ((B, N) log-probabilities, new cache)."""
        positions = torch.full_like(obs.previous_action, position).unsqueeze(1)
        x = self._embed(
            PolicyObservation(
                obs.hidden.unsqueeze(1), obs.token_embedding.unsqueeze(1), obs.features.unsqueeze(1), obs.previous_action.unsqueeze(1),
                None if obs.lm_confidence is None else obs.lm_confidence.unsqueeze(1),
            ),
            positions,
        )
        new_cache = []
        for i, block in enumerate(self.blocks):
            past = cache[i] if cache is not None else (x.new_zeros(x.shape[0], block.heads, 0, x.shape[-1] // block.heads),) * 2
            x, kv = block(x, past, self.config.policy_max_steps)
            new_cache.append(kv)
        return self._logits(x, obs.features.unsqueeze(1)).squeeze(1), new_cache

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


# ---------------------------------------------------------------------------------------------
# Controllers
# ---------------------------------------------------------------------------------------------


@dataclass
class DecisionContext:
    """Inputs of one decision for B rows.

    Attributes:
        requirement: (B, 4) what this step should spend per budget dimension so that the running
            mean lands on the target (``BudgetTracker.requirement``).
        targets: the rows' :class:`BudgetTargets`.
        cost_table: (B, N) predicted cost fraction of every action for each row at this step.
        observation: the policy's observation (only read by :class:`PolicyController`).
        step: index of this controlled step.
        lm_confidence: (B, 3) :func:`lm_confidence_features` of the token being processed, for
            controllers with ``needs_lm_confidence``; else None.
    """

    requirement: torch.Tensor
    targets: BudgetTargets
    cost_table: torch.Tensor
    observation: PolicyObservation | None
    step: int
    lm_confidence: torch.Tensor | None = None


def _axis_value_table(space: ActionSpace, device) -> torch.Tensor:
    """(N, 4) per-action values in budget units: (unused cost slot, attention, activation, bits/16)."""
    t = space.tables(device)
    return torch.stack(
        [torch.zeros_like(t["attention_keep"]), t["attention_keep"], t["activation_keep"], t["bits"].float() / 16.0], dim=-1
    )


def _action_values(space: ActionSpace, cost_table: torch.Tensor) -> torch.Tensor:
    """(B, N, 4): each action's value in each budget dimension (cost from the row's cost table)."""
    values = _axis_value_table(space, cost_table.device).unsqueeze(0).expand(cost_table.shape[0], -1, -1).clone()
    values[..., 0] = cost_table
    return values


def budget_guard_mask(space: ActionSpace, ctx: DecisionContext, slack: float) -> torch.Tensor:
    """(B, N) bool: actions that keep every set budget dimension within ``slack`` of what this
    step should spend; rows where nothing qualifies allow their closest action."""
    values = _action_values(space, ctx.cost_table)  # (B, N, 4)
    gap = (values - ctx.requirement.unsqueeze(1)).abs() * ctx.targets.is_set.unsqueeze(1)
    worst = gap.amax(-1)  # (B, N)
    allowed = worst <= slack
    closest = worst <= worst.amin(-1, keepdim=True) + 1e-6
    return torch.where(allowed.any(-1, keepdim=True), allowed, closest)


class Controller:
    """Picks one action per row per decode step. Subclasses implement :meth:`decide`."""

    uses_policy = False
    needs_lm_confidence = False  # True: the runner fills DecisionContext.lm_confidence

    @property
    def name(self) -> str:
        """Short name used in reports."""
        return type(self).__name__

    def __init__(self, space: ActionSpace):
        self.space = space

    def reset(self) -> None:
        """Called at the start of every generation."""

    def decide(self, ctx: DecisionContext) -> torch.Tensor:  # (B,) int64
        raise NotImplementedError


class UniformController(Controller):
    """Spends the same compute on every token: the static schedule of the paper.

    A float budget walks a ladder of actions that reduce attention and activation keep together
    (both axes at the grid level nearest above a common fraction, at the grid's lowest bit-width),
    below the dense action, and alternates the two ladder actions around the target so the running
    mean cost lands on it. Where a denser action costs no more at the row's context length on this
    backend (attention sparsity that would not save bytes at short contexts; an activation keep
    whose sparse op is slower than the dense projection; activation bits, which save no bytes),
    the densest such action stands in for the rung. So with int8 weight copies
    (``quantize="weights"``) every step below dense reads int8 weights, and with the paper's
    activation bits the ladder stays at 16 bits. Per-axis budgets do the same on each axis with
    its own levels.
    """

    name = "uniform"

    def __init__(self, space: ActionSpace):
        super().__init__(space)
        fractions = sorted(set(space.attention_keep) | set(space.activation_keep))
        ladder = {space.dense_index}
        for s in fractions:
            a = min(v for v in space.attention_keep if v >= s - 1e-9)
            m = min(v for v in space.activation_keep if v >= s - 1e-9)
            ladder.add(space.index_of(a, m, min(space.bits)))
        self.ladder = sorted(ladder)
        # Each rung's denser stand-ins: the actions that keep at least as much on every axis. Where
        # one of them costs no more on this backend at the row's context length, the densest such
        # action is played instead.
        self.stand_ins = []
        for rung in self.ladder:
            ia, im, ib = space.axis_indices_host(rung)
            denser = [
                space.index_of(a, m, b)
                for a in space.attention_keep[ia:] for m in space.activation_keep[im:] for b in space.bits[ib:]
            ]
            self.stand_ins.append(sorted(denser, key=lambda i: -sum(space.axis_indices_host(i))))
        self._on_device: dict[torch.device, tuple] = {}

    def _pick(self, values: torch.Tensor, requirement: torch.Tensor) -> torch.Tensor:
        """values (B, K) candidate values, requirement (B,) -> (B,) position of the largest value
        not above the requirement, or of the smallest value if all are above."""
        fits = values <= requirement.unsqueeze(-1) + 1e-6
        best_fit = torch.where(fits, values, -torch.inf).argmax(-1)
        smallest = values.argmin(-1)
        return torch.where(fits.any(-1), best_fit, smallest)

    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Ladder (K,), stand-ins (K, M) densest first (padded with the rung itself) and per-axis
        level grids on ``device``, built once (a host-to-device copy per step would sync on CUDA)."""
        if device not in self._on_device:
            bits = [b / 16 for b in self.space.bits]
            width = max(len(s) for s in self.stand_ins)
            padded = [s + [s[-1]] * (width - len(s)) for s in self.stand_ins]
            self._on_device[device] = (
                torch.tensor(self.ladder, device=device),
                torch.tensor(padded, device=device),
                [torch.tensor(levels, device=device) for levels in (self.space.attention_keep, self.space.activation_keep, bits)],
            )
        return self._on_device[device]

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        device = ctx.cost_table.device
        ladder, stand_ins, grids = self._device_tables(device)
        rung_cost = ctx.cost_table[:, ladder].unsqueeze(-1)  # (B, K, 1)
        no_dearer = ctx.cost_table[:, stand_ins] <= rung_cost + 1e-6  # (B, K, M), densest first
        rungs = stand_ins.expand(ctx.cost_table.shape[0], -1, -1).gather(-1, no_dearer.int().argmax(-1, keepdim=True)).squeeze(-1)
        by_cost = rungs.gather(-1, self._pick(ctx.cost_table.gather(-1, rungs), ctx.requirement[:, 0]).unsqueeze(-1)).squeeze(-1)
        index = []
        for col, levels in zip((1, 2, 3), grids):
            picked = self._pick(levels.expand(ctx.cost_table.shape[0], -1), ctx.requirement[:, col])
            index.append(torch.where(ctx.targets.is_set[:, col], picked, len(levels) - 1))
        na, nm, nb = self.space.shape
        by_axis = (index[0] * nm + index[1]) * nb + index[2]
        return torch.where(ctx.targets.is_set[:, 0], by_cost, by_axis)


class RandomController(Controller):
    """A random schedule at the target budget: each step draws uniformly among the actions
    within ``spread`` of what the step should spend (per set budget dimension)."""

    name = "random"

    def __init__(self, space: ActionSpace, seed: int = 0, spread: float = 0.25):
        super().__init__(space)
        self.seed = seed
        self.spread = spread
        self.generator: torch.Generator | None = None

    def reset(self) -> None:
        self.generator = None

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        device = ctx.cost_table.device
        if self.generator is None or self.generator.device != torch.device(device):
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        allowed = budget_guard_mask(self.space, ctx, self.spread)
        noise = torch.rand(ctx.cost_table.shape, generator=self.generator, device=device)
        return torch.where(allowed, noise, -1.0).argmax(-1)


class ScheduleController(Controller):
    """Plays a fixed schedule: row ``r`` takes ``schedule[r, t]`` at controlled step ``t``.

    For counterfactual analyses (replaying a policy's actions in another order, probing one
    step at a time). Budgets are not consulted: the schedule is what it is.

    Args:
        space: the model's action space.
        schedule: (R, T) int64 action indices, one row per episode row (after ``repeats``).
    """

    def __init__(self, space: ActionSpace, schedule: torch.Tensor):
        super().__init__(space)
        if schedule.dim() != 2 or schedule.dtype != torch.long:
            raise ValueError(f"schedule must be a (rows, steps) int64 tensor, got {tuple(schedule.shape)} {schedule.dtype}")
        if schedule.numel() and (int(schedule.min()) < 0 or int(schedule.max()) >= space.num_actions):
            raise ValueError(f"schedule holds action indices outside [0, {space.num_actions})")
        self.schedule = schedule

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        rows = ctx.cost_table.shape[0]
        if rows != self.schedule.shape[0] or ctx.step >= self.schedule.shape[1]:
            raise ValueError(
                f"schedule of shape {tuple(self.schedule.shape)} does not cover {rows} rows at step {ctx.step}"
            )
        return self.schedule[:, ctx.step].to(ctx.cost_table.device)


class SurpriseRuleController(Controller):
    """A non-learned per-token rule: save compute after tokens the base model saw coming.

    Two actions, ``full`` and ``cheap``. A row takes ``cheap`` when it must save (taking ``full``
    would lift its running mean cost above the target) and the token being processed surprised
    the base model no more than the row's earlier tokens did on average (``-log p`` of the token
    under the previous step's distribution), or when only ``cheap`` still fits the target.
    Otherwise ``full``. Unified cost budgets only. A baseline for learned policies: it places
    savings by one observable number, online, step by step.

    Args:
        space: the model's action space.
        full, cheap: (attention keep, activation keep, bits) of the two actions; ``cheap`` must be the
            cheaper one. Defaults: the dense action, and the grid's lowest level on every axis (so
            every budget the uniform ladder reaches is reachable; ``sol_hf.evaluation``'s sweep passes
            the best static pair instead).
    """

    name = "surprise"
    needs_lm_confidence = True

    def __init__(self, space: ActionSpace, full: tuple[float, float, int] | None = None,
                 cheap: tuple[float, float, int] | None = None):
        super().__init__(space)
        self.full = space.dense_index if full is None else space.index_of(*full)
        self.cheap = (space.index_of(min(space.attention_keep), min(space.activation_keep), min(space.bits))
                      if cheap is None else space.index_of(*cheap))
        if self.full == self.cheap:
            raise ValueError(f"full and cheap must be different actions, got {full} twice")
        self.surprise_sum: torch.Tensor | None = None
        self.steps_seen = 0

    def reset(self) -> None:
        self.surprise_sum = None
        self.steps_seen = 0

    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        if ctx.lm_confidence is None:
            raise ValueError("SurpriseRuleController needs DecisionContext.lm_confidence (run it through "
                             "SolForCausalLM.generate or sol_hf.episodes.run_episodes)")
        if ctx.step == 0 and not bool(ctx.targets.is_set[:, 0].all()):  # once per run
            raise ValueError("SurpriseRuleController follows a unified compute_budget (a float or per-row tensor)")
        surprise = -ctx.lm_confidence[:, 1].clamp_min(1e-12).log()  # (B,) nats
        full_cost = ctx.cost_table[:, self.full]
        cheap_cost = ctx.cost_table[:, self.cheap]
        if self.surprise_sum is None:
            self.surprise_sum = torch.zeros_like(surprise)
        usual = self.surprise_sum / max(self.steps_seen, 1)
        requirement = ctx.requirement[:, 0]
        must_save = requirement < full_cost - 1e-6
        easy = (surprise <= usual) & (self.steps_seen > 0)
        forced = requirement <= cheap_cost + 1e-6
        take_cheap = must_save & (easy | forced)
        self.surprise_sum = self.surprise_sum + surprise
        self.steps_seen += 1
        return torch.where(take_cheap, self.cheap, self.full)


class PolicyController(Controller):
    """Runs a :class:`SolPolicy` step by step.

    Args:
        policy: the trained policy.
        do_sample: sample actions (at ``temperature``) instead of taking the most likely one.
        budget_guard: if set, only actions within this slack of what the step should spend are
            allowed (keeps the achieved budget on target); ``None`` lets the policy choose freely.
        ranked: (greedy decisions, unified cost budgets only) when the row must save compute
            (its most likely allowed action would lift the running mean above the target), take
            the most likely *cheaper* allowed action at steps where the policy prefers it more,
            relative to the most likely one, than on average over this row's earlier steps.
            Greedy alone saves only when the guard forces it, at times set by the budget, not by
            the token; ranking moves those savings to the tokens the policy finds easiest.
    """

    uses_policy = True

    name = "policy"

    def __init__(self, policy: SolPolicy, do_sample: bool = False, temperature: float = 1.0,
                 budget_guard: float | None = 0.25, seed: int | None = None, ranked: bool = False):
        if ranked and do_sample:
            raise ValueError("ranked decisions are greedy: use ranked=True with do_sample=False")
        super().__init__(policy.space)
        self.ranked = ranked
        self.preference_sum: torch.Tensor | None = None  # (B,) running sum of log pi(cheaper) - log pi(best)
        self.preference_count: torch.Tensor | None = None
        self.policy = policy
        self.do_sample = do_sample
        self.temperature = temperature
        self.budget_guard = budget_guard
        self.seed = seed
        self.cache: list | None = None
        self.generator: torch.Generator | None = None
        self.last_log_probs: torch.Tensor | None = None
        self.last_allowed: torch.Tensor | None = None

    @property
    def needs_lm_confidence(self) -> bool:  # the policy's observation includes it
        return self.policy.config.observe_lm_confidence

    def reset(self) -> None:
        self.cache = None
        self.generator = None
        self.preference_sum = None
        self.preference_count = None

    def _ranked(self, ctx: DecisionContext, masked: torch.Tensor) -> torch.Tensor:
        """masked: (B, N) log-probs, disallowed = -inf -> (B,) actions (see ``ranked``)."""
        best = masked.argmax(-1)
        cost = ctx.cost_table
        best_cost = cost.gather(-1, best.unsqueeze(-1))
        cheaper = torch.where(cost < best_cost - 1e-6, masked, -torch.inf)
        alternative = cheaper.argmax(-1)
        preference = cheaper.gather(-1, alternative.unsqueeze(-1)).squeeze(-1) - masked.gather(-1, best.unsqueeze(-1)).squeeze(-1)
        has_alternative = torch.isfinite(preference)
        if self.preference_sum is None:
            self.preference_sum = torch.zeros_like(preference)
            self.preference_count = torch.zeros_like(preference)
        seen = self.preference_count > 0
        usual = self.preference_sum / self.preference_count.clamp_min(1.0)
        must_save = ctx.targets.is_set[:, 0] & (ctx.requirement[:, 0] < best_cost.squeeze(-1) - 1e-6)
        take = must_save & has_alternative & seen & (preference >= usual)
        self.preference_sum = self.preference_sum + torch.where(has_alternative, preference, 0.0)
        self.preference_count = self.preference_count + has_alternative.float()
        return torch.where(take, alternative, best)

    @staticmethod
    def behaviour_log_probs(log_probs: torch.Tensor, allowed: torch.Tensor | None, temperature: float) -> torch.Tensor:
        """(..., N) policy log-probs -> log-probs of the distribution actions are drawn from:
        disallowed actions removed, then tempered. Training recomputes exactly this with grad."""
        if allowed is not None:
            log_probs = log_probs.masked_fill(~allowed, -torch.inf)
        return torch.log_softmax(log_probs / temperature, dim=-1)

    @torch.no_grad()
    def decide(self, ctx: DecisionContext) -> torch.Tensor:
        log_probs, self.cache = self.policy.step(ctx.observation, self.cache, ctx.step)
        allowed = None if self.budget_guard is None else budget_guard_mask(self.space, ctx, self.budget_guard)
        self.last_allowed = allowed
        if not self.do_sample:
            masked = log_probs if allowed is None else log_probs.masked_fill(~allowed, -torch.inf)
            self.last_log_probs = self.behaviour_log_probs(log_probs, allowed, 1.0)
            return self._ranked(ctx, masked) if self.ranked else masked.argmax(-1)
        log_probs = self.behaviour_log_probs(log_probs, allowed, self.temperature)
        self.last_log_probs = log_probs
        device = log_probs.device
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        uniform = torch.rand(log_probs.shape, generator=self.generator, device=device).clamp_min(1e-20)
        return (log_probs - torch.log(-torch.log(uniform))).argmax(-1)
