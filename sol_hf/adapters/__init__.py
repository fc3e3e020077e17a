"""Where each model family keeps the parts SOL acts on, keyed by ``config.model_type``.

Adding a family is one entry: the dotted path to the decoder layers, the attention and MLP
attributes of a layer, the input and output projections of each, and the final norm.
Attention itself needs no entry: every supported family routes attention through
transformers' ``AttentionInterface``, where SOL registers its function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

__all__ = ["ModelAdapter", "ADAPTERS", "get_adapter", "supported_model_types"]


@dataclass(frozen=True)
class ModelAdapter:
    """Module paths of one model family.

    Attributes:
        layers: dotted path from the ``*ForCausalLM`` root to the ``ModuleList`` of decoder layers.
        attention: attribute of a decoder layer holding the attention module.
        mlp: attribute of a decoder layer holding the MLP (its input is the MLP input SOL prunes,
            its output the activation SOL quantizes).
        mlp_input_projections: attributes of the MLP that read the MLP input.
        mlp_output_projection: attribute of the MLP that reads the intermediate activation.
        attention_input_projections: attributes of the attention module that read the layer's
            normed hidden state (q/k/v, or one fused projection).
        attention_output_projection: attribute of the attention module that reads its output.
        final_norm: dotted path to the final norm, whose output is the hidden state the policy reads.
        embeddings: dotted paths of modules that look up one row per token (not whole reads).
    """

    layers: str
    attention: str
    mlp: str
    mlp_input_projections: tuple[str, ...]
    mlp_output_projection: str
    final_norm: str
    embeddings: tuple[str, ...]
    attention_input_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    attention_output_projection: str = "o_proj"

    def site_projections(self, layer: nn.Module, site: str) -> list[nn.Module]:
        """The modules of one decoder ``layer`` that read the input of ``site`` (one of
        :data:`sol_hf.config.SPARSE_INPUT_SITES`)."""
        owner, names = {
            "attention_input": (self.attention, self.attention_input_projections),
            "attention_output": (self.attention, (self.attention_output_projection,)),
            "mlp_input": (self.mlp, self.mlp_input_projections),
            "mlp_output": (self.mlp, (self.mlp_output_projection,)),
        }[site]
        module = getattr(layer, owner)
        return [getattr(module, name) for name in names]

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)


_LLAMA_LIKE = ModelAdapter(
    layers="model.layers",
    attention="self_attn",
    mlp="mlp",
    mlp_input_projections=("gate_proj", "up_proj"),
    mlp_output_projection="down_proj",
    final_norm="model.norm",
    embeddings=("model.embed_tokens",),
)

ADAPTERS: dict[str, ModelAdapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ModelAdapter(
        layers="model.layers",
        attention="self_attn",
        mlp="mlp",
        mlp_input_projections=("gate_up_proj",),
        mlp_output_projection="down_proj",
        final_norm="model.norm",
        embeddings=("model.embed_tokens",),
        attention_input_projections=("qkv_proj",),
    ),
    "gpt_neox": ModelAdapter(
        layers="gpt_neox.layers",
        attention="attention",
        mlp="mlp",
        mlp_input_projections=("dense_h_to_4h",),
        mlp_output_projection="dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        embeddings=("gpt_neox.embed_in",),
        attention_input_projections=("query_key_value",),
        attention_output_projection="dense",
    ),
    "gpt2": ModelAdapter(
        layers="transformer.h",
        attention="attn",
        mlp="mlp",
        mlp_input_projections=("c_fc",),
        mlp_output_projection="c_proj",
        final_norm="transformer.ln_f",
        embeddings=("transformer.wte", "transformer.wpe"),
        attention_input_projections=("c_attn",),
        attention_output_projection="c_proj",
    ),
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_type: str | None) -> ModelAdapter:
    """The adapter for ``config.model_type``; a ``ValueError`` naming the supported ones otherwise."""
    if model_type not in ADAPTERS:
        raise ValueError(
            f"sol_hf does not support model_type={model_type!r}. Supported model types: "
            f"{', '.join(supported_model_types())}. Adding one is a single entry in sol_hf/adapters/__init__.py."
        )
    return ADAPTERS[model_type]
