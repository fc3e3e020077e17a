"""What a decode step reads: the byte inventory of a wrapped model, and the per-generate report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from ..actions import SiteBytes, StepBytes
from ..adapters import ModelAdapter
from ..config import SolConfig
from .lora import idle_adapter_parameters
from .projections import int8_row_bytes, projection_bytes, projection_widths

__all__ = ["measure_step_bytes", "SolComputeReport"]


def measure_step_bytes(base: PreTrainedModel, adapter: ModelAdapter, config: SolConfig, policy_bytes: float) -> StepBytes:
    """Bytes a decode step reads, from the base model's real parameters and its config (with a
    PEFT-adapted base: the active LoRA adapters' weights too, the inactive ones not)."""
    idle = idle_adapter_parameters(base)  # PEFT adapters a forward does not apply
    unique = {id(p): p for p in base.parameters() if id(p) not in idle}
    layers = adapter.decoder_layers(base)
    sites = []
    for site in config.sparse_inputs:
        total, widths, rows, int8_rows = 0, [], [], []
        for layer in layers:
            projections = adapter.site_projections(layer, site)
            total += projection_bytes(projections)
            width, row = projection_widths(projections)
            widths.append(width)
            rows.append(row)
            if config.quantize == "weights":
                int8_rows.append(int8_row_bytes(projections))
        sites.append(SiteBytes(site, float(total), tuple(widths), tuple(rows), tuple(int8_rows)))
    sparse_total = sum(site.total for site in sites)
    fixed = sum(_nbytes(p) for p in unique.values()) - sparse_total - _unread_lookup_bytes(base, adapter)
    fixed -= _unread_expert_bytes(base, adapter)
    text = base.config.get_text_config()
    n_layers = len(layers)
    element = next(base.parameters()).element_size()
    layer_types = getattr(text, "layer_types", None)
    sliding = getattr(text, "sliding_window", None) or 0
    if layer_types is not None:
        window = tuple(int(sliding) if t == "sliding_attention" else 0 for t in layer_types[:n_layers])
    else:
        window = (int(sliding),) * n_layers
    return StepBytes(
        fixed=float(fixed),
        sites=tuple(sites),
        kv_per_token=tuple(float(adapter.kv_channels(layer, text) * element) for layer in layers),
        window=window,
        policy=float(policy_bytes),
        weight_dtype=str(adapter.site_projections(layers[-1], config.sparse_inputs[0])[0].weight.dtype).removeprefix("torch."),
    )


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _unread_lookup_bytes(base: PreTrainedModel, adapter: ModelAdapter) -> int:
    """Bytes of the row-lookup embeddings a step does not read: all but the one row it looks up
    (an embedding tied to the LM head is read whole by the head besides that row)."""
    output_embedding = base.get_output_embeddings()
    lm_head_ids = {id(p) for p in output_embedding.parameters()} if output_embedding is not None else set()
    unread = 0
    for path in adapter.embeddings:
        weight = base.get_submodule(path).weight
        whole = 0 if id(weight) in lm_head_ids else _nbytes(weight)
        unread += whole - weight.shape[-1] * weight.element_size()
    return unread


def _unread_expert_bytes(base: PreTrainedModel, adapter: ModelAdapter) -> float:
    """Bytes of the routed experts a token does not read: of the experts stacked in a mixture-of-
    experts MLP's 3-D weights (E, ., .), a token reads its ``experts_per_token`` (shared experts and
    the router, 2-D weights, are read in full)."""
    if not adapter.mixture_of_experts:
        return 0.0
    unread = 0.0
    for layer in adapter.decoder_layers(base):
        for p in adapter.mlp_module(layer).parameters():
            if p.ndim >= 3:
                unread += _nbytes(p) * (1.0 - min(adapter.experts_per_token, p.shape[0]) / p.shape[0])
    return unread


@dataclass
class SolComputeReport:
    """What the controlled decode steps of the last ``generate`` achieved, per batch row.

    Tensors are (B,) on the CPU; means over the controlled steps.

    Attributes:
        cost: bytes the executing code read / bytes of the dense step: the fixed weights, the
            kept weight rows the pruned projections read, the K/V slots and page metadata attention
            read, the policy's weights when a policy decided. In a batch, a read one row makes
            alone is charged to it, and a read the batch shares (a dense projection) is charged to
            every row in full, as a row decoded alone would read it.
        standalone_cost: what each row's actions read on this backend when the row is decoded
            alone (the cost table; the budget tracker follows it). Equal to ``cost`` for one row;
            in a batch ``cost`` can be higher where rows share a dense read.
        nominal_cost: the same actions priced as an ideal kernel would read them (keep fraction x
            weight bytes, selected pages plus their metadata), whatever actually executed.
        attention_read: K/V + metadata bytes attention read / the dense step's K/V bytes.
        attention_keep, activation_keep, bits: nominal per-axis means of the chosen actions.
        target: the unified budget per row (NaN where the row had a per-axis budget or none).
    """

    controller: str
    controlled_steps: int
    cost: torch.Tensor
    standalone_cost: torch.Tensor
    nominal_cost: torch.Tensor
    attention_keep: torch.Tensor
    attention_read: torch.Tensor
    activation_keep: torch.Tensor
    bits: torch.Tensor
    target: torch.Tensor = field(default=None)

    _FIELDS = ("cost", "standalone_cost", "nominal_cost", "attention_keep", "attention_read", "activation_keep", "bits", "target")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"controller": self.controller, "controlled_steps": self.controlled_steps}
        for name in self._FIELDS:
            value = getattr(self, name)
            out[name] = None if value is None else [round(float(v), 4) for v in value]
        return out

    def __str__(self) -> str:
        d = self.to_dict()
        rows = []
        for i in range(len(d["cost"])):
            rows.append(
                f"row {i}: cost {d['cost'][i]:.3f} (alone {d['standalone_cost'][i]:.3f}, nominal {d['nominal_cost'][i]:.3f}) "
                f"| attention keep "
                f"{d['attention_keep'][i]:.3f} (read {d['attention_read'][i]:.3f}) | activation keep {d['activation_keep'][i]:.3f} "
                f"| bits {d['bits'][i]:.2f}"
            )
        return f"SolComputeReport({self.controller}, {self.controlled_steps} controlled steps)\n" + "\n".join(rows)
