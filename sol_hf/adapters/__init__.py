"""Where a causal LM keeps the parts SOL acts on, found from the model's structure.

SOL needs, in a ``*ForCausalLM``:

* the ``ModuleList`` of decoder layers, and in each layer
* the **attention module**: the child whose ``forward`` calls transformers' attention interface
  (``ALL_ATTENTION_FUNCTIONS``), where SOL's page-sparse attention is registered. Models whose
  attention does not go through the interface are refused: SOL could not act on their attention;
* its **input projections** (``q_proj``/``k_proj``/``v_proj``, or one fused ``qkv_proj``,
  ``c_attn``, ``query_key_value``, ``Wqkv``, ...: recognised by name, checked to read
  ``hidden_size`` channels) and its **output projection** (``o_proj``, ``dense``, ``c_proj``,
  ``out_proj``, ...: checked to write ``hidden_size`` channels);
* the **MLP**: the one other child with weights (or the layer itself where it holds its MLP
  projections directly, as OPT does), whose ``nn.Linear``/``Conv1D`` children are told apart by
  shape: input projections read ``hidden_size`` channels, the output projection writes them.
  A mixture-of-experts MLP (experts stacked in 3-D weights) takes no MLP sites: attention and
  bits actions still work, with ``SolConfig.sparse_inputs`` limited to the attention sites;
* the **LM head** (``get_output_embeddings()``), whose input (B, T, H) is the final-norm hidden
  state the policy observes (on every ``*ForCausalLM``, whatever the decoder body is called);
* the **embeddings** that look up one row per token (the input embedding, learned position
  embeddings such as GPT-2's ``wpe``), for the byte accounting.

:func:`adapter_for` finds these for any model (:mod:`sol_hf.adapters.discovery`). Where a
family's structure is ambiguous, an explicit :class:`ModelAdapter` in :data:`ADAPTERS` (keyed by
``config.model_type``) names the parts instead; it is checked the same way. Anything not found
raises a ``ValueError`` naming exactly what is missing; a family found by structure but not in
:data:`TESTED_MODEL_TYPES` gets a warning. ``docs/supported-models.md`` lists the families tested
end to end (``python benchmarks/supported_models.py`` runs the matrix and regenerates it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

__all__ = ["ADAPTERS", "ATTENTION_SITES", "TESTED_MODEL_TYPES", "ModelAdapter", "adapter_for", "projection_shape", "unsupported_message"]

# Families whose tiny models pass the end-to-end matrix (tests/test_families.py; the doc lists them).
TESTED_MODEL_TYPES = (
    "apertus", "arcee", "cohere", "cohere2", "ernie4_5", "exaone4", "gemma", "gemma2", "gemma3_text", "glm", "gpt2",
    "gpt_bigcode", "gpt_neox", "gptj", "granite", "granitemoe", "helium", "llama", "mistral", "mixtral", "nemotron",
    "olmo", "olmo2", "olmoe", "opt", "persimmon", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "seed_oss",
    "smollm3", "stablelm", "starcoder2",
)

MLP_SITES = ("mlp_input", "mlp_output")
ATTENTION_SITES = ("attention_input", "attention_output")


@dataclass(frozen=True)
class ModelAdapter:
    """Module paths of one model, relative to its ``*ForCausalLM`` root.

    Attributes:
        layers: dotted path to the ``ModuleList`` of decoder layers.
        attention: attribute of a decoder layer holding the attention module.
        attention_input_projections: attributes of the attention module that read the layer's
            normed hidden state (q/k/v, or one fused projection).
        attention_output_projection: attribute of the attention module that reads its output.
        mlp: attribute of a decoder layer holding the MLP, or ``""`` where the layer holds its MLP
            projections itself.
        mlp_input_projections: attributes of the MLP that read the MLP input (empty for a
            mixture-of-experts MLP).
        mlp_output_projection: attribute of the MLP that reads the intermediate activation
            (``None`` for a mixture-of-experts MLP).
        lm_head: dotted path to the output embedding, whose input (the final hidden state) the policy reads.
        embeddings: dotted paths of modules that look up one row per token (not whole reads).
        experts_per_token: for a mixture-of-experts MLP, how many routed experts a token reads
            (``None`` for dense MLPs).
        found_by: ``"structure"`` (found by :mod:`sol_hf.adapters.discovery`) or ``"table"``.
    """

    layers: str
    attention: str
    mlp: str
    mlp_input_projections: tuple[str, ...]
    mlp_output_projection: str | None
    lm_head: str
    embeddings: tuple[str, ...]
    attention_input_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    attention_output_projection: str = "o_proj"
    experts_per_token: int | None = None
    found_by: str = "table"

    @property
    def mixture_of_experts(self) -> bool:
        """Whether the MLPs are mixtures of experts (no MLP sites; routed experts read in part)."""
        return self.experts_per_token is not None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        """The MLP of ``layer`` (the layer itself where it holds its MLP projections directly)."""
        return getattr(layer, self.mlp) if self.mlp else layer

    def mlp_output_module(self, layer: nn.Module) -> nn.Module:
        """The module whose output is the MLP's output (what the bits axis quantizes): the MLP, or
        its output projection where the layer holds the projections itself."""
        return self.mlp_module(layer) if self.mlp else getattr(layer, self.mlp_output_projection)

    def site_projections(self, layer: nn.Module, site: str) -> list[nn.Module]:
        """The modules of one decoder ``layer`` that read the input of ``site`` (one of
        :data:`sol_hf.config.SPARSE_INPUT_SITES`)."""
        if site in MLP_SITES and self.mixture_of_experts:
            raise ValueError(
                f"this model's MLPs are mixtures of experts ({type(self.mlp_module(layer)).__name__}); sol_hf prunes "
                f"the inputs of dense MLPs only, so the SolConfig.sparse_inputs site {site!r} is not available. Use "
                f"SolConfig(sparse_inputs={ATTENTION_SITES}) (attention and bits actions work as usual)."
            )
        owner, names = {
            "attention_input": (self.attention_module(layer), self.attention_input_projections),
            "attention_output": (self.attention_module(layer), (self.attention_output_projection,)),
            "mlp_input": (self.mlp_module(layer), self.mlp_input_projections),
            "mlp_output": (self.mlp_module(layer), (self.mlp_output_projection,)),
        }[site]
        return [getattr(owner, name) for name in names]

    def kv_channels(self, layer: nn.Module, text_config) -> int:
        """K plus V channels one token adds to ``layer``'s cache: the k/v projections' output widths,
        or a fused projection's width less the queries' (heads x head_dim)."""
        attention = self.attention_module(layer)
        widths = [projection_shape(getattr(attention, name))[1] for name in self.attention_input_projections]
        if len(widths) == 3:
            return widths[1] + widths[2]
        heads = text_config.num_attention_heads
        head_dim = getattr(attention, "head_dim", None) or getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return sum(widths) - heads * head_dim


def projection_shape(module: nn.Module) -> tuple[int, int] | None:
    """(input channels, output channels) of an ``nn.Linear`` or transformers ``Conv1D`` (seen
    through a PEFT layer that wraps one, such as an unmerged LoRA ``Linear``), else None."""
    if hasattr(module, "get_base_layer") and hasattr(module, "active_adapters"):  # a PEFT tuner layer
        module = module.get_base_layer()
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight stored (Din, Dout)
        return tuple(module.weight.shape)
    return None


# Explicit entries for families whose structure is ambiguous, keyed by ``config.model_type``
# (none of the tested families needs one). An entry is checked like a found adapter.
ADAPTERS: dict[str, ModelAdapter] = {}


def unsupported_message(model: nn.Module, missing: str) -> str:
    """The ``ValueError`` text for a model SOL cannot act on: what was not found, what is supported."""
    model_type = getattr(model.config.get_text_config(), "model_type", None)
    return (
        f"sol_hf does not support model_type={model_type!r} ({type(model).__name__}): {missing}. Supported: decoder-only "
        f"*ForCausalLM models whose attention goes through transformers' AttentionInterface, with q/k/v (or fused qkv) "
        f"and output projections and an MLP of nn.Linear/Conv1D projections (mixture-of-experts MLPs: attention sites "
        f"only). Tested families: {', '.join(TESTED_MODEL_TYPES)} (docs/supported-models.md). A family whose structure "
        f"is ambiguous can be named explicitly with a ModelAdapter entry in sol_hf.adapters.ADAPTERS."
    )


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The parts SOL acts on in ``model`` (a ``*ForCausalLM``): its :data:`ADAPTERS` entry if its
    ``model_type`` has one, else found from its structure. Either way checked against the model;
    a ``ValueError`` naming what is missing otherwise."""
    from .discovery import check_adapter, discover_adapter

    model_type = getattr(model.config.get_text_config(), "model_type", None)
    if model_type in ADAPTERS:
        return check_adapter(model, ADAPTERS[model_type])
    adapter = discover_adapter(model)
    if model_type not in TESTED_MODEL_TYPES:
        warnings.warn(
            f"sol_hf found the parts it acts on in model_type={model_type!r} by structure, but does not test this family "
            "(docs/supported-models.md): check that budget 1.0 reproduces the base model and that decode steps match "
            "forward(actions=...) before relying on it (tests/test_families.py shows how).",
            stacklevel=3,
        )
    return adapter
