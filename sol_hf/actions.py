"""The action grid (index <-> per-axis values) and the byte cost model of a decode step.

An action is one point of ``attention_keep x activation_keep x bits``; its flat index is
``i_attention * (n_activation * n_bits) + i_activation * n_bits + i_bits`` (attention outermost, as the paper).

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

__all__ = ["ActionSpace", "SiteBytes", "StepBytes", "CostModel", "kept_count", "pages_wanted", "forced_page_count", "attention_runs_sparse", "sparse_linear_pays", "read_factor", "page_read_tokens",
           "effective_attention_keep"]


class ActionSpace:
    """The flattened Cartesian grid of actions of a :class:`SolConfig`."""

    def __init__(self, config: SolConfig):
        self.attention_keep = tuple(config.attention_keep)
        self.activation_keep = tuple(config.activation_keep)
        self.bits = tuple(config.bits)
        self.shape = (len(self.attention_keep), len(self.activation_keep), len(self.bits))
        self.num_actions = self.shape[0] * self.shape[1] * self.shape[2]
        self.dense_index = self.index_of(1.0, 1.0, 16)
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    def index_of(self, attention_keep: float, activation_keep: float, bits: int) -> int:
        """Flat index of an action given by its per-axis values (host-side, for users)."""
        for name, grid, value in (
            ("attention_keep", self.attention_keep, attention_keep),
            ("activation_keep", self.activation_keep, activation_keep),
            ("bits", self.bits, bits),
        ):
            if not any(math.isclose(value, g) for g in grid):
                raise ValueError(f"{name}={value} is not in the action grid {grid}")
        i = next(j for j, g in enumerate(self.attention_keep) if math.isclose(g, attention_keep))
        m = next(j for j, g in enumerate(self.activation_keep) if math.isclose(g, activation_keep))
        b = next(j for j, g in enumerate(self.bits) if g == bits)
        return (i * self.shape[1] + m) * self.shape[2] + b

    def tag(self, index: int) -> str:
        i, m, b = self.axis_indices_host(index)
        return f"k{round(self.attention_keep[i] * 100):03d}-m{round(self.activation_keep[m] * 100):03d}-q{self.bits[b]}"

    def axis_indices_host(self, index: int) -> tuple[int, int, int]:
        if not 0 <= index < self.num_actions:
            raise ValueError(f"action index {index} is outside [0, {self.num_actions})")
        per_attention = self.shape[1] * self.shape[2]
        return index // per_attention, (index % per_attention) // self.shape[2], index % self.shape[2]

    def tables(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Per-action lookup tables on ``device``: attention_keep, activation_keep (float32), bits (int64),
        and the axis indices, each of shape (N,)."""
        device = torch.device(device)
        if device not in self._tables:
            grid = torch.arange(self.num_actions)
            per_attention = self.shape[1] * self.shape[2]
            ia, im, ib = grid // per_attention, (grid % per_attention) // self.shape[2], grid % self.shape[2]
            self._tables[device] = {
                "attention_keep": torch.tensor(self.attention_keep, dtype=torch.float32)[ia].to(device),
                "activation_keep": torch.tensor(self.activation_keep, dtype=torch.float32)[im].to(device),
                "bits": torch.tensor(self.bits, dtype=torch.int64)[ib].to(device),
                "attention_index": ia.to(device),
                "activation_index": im.to(device),
                "bits_index": ib.to(device),
            }
        return self._tables[device]

    def values(self, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-axis values of ``actions`` (any shape of int64 indices), same shape each."""
        tables = self.tables(actions.device)
        return {name: table[actions] for name, table in tables.items()}


def kept_count(keep: float, width: int) -> int:
    """Channels kept at keep fraction ``keep`` of ``width`` channels: ``ceil(keep * width)``,
    computed so that float noise (``0.7 * 10 = 7.000000000000001``) does not add a channel."""
    return max(0, min(width, math.ceil(keep * width - 1e-9)))


@dataclass(frozen=True)
class SiteBytes:
    """The weights of one sparse-input site (say every layer's q/k/v projections).

    Attributes:
        name: the site (one of :data:`sol_hf.config.SPARSE_INPUT_SITES`).
        total: bytes of the site's weights and biases over all layers.
        widths: per layer, input channels of the site's projections.
        row_bytes: per layer, bytes of one input channel's weights (one row of the transposed
            weight, the site's fused projections together).
    """

    name: str
    total: float
    widths: tuple[int, ...]
    row_bytes: tuple[float, ...]
    int8_row_bytes: tuple[float, ...] = ()

    def executed_bytes(self, keep: float, read_factor: float = 1.0, bits: int = 16) -> float:
        """Bytes the executing ops read for one row at ``keep`` (host-side, once per level): the
        kept rows of each layer's transposed weight where the sparse op is faster than the dense
        projection (:func:`sparse_linear_pays`), else the whole projection (biases included).
        At ``bits`` 8 with int8 copies (``int8_row_bytes``, per layer) the kept rows of the int8
        copy, always (the int8 op is the only path that computes with the int8 weights)."""
        total = self.total
        for layer, (width, row) in enumerate(zip(self.widths, self.row_bytes)):
            count = kept_count(keep, width)
            if bits < 16 and self.int8_row_bytes:
                total -= width * row - count * self.int8_row_bytes[layer]
            elif sparse_linear_pays(count, width, read_factor):
                total -= (width - count) * row
        return total

    def nominal_bytes(self, keep: float, bits: int = 16) -> float:
        """What an ideal kernel reads at ``keep``: the keep fraction of every row of the weights (of
        the int8 copy at ``bits`` 8 where there is one), biases in full."""
        rows = sum(w * r for w, r in zip(self.widths, self.row_bytes))
        if bits < 16 and self.int8_row_bytes:
            return self.total - rows + keep * sum(w * r for w, r in zip(self.widths, self.int8_row_bytes))
        return self.total - rows + keep * rows


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step of one row reads, split by what scales with which action.

    Attributes:
        fixed: read whatever the action: norms, LM head, the embedding row, and every projection
            whose input is not pruned (not in ``sites``).
        sites: the projections whose input the activation axis prunes, one entry per site.
        kv_per_token: per layer, bytes of one token's K and V.
        window: per layer, the sliding window (``0`` for full attention).
        policy: the policy's parameter bytes (read once per step when a policy decides).
        weight_dtype: dtype of the projection weights (the sparse op's speed depends on it).
    """

    fixed: float
    sites: tuple[SiteBytes, ...]
    kv_per_token: tuple[float, ...]
    window: tuple[int, ...]
    policy: float = 0.0
    weight_dtype: str = "float32"

    @property
    def sparse_total(self) -> float:
        """Bytes of every pruned site's weights (all read by a dense step)."""
        return sum(site.total for site in self.sites)


def read_factor(factors: dict[str, float], device_type: str, dtype: torch.dtype | str) -> float:
    """The entry of ``factors`` for ``device_type`` and the weights' ``dtype`` (``"cpu:bfloat16"``),
    else for the device type alone (``"cpu"``), else 1.0."""
    name = str(dtype).removeprefix("torch.")
    return factors.get(f"{device_type}:{name}", factors.get(device_type, 1.0))


def sparse_linear_pays(rows_read: float, width: int, read_factor: float) -> bool:
    """Whether reading ``rows_read`` kept weight rows with the sparse op is faster than reading all
    ``width`` rows with the dense projection, on a backend whose sparse op costs ``read_factor``
    times the dense op's time per byte (its measured bandwidth penalty)."""
    return rows_read * read_factor < width


def pages_wanted(keep: torch.Tensor, length: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pages a keep fraction asks for: ``ceil(ceil(keep * length) / page_size)`` in float64, with
    the same guard against float noise as :func:`kept_count` (shared by the cost model and the
    executing attention, so prediction and execution agree)."""
    tokens = torch.ceil(keep.to(torch.float64) * length.to(torch.float64) - 1e-9)
    return torch.ceil(tokens / page_size)


def forced_page_count(length: torch.Tensor, page_size: int, sink_tokens: int, recent_tokens: int) -> torch.Tensor:
    """Pages holding a sink token (the first ``sink_tokens``) or a recent token (the last
    ``recent_tokens``, the current one included) of ``length`` (...) valid tokens counted from
    the row's first token; float64, as the page selection forces them."""
    length = length.to(torch.float64)
    last = torch.floor((length - 1).clamp(min=0) / page_size)
    recent_first = torch.floor((length - recent_tokens).clamp(min=0) / page_size)
    sink_pages = torch.ceil(torch.minimum(length, torch.full_like(length, float(sink_tokens))) / page_size)
    overlap = (sink_pages - recent_first).clamp(min=0)
    recent = torch.where(length > 0, last - recent_first + 1, torch.zeros_like(length))
    return recent + sink_pages - overlap


def attention_runs_sparse(tokens_read, metadata_tokens, effective_length, overhead_tokens):
    """The executed attention path, decided by cost: page-sparse attention runs where the KV
    slots it reads, its page metadata and the backend's fixed overhead of the extra ops (all in
    units of one token's K+V bytes) come to fewer bytes than reading every slot. Any
    broadcastable tensors (or floats); returns bool."""
    return tokens_read + metadata_tokens + overhead_tokens < effective_length


def page_read_tokens(keep: torch.Tensor, length: torch.Tensor, page_size: int, sink_tokens: int,
                     recent_tokens: int, quest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What page-sparse attention at ``keep`` reads of ``length`` valid tokens (broadcast), in
    tokens' worth of K+V bytes, float64: the slots of the pages the selection reads (the wanted
    pages, at least the forced ones, at most the valid ones; whole pages, capped at the valid
    tokens) and the Quest page bounds (one K+V row per valid page; none for recency)."""
    keep = keep.to(torch.float64)
    length = length.to(torch.float64)
    valid_pages = torch.ceil(length / page_size)
    forced = forced_page_count(length, page_size, sink_tokens, recent_tokens)
    pages = torch.minimum(torch.maximum(pages_wanted(keep, length, page_size), forced), valid_pages)
    tokens = torch.minimum(pages * page_size, length)
    return tokens, valid_pages if quest else torch.zeros_like(valid_pages)


def effective_attention_keep(keep: torch.Tensor, length: torch.Tensor, page_size: int, sink_tokens: int,
                             recent_tokens: int, quest: bool, overhead_tokens) -> torch.Tensor:
    """The keep fraction attention executes for rows decoded alone: ``keep`` where page-sparse
    attention reads fewer bytes than dense at ``length`` valid tokens (see
    :func:`attention_runs_sparse`), else 1.0 (dense: every page, no metadata). Broadcasts
    ``keep`` against ``length``; float64."""
    keep = keep.to(torch.float64)
    tokens, meta = page_read_tokens(keep, length, page_size, sink_tokens, recent_tokens, quest)
    sparse = (keep < 1.0) & attention_runs_sparse(tokens, meta, length.to(torch.float64), overhead_tokens)
    return torch.where(sparse, keep, torch.ones_like(keep))


class CostModel:
    """Predicts the cost fraction of actions at given context lengths, as the executing
    backend reads them (``cost_table``) and as an ideal kernel would (``nominal_cost_table``).

    ``attention_overhead_bytes`` is the executing backend's fixed cost of the page-sparse
    attention path per layer call (its extra ops), in bytes: where the pages skipped would save
    less than that, attention runs dense and the attention action is credited nothing.
    ``sparse_linear_read_factor`` is, per device type, the sparse projection op's time per byte
    over the dense projection's: where it would be slower than the dense projection, the masked
    dense projection runs and that projection is credited nothing.
    """

    def __init__(self, space: ActionSpace, step_bytes: StepBytes, config: SolConfig,
                 attention_overhead_bytes: dict[str, float] | None = None,
                 sparse_linear_read_factor: dict[str, float] | None = None):
        self.space = space
        self.bytes = step_bytes
        self.page_size = config.page_size
        self.quest = config.selection == "quest"
        self.sink_tokens, self.recent_tokens = config.sink_tokens, config.recent_tokens
        # Shared, not copied: the model's runtime reads the same dict, so one edit moves both.
        self.attention_overhead_bytes = attention_overhead_bytes if attention_overhead_bytes is not None else {}
        self._sparse_from: dict[tuple[str, float], float] = {}
        self.sparse_linear_read_factor = sparse_linear_read_factor if sparse_linear_read_factor is not None else {}
        self._nominal_levels = [[sum(site.nominal_bytes(k, b) for site in step_bytes.sites) for b in space.bits]
                                for k in space.activation_keep]
        self._sparse_executed: dict[tuple[torch.device, float], torch.Tensor] = {}
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Constant tables on ``device``, built once (no host-to-device copy per step)."""
        device = torch.device(device)
        if device not in self._device_tables:
            f64 = dict(dtype=torch.float64, device=device)
            self._device_tables[device] = {
                "kv": torch.tensor(self.bytes.kv_per_token, **f64),
                "window": torch.tensor(self.bytes.window, **f64),
                "activation_nominal": torch.tensor(self._nominal_levels, **f64),
            }
        return self._device_tables[device]

    def sparse_executed_bytes(self, device: torch.device, backend: str | None = None) -> torch.Tensor:
        """(activation levels, bits levels) float64 on ``device``: bytes of the pruned sites' weights
        one row reads at each activation keep level and bit-width, as executed on ``backend``
        (default ``device``'s type; see :meth:`SiteBytes.executed_bytes`)."""
        device = torch.device(device)
        factor = read_factor(self.sparse_linear_read_factor, backend or device.type, self.bytes.weight_dtype)
        if (device, factor) not in self._sparse_executed:
            levels = [[sum(site.executed_bytes(k, factor, b) for site in self.bytes.sites) for b in self.space.bits]
                      for k in self.space.activation_keep]
            self._sparse_executed[(device, factor)] = torch.tensor(levels, dtype=torch.float64, device=device)
        return self._sparse_executed[(device, factor)]

    def overhead_tokens(self, device: torch.device, backend: str | None = None) -> torch.Tensor:
        """(L,) on ``device``: ``backend``'s (default ``device``'s type) sparse-attention overhead
        per layer in units of one token's K+V."""
        kv = self._tables(device)["kv"]
        return self.attention_overhead_bytes.get(backend or torch.device(device).type, 0.0) / kv

    def sparse_attention_from(self, device_type: str, search_limit: int = 1 << 20) -> float:
        """Host-side: the shortest valid length at which the grid's smallest attention keep level
        runs page-sparse on ``device_type`` (``inf`` if none up to ``search_limit``). Below it no
        row of any layer runs sparse, so a step can pick the dense path from the cache's shape
        alone (no host sync). Computed once per device type and overhead."""
        key = (device_type, self.attention_overhead_bytes.get(device_type, 0.0))
        if key not in self._sparse_from:
            lengths = torch.arange(1, search_limit + 1, dtype=torch.float64)
            keep = torch.tensor(min(self.space.attention_keep), dtype=torch.float64)
            overhead = key[1] / max(self.bytes.kv_per_token)  # the largest layer pays off first
            executed = effective_attention_keep(
                keep, lengths, self.page_size, self.sink_tokens, self.recent_tokens, self.quest, overhead
            )
            sparse = torch.nonzero(executed < 1.0)
            self._sparse_from[key] = float(lengths[sparse[0, 0]]) if len(sparse) else float("inf")
        return self._sparse_from[key]

    def effective_lengths(self, context_length: torch.Tensor) -> torch.Tensor:
        """(...,) valid tokens incl. the current one -> (..., L) tokens each layer can attend to."""
        window = self._tables(context_length.device)["window"]
        length = context_length.to(torch.float64).unsqueeze(-1)
        return torch.where(window > 0, torch.minimum(length, window), length)

    def dense_kv_bytes(self, context_length: torch.Tensor) -> torch.Tensor:
        """(...,) -> (...,) float64 K/V bytes a dense step reads over all layers."""
        kv = self._tables(context_length.device)["kv"]
        return (self.effective_lengths(context_length) * kv).sum(-1)

    def dense_bytes(self, context_length: torch.Tensor) -> torch.Tensor:
        """(...,) -> (...,) float64 bytes of a dense step (no policy)."""
        b = self.bytes
        return b.fixed + b.sparse_total + self.dense_kv_bytes(context_length)

    def _kv_bytes(self, attention_keep: torch.Tensor, context_length: torch.Tensor, executed: bool,
                  backend: str | None = None) -> torch.Tensor:
        """KV + page-metadata bytes of ``attention_keep`` (...) at ``context_length`` (...)
        (broadcast), as executed on the tensors' device or as an ideal kernel reads them."""
        kv = self._tables(context_length.device)["kv"]
        eff = self.effective_lengths(context_length)  # (..., L)
        keep = attention_keep.to(torch.float64).unsqueeze(-1)
        if executed:
            keep = effective_attention_keep(
                keep, eff, self.page_size, self.sink_tokens, self.recent_tokens, self.quest,
                self.overhead_tokens(context_length.device, backend),
            )
            # Sliding-window layers read their (bounded) window dense: see sol_hf.runtime.attention.
            keep = torch.where(self._tables(context_length.device)["window"] > 0, 1.0, keep)
        tokens, meta = page_read_tokens(keep, eff, self.page_size, self.sink_tokens, self.recent_tokens, self.quest)
        read = torch.where(keep < 1.0, tokens + meta, eff)
        return (read * kv).sum(-1)

    def predicted_kv_bytes(self, attention_keep: torch.Tensor, context_length: torch.Tensor) -> torch.Tensor:
        """KV + page-metadata bytes the executing attention reads (see :func:`attention_runs_sparse`)."""
        return self._kv_bytes(attention_keep, context_length, executed=True)

    def _table(self, context_length: torch.Tensor, with_policy: bool, executed: bool, backend: str | None = None) -> torch.Tensor:
        t = self.space.tables(context_length.device)
        length = context_length.unsqueeze(-1)  # (..., 1)
        kv_bytes = self._kv_bytes(t["attention_keep"], length.expand(*context_length.shape, self.space.num_actions), executed, backend)
        levels = self.sparse_executed_bytes(context_length.device, backend) if executed else self._tables(context_length.device)["activation_nominal"]
        weights = levels[t["activation_index"], t["bits_index"]]
        total = self.bytes.fixed + weights + kv_bytes + (self.bytes.policy if with_policy else 0.0)
        return (total / self.dense_bytes(length)).to(torch.float32)

    def cost_table(self, context_length: torch.Tensor, with_policy: bool, backend: str | None = None) -> torch.Tensor:
        """(...,) valid lengths -> (..., N) cost fraction of every action as the executing backend
        (``backend``, default the tensors' device type) reads it for one row decoded alone: bytes
        read / dense bytes."""
        return self._table(context_length, with_policy, executed=True, backend=backend)

    def nominal_cost_table(self, context_length: torch.Tensor, with_policy: bool) -> torch.Tensor:
        """(...,) -> (..., N) the nominal cost fraction: what an ideal kernel would read (keep
        fraction x weight bytes, the pages selected plus their metadata), whatever executes."""
        return self._table(context_length, with_policy, executed=False)

    def cheapest_cost(self, context_length: int, with_policy: bool = False, device: torch.device | str = "cpu") -> float:
        """Host-side: the lowest reachable cost fraction at ``context_length`` tokens on the backend
        of ``device`` (computed on the CPU, so any device type can be asked about from anywhere)."""
        table = self.cost_table(torch.tensor([context_length]), with_policy, backend=torch.device(device).type)
        return float(table.min())
