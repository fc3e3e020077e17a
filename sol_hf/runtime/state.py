"""The state a controlled forward call carries from the decision to the executing ops.

A :class:`StepState` is set on the :class:`Runtime` of a wrapped model for the duration of one
controlled forward call. The attention function and the patched projections read the per-row
actions from it and add the bytes they actually read to its counters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import SolConfig

__all__ = ["ByteCounter", "HostPlan", "StepState", "Runtime"]


class ByteCounter:
    """Bytes read per row during one forward call, added layer by layer.

    A read every row makes alike is a Python float (no op); per-row reads are a host list (for
    host-planned steps, whose sizes are on the host anyway) or a device tensor (no host sync).
    :meth:`total` combines them once per step.
    """

    def __init__(self, rows: int):
        self.rows = rows
        self.common = 0.0
        self.host: list[float] | None = None
        self.device: torch.Tensor | None = None

    def add(self, value) -> None:
        """``value``: a float (every row), a list of R floats, or an (R,) tensor."""
        if isinstance(value, torch.Tensor):
            value = value.to(torch.float64)
            self.device = value.clone() if self.device is None else self.device + value
        elif isinstance(value, (list, tuple)):
            self.host = list(value) if self.host is None else [a + b for a, b in zip(self.host, value)]
        else:
            self.common += float(value)

    def total(self, device: torch.device) -> torch.Tensor:
        """(R,) float64 on ``device``."""
        out = torch.full((self.rows,), self.common, dtype=torch.float64, device=device)
        if self.host is not None:
            out = out + torch.tensor(self.host, dtype=torch.float64, device=device)
        if self.device is not None:
            out = out + self.device
        return out


@dataclass(frozen=True)
class HostPlan:
    """Host copies of a step's per-row actions, for backends whose ops need sizes on the host.

    The torch ops that read fewer bytes on CPU (``embedding_bag`` over kept rows, a gather of the
    selected pages) need the number of rows / pages to read as Python ints. On CPU a device-to-host
    read is free, so the step reads its (R,) action values once. Triton kernels read sizes on the
    device, so CUDA steps run without a plan (``StepState.host is None``) and never sync.
    """

    activation_index: tuple[int, ...]
    attention_keep: tuple[float, ...]
    bits: tuple[int, ...]
    activation_keep: tuple[float, ...]

    @functools.cached_property  # read by every projection and attention call of the step
    def any_quant(self) -> bool:
        return any(b < 16 for b in self.bits)

    @functools.cached_property
    def all_attention_dense(self) -> bool:
        return all(k >= 1.0 for k in self.attention_keep)

    @functools.cached_property
    def all_channels_kept(self) -> bool:
        return all(k >= 1.0 for k in self.activation_keep)


@dataclass
class StepState:
    """Per-row actions of the forward call in progress. ``R = B * T`` rows, b-major.

    Attributes:
        attention_keep: (R,) float32 fraction of valid KV tokens to read.
        activation_index: (R,) int64 index of the activation keep level in ``config.activation_keep``.
        bits: (R,) int64 MLP-output bit-width (16 = off).
        config: the model's :class:`SolConfig`.
        host: host copies of the actions (CPU), or ``None`` (Triton: sizes stay on the device).
        decode: one query per row (a decode step): the executed paths run. Teacher-forced calls
            with several positions per row run the masked reference ops instead.
        projection_bytes: bytes of the pruned sites' weights the executed projections read, per row (added per layer).
        kv_bytes: K/V + page-metadata bytes attention read, per row (added per layer).
        left_padding: (B,) int64 padding tokens before each row's first token, or ``None``.
        total_length: tokens in the (padded) sequence so far, the current ones included.
        cache: the KV cache of the call (a :class:`~sol_hf.cache.PageBoundsLayer` in it supplies
            the Quest page bounds instead of recomputing them from every key).
        layouts: per (kv_len, q_len), slot masks computed once per step and shared by the layers.
        projections_dense: every row keeps every input channel at full precision and the host
            knows it: the patched projections run their original forward untouched, and the step
            was charged every pruned site's full bytes when it was made (one sum per step, not a
            Python call per projection).
    """

    attention_keep: torch.Tensor
    activation_index: torch.Tensor
    bits: torch.Tensor
    config: SolConfig
    host: HostPlan | None = None
    decode: bool = True
    projection_bytes: ByteCounter | None = None
    kv_bytes: ByteCounter | None = None
    left_padding: torch.Tensor | None = None
    total_length: int = 0
    cache: Any = None
    layouts: dict = field(default_factory=dict)
    projections_dense: bool = False

    def __post_init__(self) -> None:
        rows = self.attention_keep.shape[0]
        if self.projection_bytes is None:
            self.projection_bytes = ByteCounter(rows)
        if self.kv_bytes is None:
            self.kv_bytes = ByteCounter(rows)


class Runtime:
    """Plain (non-Module) object shared by the patched modules and the attention function of one
    wrapped model: the step in progress, the generation session, the captured hidden state."""

    def __init__(self, original_attn: str, cost_model: Any):
        self.original_attn = original_attn
        self.cost_model = cost_model  # the attention path is chosen by the rule it predicts with
        self.step: StepState | None = None
        self.session: Any = None
        self.last_hidden: torch.Tensor | None = None
        self.capture_hidden = False
