"""SolConfig: everything that defines a SOL policy's action space and shape, JSON round-trippable."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

# 2: the second axis became ``activation_keep`` over the projections named in ``sparse_inputs``
#    (1 had ``mlp_keep`` over the MLP input, plus ``prune_intermediate``); 1 files still load.
# 3: PEFT adapter fields. 4: ``quantize`` (what the bits axis quantizes); files of 3 and below
#    quantize activations, as read.
FORMAT_VERSION = 4
CONFIG_NAME = "sol_config.json"

# The projections whose input activation the activation axis prunes (TEAL-style top-|x| per token).
SPARSE_INPUT_SITES = ("attention_input", "attention_output", "mlp_input", "mlp_output")

SELECTION_CRITERIA = ("quest", "recency")
QUANTIZE_TARGETS = ("activations", "weights")
WEIGHT_BITS = (8, 16)  # weight-only copies the executing ops read (int8), and the original weights
ACTION_HEADS = ("joint", "factorized")
KV_REFRESH_MODES = ("none",)


def _as_float_tuple(name: str, values: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"SolConfig.{name} must be a list of numbers, got {values!r}") from None
    if not out:
        raise ValueError(f"SolConfig.{name} must not be empty")
    return out


@dataclass
class SolConfig:
    """Configuration of a SOL policy and the actions it picks from.

    The action grid is the Cartesian product ``attention_keep x activation_keep x bits``; one action
    applies to every layer of the base model for one decode step of one batch row.

    ``SolConfig()`` is the default that reaches low budgets (activation sparsity on the inputs of
    every projection, no activation quantization); ``SolConfig.from_preset("paper")`` is the
    paper's three axes (MLP-input sparsity and 8-bit MLP-output fake quantization) for parity runs.

    Args:
        attention_keep: fractions of the valid KV tokens attention reads (1.0 = dense).
        activation_keep: fractions of input channels kept, by per-token top-|x| (1.0 = dense), in
            the inputs of the projections named by ``sparse_inputs``; the executing ops read only
            the weight rows of the kept channels.
        sparse_inputs: which projections' inputs the activation axis prunes, any of
            ``"attention_input"`` (q/k/v, which share their input), ``"attention_output"`` (the
            output projection of attention), ``"mlp_input"`` (gate/up), ``"mlp_output"`` (down).
            Each site costs a transposed copy of its weights in memory (``nn.Linear`` layouts).
        bits: bit-widths of the precision axis (16 = full precision); what they quantize is
            ``quantize``.
        quantize: ``"activations"``: the MLP output's activations are fake-quantized to ``bits``
            (the paper's axis, for parity runs: it reads no fewer bytes, so it never lowers the
            cost); ``"weights"``: at 8 bits the projections of ``sparse_inputs`` read a
            weight-only int8 copy (per input channel and group of up to 512 output columns) instead of
            their weights, a quarter of fp32's bytes or half of bf16's, combined with the
            activation axis's kept channels. Opt-in: the copies cost memory (about a quarter of
            the sites' fp32 weights; ``model.prepared_weight_bytes``). Levels must be (8, 16).
        selection: how attention picks KV pages: ``"quest"`` (query-aware page key bounds) or
            ``"recency"`` (the most recent pages).
        page_size: tokens per KV page.
        sink_tokens: first tokens of each row whose pages are always read.
        recent_tokens: last tokens of each row (the current one included) whose pages are always read.
        policy_hidden_size: width of the policy transformer; ``None`` sizes it to about
            ``policy_param_fraction`` of the base model's parameters.
        policy_param_fraction: target policy size as a fraction of the base (used when
            ``policy_hidden_size`` is None).
        policy_layers, policy_heads: depth and heads of the policy transformer.
        policy_max_steps: learned position embeddings; later steps reuse the last position and
            the policy attends to at most this many past steps.
        action_embedding_size: size of the previous-action embedding.
        action_head: ``"joint"`` (one softmax over the whole grid, as the paper) or
            ``"factorized"`` (one softmax per axis).
        observe_lm_confidence: the policy also reads three numbers from the base model's previous
            next-token distribution (its normalised entropy, the probability it gave the token now
            being processed, its top probability). They are free at decode time (the logits exist
            anyway) and tell the policy how predictable the text is at this point.
        budget_range: (low, high) unified cost budgets the policy is trained for.
        kv_refresh: how KV entries written under sparse actions are treated; ``"none"`` keeps
            them as written (the paper's default at inference).
        base_model_name_or_path, base_revision: the base model the policy belongs to.
        adapter_name_or_path, adapter_revision: the PEFT adapter the policy belongs to, where the
            base is a ``PeftModel`` (recorded beside a fingerprint of the adapter's weights; loading
            the policy without a base loads this adapter onto the base).
    """

    attention_keep: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    activation_keep: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    sparse_inputs: tuple[str, ...] = SPARSE_INPUT_SITES
    bits: tuple[int, ...] = (16,)
    quantize: str = "activations"
    selection: str = "quest"
    page_size: int = 16
    sink_tokens: int = 4
    recent_tokens: int = 16
    policy_hidden_size: int | None = None
    policy_param_fraction: float = 0.005
    policy_layers: int = 1
    policy_heads: int = 4
    policy_max_steps: int = 1024
    action_embedding_size: int = 32
    action_head: str = "joint"
    observe_lm_confidence: bool = False
    budget_range: tuple[float, float] = (0.3, 1.0)
    kv_refresh: str = "none"
    base_model_name_or_path: str | None = None
    base_revision: str | None = None
    adapter_name_or_path: str | None = None
    adapter_revision: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.attention_keep = tuple(sorted(set(_as_float_tuple("attention_keep", self.attention_keep))))
        self.activation_keep = tuple(sorted(set(_as_float_tuple("activation_keep", self.activation_keep))))
        for name in ("attention_keep", "activation_keep"):
            values = getattr(self, name)
            if any(not (0.0 < v <= 1.0) or math.isnan(v) for v in values):
                raise ValueError(f"SolConfig.{name} values must lie in (0, 1], got {values}")
            if values[-1] != 1.0:
                raise ValueError(f"SolConfig.{name} must include 1.0 (the dense level), got {values}")
        try:
            sites = tuple(self.sparse_inputs) if not isinstance(self.sparse_inputs, str) else (self.sparse_inputs,)
        except TypeError:
            raise ValueError(f"SolConfig.sparse_inputs must be a list of site names, got {self.sparse_inputs!r}") from None
        unknown = sorted(set(sites) - set(SPARSE_INPUT_SITES))
        if unknown or not sites:
            raise ValueError(
                f"SolConfig.sparse_inputs must name at least one of {SPARSE_INPUT_SITES}, got {list(sites)}"
            )
        self.sparse_inputs = tuple(site for site in SPARSE_INPUT_SITES if site in sites)  # canonical order
        try:
            bits = tuple(sorted(set(int(b) for b in self.bits)))
        except (TypeError, ValueError):
            raise ValueError(f"SolConfig.bits must be a list of integers, got {self.bits!r}") from None
        if any(b < 2 or b > 16 for b in bits) or not bits or bits[-1] != 16:
            raise ValueError(f"SolConfig.bits must be integers in [2, 16] including 16 (no quantization), got {self.bits}")
        self.bits = bits
        if self.quantize not in QUANTIZE_TARGETS:
            raise ValueError(f"SolConfig.quantize must be one of {QUANTIZE_TARGETS}, got {self.quantize!r}")
        if self.quantize == "weights" and not set(bits) <= set(WEIGHT_BITS):
            raise ValueError(
                f"SolConfig.quantize='weights' reads int8 weight copies: bits must be levels of {WEIGHT_BITS}, got "
                f"{self.bits} (4-bit weights are not supported)"
            )
        if self.selection not in SELECTION_CRITERIA:
            raise ValueError(f"SolConfig.selection must be one of {SELECTION_CRITERIA}, got {self.selection!r}")
        if not isinstance(self.observe_lm_confidence, bool):
            raise ValueError(f"SolConfig.observe_lm_confidence must be true or false, got {self.observe_lm_confidence!r}")
        if self.action_head not in ACTION_HEADS:
            raise ValueError(f"SolConfig.action_head must be one of {ACTION_HEADS}, got {self.action_head!r}")
        if self.kv_refresh not in KV_REFRESH_MODES:
            raise ValueError(f"SolConfig.kv_refresh must be one of {KV_REFRESH_MODES}, got {self.kv_refresh!r}")
        for name in ("page_size", "policy_layers", "policy_heads", "policy_max_steps", "action_embedding_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SolConfig.{name} must be a positive integer, got {value!r}")
        for name in ("sink_tokens", "recent_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SolConfig.{name} must be a non-negative integer, got {value!r}")
        if self.recent_tokens < 1:
            raise ValueError("SolConfig.recent_tokens must be >= 1: the current token is always read")
        if self.policy_hidden_size is not None:
            if not isinstance(self.policy_hidden_size, int) or self.policy_hidden_size % self.policy_heads:
                raise ValueError(
                    f"SolConfig.policy_hidden_size must be an integer divisible by policy_heads={self.policy_heads}, "
                    f"got {self.policy_hidden_size!r}"
                )
        if not (0.0 < self.policy_param_fraction < 1.0):
            raise ValueError(f"SolConfig.policy_param_fraction must lie in (0, 1), got {self.policy_param_fraction}")
        low, high = (float(v) for v in self.budget_range)
        if not (0.0 < low <= high <= 1.0):
            raise ValueError(f"SolConfig.budget_range must satisfy 0 < low <= high <= 1, got {self.budget_range}")
        self.budget_range = (low, high)
        if not isinstance(self.format_version, int) or self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This sol_config was written by a newer sol_hf (format_version={self.format_version}); this "
                f"sol_hf reads format_version <= {FORMAT_VERSION}. Upgrade sol_hf: pip install -U sol-hf"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "SolConfig":
        """A named configuration: ``"default"`` (``SolConfig()``), ``"paper"`` (the paper's axes:
        KV pages, MLP-input sparsity at 0.4..1.0 and 8-bit MLP-output fake quantization, the
        action grid of sol_hf's format 1) or ``"int8-weights"`` (the default plus an 8-bit
        weight-only level on the precision axis; costs memory). ``overrides`` replace fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown SolConfig preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def num_actions(self) -> int:
        return len(self.attention_keep) * len(self.activation_keep) * len(self.bits)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SolConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a SolConfig must be a JSON object, got {type(data).__name__}")
        data = _upgrade(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"base_fingerprint", "adapter_fingerprint", "sol_hf_version"})
        if unknown and int(data.get("format_version", FORMAT_VERSION)) <= FORMAT_VERSION:
            raise ValueError(f"unknown SolConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "SolConfig":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "attention_keep": (0.1, 0.25, 0.5, 1.0),
        "activation_keep": (0.4, 0.6, 0.8, 1.0),
        "sparse_inputs": ("mlp_input",),
        "bits": (8, 16),
    },
    "int8-weights": {"bits": (8, 16), "quantize": "weights"},
}


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 config (``mlp_keep``, ``prune_intermediate``) in today's fields, same actions.
    Format 1 predates ``sparse_inputs``; its fields default to format 1's defaults. Format 2
    predates PEFT bases: its policies belong to bare base models (no adapter fields), as read."""
    version = data.get("format_version", 1 if ("mlp_keep" in data or "prune_intermediate" in data) else FORMAT_VERSION)
    if not isinstance(version, int) or version >= 2:
        return data
    data = dict(data)
    data["activation_keep"] = data.pop("mlp_keep", PRESETS["paper"]["activation_keep"])
    data.setdefault("bits", PRESETS["paper"]["bits"])
    data.setdefault("attention_keep", PRESETS["paper"]["attention_keep"])
    data["sparse_inputs"] = ("mlp_input", "mlp_output") if data.pop("prune_intermediate", False) else ("mlp_input",)
    data["format_version"] = FORMAT_VERSION
    return data


def replace(config: SolConfig, **changes: Any) -> SolConfig:
    """A copy of ``config`` with ``changes`` applied (validated again)."""
    return dataclasses.replace(config, **changes)


__all__ = ["SolConfig", "CONFIG_NAME", "FORMAT_VERSION", "PRESETS", "QUANTIZE_TARGETS", "SPARSE_INPUT_SITES", "replace"]
