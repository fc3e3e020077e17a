"""The action grid (index <-> per-axis values) and the byte cost model of a decode step.

An action is one point of ``attention_keep x mlp_keep x bits``; its flat index is
``i_attention * (n_mlp * n_bits) + i_mlp * n_bits + i_bits`` (attention outermost, as the paper).

The cost of a decode step is the bytes it must read under the action divided by the bytes the
dense step reads at the same context length: every weight matrix of every layer, the LM head,
the embedding row, the KV cache slots attention reads, the Quest page metadata, the quantized
activations, and (for a learned policy) the policy's own weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SolConfig

__all__ = ["ActionSpace", "StepBytes", "CostModel"]


class ActionSpace:
    """The flattened Cartesian grid of actions of a :class:`SolConfig`."""

    def __init__(self, config: SolConfig):
        self.attention_keep = tuple(config.attention_keep)
        self.mlp_keep = tuple(config.mlp_keep)
        self.bits = tuple(config.bits)
        self.shape = (len(self.attention_keep), len(self.mlp_keep), len(self.bits))
        self.num_actions = self.shape[0] * self.shape[1] * self.shape[2]
        self.dense_index = self.index_of(1.0, 1.0, 16)
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    def index_of(self, attention_keep: float, mlp_keep: float, bits: int) -> int:
        """Flat index of an action given by its per-axis values (host-side, for users)."""
        for name, grid, value in (
            ("attention_keep", self.attention_keep, attention_keep),
            ("mlp_keep", self.mlp_keep, mlp_keep),
            ("bits", self.bits, bits),
        ):
            if not any(math.isclose(value, g) for g in grid):
                raise ValueError(f"{name}={value} is not in the action grid {grid}")
        i = next(j for j, g in enumerate(self.attention_keep) if math.isclose(g, attention_keep))
        m = next(j for j, g in enumerate(self.mlp_keep) if math.isclose(g, mlp_keep))
        b = next(j for j, g in enumerate(self.bits) if g == bits)
        return (i * self.shape[1] + m) * self.shape[2] + b

    def tag(self, index: int) -> str:
        i, m, b = self.axis_indices_host(index)
        return f"k{round(self.attention_keep[i] * 100):03d}-m{round(self.mlp_keep[m] * 100):03d}-q{self.bits[b]}"

    def axis_indices_host(self, index: int) -> tuple[int, int, int]:
        if not 0 <= index < self.num_actions:
            raise ValueError(f"action index {index} is outside [0, {self.num_actions})")
        per_attention = self.shape[1] * self.shape[2]
        return index // per_attention, (index % per_attention) // self.shape[2], index % self.shape[2]

    def tables(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Per-action lookup tables on ``device``: attention_keep, mlp_keep (float32), bits (int64),
        and the axis indices, each of shape (N,)."""
        device = torch.device(device)
        if device not in self._tables:
            grid = torch.arange(self.num_actions)
            per_attention = self.shape[1] * self.shape[2]
            ia, im, ib = grid // per_attention, (grid % per_attention) // self.shape[2], grid % self.shape[2]
            self._tables[device] = {
                "attention_keep": torch.tensor(self.attention_keep, dtype=torch.float32)[ia].to(device),
                "mlp_keep": torch.tensor(self.mlp_keep, dtype=torch.float32)[im].to(device),
                "bits": torch.tensor(self.bits, dtype=torch.int64)[ib].to(device),
                "attention_index": ia.to(device),
                "mlp_index": im.to(device),
                "bits_index": ib.to(device),
            }
        return self._tables[device]

    def values(self, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-axis values of ``actions`` (any shape of int64 indices), same shape each."""
        tables = self.tables(actions.device)
        return {name: table[actions] for name, table in tables.items()}


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step of one row reads, split by what scales with which action.

    Attributes:
        fixed: read whatever the action (attention projections, norms, LM head, embedding row,
            the MLP output projection unless ``prune_intermediate``).
        mlp_input: weights of the MLP input projections (scale with the MLP keep fraction).
        mlp_output: weights of the MLP output projection (scale with the keep fraction only if
            ``prune_intermediate``).
        kv_per_token: per layer, bytes of one token's K and V.
        window: per layer, the sliding window (``0`` for full attention).
        activation_per_bit: bytes of the MLP outputs of all layers per bit of precision
            (``hidden_size * n_layers / 8``).
        policy: the policy's parameter bytes (read once per step when a policy decides).
    """

    fixed: float
    mlp_input: float
    mlp_output: float
    prune_intermediate: bool
    kv_per_token: tuple[float, ...]
    window: tuple[int, ...]
    activation_per_bit: float
    policy: float = 0.0


class CostModel:
    """Predicts and measures the cost fraction of actions at given context lengths."""

    def __init__(self, space: ActionSpace, step_bytes: StepBytes, config: SolConfig):
        self.space = space
        self.bytes = step_bytes
        self.page_size = config.page_size
        self.quest = config.selection == "quest"
        self.forced_pages = -(-config.sink_tokens // config.page_size) + -(-config.recent_tokens // config.page_size)
        self._layer_tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _layers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._layer_tensors:
            kv = torch.tensor(self.bytes.kv_per_token, dtype=torch.float64, device=device)
            window = torch.tensor(self.bytes.window, dtype=torch.float64, device=device)
            self._layer_tensors[device] = (kv, window)
        return self._layer_tensors[device]

    def effective_lengths(self, context_length: torch.Tensor) -> torch.Tensor:
        """(...,) valid tokens incl. the current one -> (..., L) tokens each layer can attend to."""
        kv, window = self._layers(context_length.device)
        length = context_length.to(torch.float64).unsqueeze(-1)
        return torch.where(window > 0, torch.minimum(length, window), length)

    def dense_kv_bytes(self, context_length: torch.Tensor) -> torch.Tensor:
        """(...,) -> (...,) float64 K/V bytes a dense step reads over all layers."""
        kv, _ = self._layers(context_length.device)
        return (self.effective_lengths(context_length) * kv).sum(-1)

    def dense_bytes(self, context_length: torch.Tensor) -> torch.Tensor:
        """(...,) -> (...,) float64 bytes of a dense step (no policy)."""
        b = self.bytes
        return b.fixed + b.mlp_input + b.mlp_output + self.dense_kv_bytes(context_length) + 16 * b.activation_per_bit

    def pages_read(self, attention_keep: torch.Tensor, effective_length: torch.Tensor) -> torch.Tensor:
        """Predicted pages read per layer, as the page selection computes them.

        Args:
            attention_keep: (..., 1) or broadcastable keep fractions.
            effective_length: (..., L) tokens per layer.
        """
        page = self.page_size
        valid_pages = torch.ceil(effective_length / page)
        wanted = torch.ceil(torch.ceil(attention_keep * effective_length) / page)
        forced = torch.clamp(valid_pages, max=float(self.forced_pages))
        return torch.minimum(torch.maximum(wanted, forced), valid_pages)

    def step_bytes(
        self,
        attention_keep: torch.Tensor,
        mlp_keep: torch.Tensor,
        bits: torch.Tensor,
        kv_bytes: torch.Tensor,
        with_policy: bool,
    ) -> torch.Tensor:
        """Bytes of a step given per-axis values and the KV + metadata bytes attention read."""
        b = self.bytes
        mlp = mlp_keep.to(torch.float64)
        weights = b.fixed + mlp * b.mlp_input + (mlp if b.prune_intermediate else 1.0) * b.mlp_output
        total = weights + kv_bytes + bits.to(torch.float64) * b.activation_per_bit
        return total + (b.policy if with_policy else 0.0)

    def predicted_kv_bytes(self, attention_keep: torch.Tensor, context_length: torch.Tensor) -> torch.Tensor:
        """KV + page-metadata bytes attention is predicted to read. Broadcasts
        ``attention_keep`` (...) against ``context_length`` (...)."""
        kv, _ = self._layers(context_length.device)
        eff = self.effective_lengths(context_length)  # (..., L)
        keep = attention_keep.to(torch.float64).unsqueeze(-1)
        pages = self.pages_read(keep, eff)
        tokens = torch.minimum(pages * self.page_size, eff)
        total = (tokens * kv).sum(-1)
        if self.quest:
            meta = (torch.ceil(eff / self.page_size) * kv).sum(-1)  # page min + max = one K and one V row per page
            total = total + torch.where(attention_keep.to(torch.float64) < 1.0, meta, torch.zeros_like(meta))
        return total

    def cost_table(self, context_length: torch.Tensor, with_policy: bool) -> torch.Tensor:
        """(B,) valid lengths -> (B, N) predicted cost fraction of every action."""
        t = self.space.tables(context_length.device)
        length = context_length.unsqueeze(-1)  # (B, 1)
        kv_bytes = self.predicted_kv_bytes(t["attention_keep"].unsqueeze(0), length.expand(-1, self.space.num_actions))
        total = self.step_bytes(t["attention_keep"], t["mlp_keep"], t["bits"], kv_bytes, with_policy)
        return (total / self.dense_bytes(length)).to(torch.float32)

    def cheapest_cost(self, context_length: int, with_policy: bool = False) -> float:
        """Host-side: the lowest reachable cost fraction at ``context_length`` tokens."""
        table = self.cost_table(torch.tensor([context_length]), with_policy)
        return float(table.min())
