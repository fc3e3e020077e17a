"""The controlled decode step: observe, decide, set per-row actions, (execute), account.

:class:`ControlledStep` is the one implementation of a controlled step. ``generate`` calls it
from hooks around each base-model forward; the teacher-forced episodes of training and
evaluation call it in their loop. Between :meth:`ControlledStep.state` and
:meth:`ControlledStep.account` the base model's forward runs, and the attention function and the
patched projections execute the actions (``sol_hf.runtime.attention``, ``sol_hf.runtime.projections``).
"""

from __future__ import annotations

import torch

from .. import ops
from ..budget import BudgetTargets, BudgetTracker
from ..policy import Controller, DecisionContext, PolicyObservation, lm_confidence_features
from .accounting import SolComputeReport
from .state import HostPlan, StepState

__all__ = ["ControlledStep"]


class ControlledStep:
    """Runs the controlled decode steps of B rows for one generation or one batch of episodes.

    Args:
        model: the :class:`~sol_hf.SolForCausalLM`.
        controller: picks the actions.
        targets: per-row budget targets (B rows).
        max_steps: controlled steps planned (the policy's progress feature).
        dense_rows: (B,) bool rows that run the dense action whatever the controller says.
        count_executed: also sum what the executed ops counted (``generate``'s report). Episodes
            skip it: their rows stand for B independent decodes, whatever the batch executed
            together, and the standalone cost is what each would read.
    """

    def __init__(self, model, controller: Controller, targets: BudgetTargets, max_steps: int,
                 dense_rows: torch.Tensor | None = None, count_executed: bool = True):
        self.model = model
        self.controller = controller
        self.tracker = BudgetTracker(targets, max_steps)
        self.dense_rows = dense_rows
        self.count_executed = count_executed
        device = targets.values.device
        # Torch ops need the step's sizes on the host (free on CPU); Triton kernels read them on the device.
        self.host_planning = not ops.use_triton(None, targets.values)
        model.cost_model.sparse_attention_from(device.type)  # host-side, once, before any step
        rows = targets.batch_size
        self.previous_action: torch.Tensor | None = None
        self.observation: PolicyObservation | None = None
        self.lengths: torch.Tensor | None = None
        self.cost_table: torch.Tensor | None = None
        self._tables: dict[str, torch.Tensor] | None = None
        zeros = lambda: torch.zeros(rows, dtype=torch.float64, device=device)  # noqa: E731
        self.nominal_spent, self.executed_spent, self.kv_read, self.kv_dense = zeros(), zeros(), zeros(), zeros()
        controller.reset()

    def decide(self, tokens: torch.Tensor, lengths: torch.Tensor, hidden: torch.Tensor | None,
               last_logits: torch.Tensor | None) -> torch.Tensor:
        """Pick this step's actions.

        Args:
            tokens: (B,) the tokens this step processes.
            lengths: (B,) valid tokens each row attends to, the current one included.
            hidden: (B, H) the base model's final hidden state at the previous position.
            last_logits: (B, V) the base model's logits at the previous position.
        Returns:
            (B,) int64 action indices (device tensor, no host sync).
        """
        model = self.model
        uses_policy = self.controller.uses_policy
        self.lengths = lengths
        self.cost_table = self._per_step(lengths)["cost"]
        confidence = lm_confidence_features(last_logits, tokens) if self.controller.needs_lm_confidence else None
        observation = None
        if uses_policy:
            previous = self.previous_action
            if previous is None:
                previous = torch.full_like(tokens, model.space.num_actions)
            embedding = model.get_input_embeddings()(tokens)
            observation = PolicyObservation(hidden, embedding, self.tracker.features(), previous, confidence)
        self.observation = observation
        ctx = DecisionContext(
            self.tracker.requirement(), self.tracker.targets, self.cost_table, observation, self.tracker.steps, confidence
        )
        actions = self.controller.decide(ctx)
        if self.dense_rows is not None:
            actions = torch.where(self.dense_rows, model.space.dense_index, actions)
        return actions

    def state(self, actions: torch.Tensor, left_padding: torch.Tensor | None = None, total_length: int = 0,
              cache=None, decode: bool = True) -> StepState:
        """The :class:`StepState` that executes ``actions`` ((B,) or (B, T)) in the next forward."""
        return self.model._step_state(actions, left_padding, total_length, cache, decode, self.host_planning)

    def account(self, actions: torch.Tensor, step: StepState) -> torch.Tensor:
        """Charge the finished step; returns (B,) each row's standalone cost fraction.

        The budget tracker follows the *standalone* cost: what the row's own action reads on this
        backend when the row is decoded alone (the cost table), so a row's decisions never depend
        on its batchmates. With ``count_executed`` the bytes the executed ops counted in this
        batch are summed beside it (the report's ``cost``); for one row the two are equal.
        """
        model = self.model
        cost_model = model.cost_model
        lengths = self.lengths
        uses_policy = self.controller.uses_policy
        pick = lambda table: table.gather(-1, actions.unsqueeze(-1)).squeeze(-1).double()  # noqa: E731
        standalone = pick(self.cost_table)
        tables = self._per_step(lengths)
        nominal = pick(tables["nominal"])
        dense = tables["dense"]
        if self.count_executed:
            kv_bytes = step.kv_bytes.total(dense.device)
            read = cost_model.bytes.fixed + step.projection_bytes.total(dense.device) + kv_bytes
            executed = (read + (cost_model.bytes.policy if uses_policy else 0.0)) / dense
            self.kv_read += kv_bytes
        else:
            executed = standalone
            self.kv_read += cost_model.predicted_kv_bytes(step.attention_keep, lengths)
        if uses_policy and self.dense_rows is not None:  # dense rows did not need the policy
            policy = cost_model.bytes.policy / dense
            standalone, nominal, executed = (torch.where(self.dense_rows, c - policy, c) for c in (standalone, nominal, executed))
        self.kv_dense += tables["dense_kv"]
        self.nominal_spent += nominal
        self.executed_spent += executed
        values = model.space.values(actions)
        self.tracker.update(standalone, values["attention_keep"], values["activation_keep"], values["bits"])
        self.previous_action = actions
        return standalone.float()

    def _per_step(self, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """This step's cost tables: (B, N) cost and nominal cost, (B,) dense and dense K/V bytes.

        A row's valid length grows by one token per step, so the tables of all ``max_steps``
        steps are computed at the first step, in one batch of ops, from its ``lengths``; later
        steps index them. Steps past ``max_steps`` compute their own.
        """
        step = self.tracker.steps
        if self._tables is None:  # the first step: every step's lengths at once, (B, max_steps)
            self._tables = self._cost_tables(lengths.unsqueeze(-1) + torch.arange(self.tracker.max_steps, device=lengths.device))
        if step < self._tables["cost"].shape[1]:
            return {name: table[:, step] for name, table in self._tables.items()}
        return {name: table[:, 0] for name, table in self._cost_tables(lengths.unsqueeze(-1)).items()}

    def _cost_tables(self, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cost tables at ``lengths`` (B, T): cost and nominal (B, T, N), dense and dense K/V (B, T)."""
        cost_model = self.model.cost_model
        uses_policy = self.controller.uses_policy
        return {
            "cost": cost_model.cost_table(lengths, uses_policy),
            "nominal": cost_model.nominal_cost_table(lengths, uses_policy),
            "dense": cost_model.dense_bytes(lengths),
            "dense_kv": cost_model.dense_kv_bytes(lengths),
        }

    def report(self) -> SolComputeReport:
        """Per-row means over the steps so far."""
        means = self.tracker.means().float().cpu()
        steps = self.tracker.steps
        if steps:
            read = (self.kv_read / self.kv_dense.clamp_min(1)).float().cpu()
            nominal = (self.nominal_spent / steps).float().cpu()
            executed = (self.executed_spent / steps).float().cpu()
        else:
            read = nominal = executed = torch.ones(means.shape[0])
        targets = self.tracker.targets
        return SolComputeReport(
            controller=self.controller.name,
            controlled_steps=steps,
            cost=executed,
            standalone_cost=means[:, 0],
            nominal_cost=nominal,
            attention_keep=means[:, 1],
            attention_read=read,
            activation_keep=means[:, 2],
            bits=means[:, 3] * 16,
            target=torch.where(targets.is_set[:, 0], targets.values[:, 0], torch.nan).float().cpu(),
        )


def host_plan(values: dict[str, torch.Tensor]) -> HostPlan:
    """Read a step's per-row action values to the host (once per step; CPU only)."""
    return HostPlan(
        activation_index=tuple(values["activation_index"].tolist()),
        attention_keep=tuple(values["attention_keep"].tolist()),
        bits=tuple(values["bits"].tolist()),
        activation_keep=tuple(values["activation_keep"].tolist()),
    )
