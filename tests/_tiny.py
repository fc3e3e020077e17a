"""Tiny random models of every supported family, built from configs (no downloads)."""

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96

_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)

FAMILY_KWARGS = {
    "llama": dict(_KW, num_key_value_heads=2, head_dim=16),
    "mistral": dict(_KW, num_key_value_heads=2, head_dim=16, sliding_window=24),
    "qwen2": dict(_KW, num_key_value_heads=2),
    "qwen3": dict(_KW, num_key_value_heads=2, head_dim=16),
    "gemma": dict(_KW, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(_KW, num_key_value_heads=2, head_dim=16, sliding_window=24, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(_KW, num_key_value_heads=2, head_dim=16, sliding_window=24, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(_KW, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(_KW, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
}
FAMILIES = sorted(FAMILY_KWARGS)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A deterministic tiny random ``*ForCausalLM`` of ``model_type`` in eval mode, fp32."""
    if model_type == "gpt2" and "intermediate_size" in overrides:
        overrides["n_inner"] = overrides.pop("intermediate_size")
    cfg = AutoConfig.for_model(model_type, **{**FAMILY_KWARGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.float32).eval()
    # Random init gives near-uniform logits; sharpen them so greedy decoding is not decided by rounding.
    with torch.no_grad():
        emb = model.get_output_embeddings()
        emb.weight.mul_(4.0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def tiny_pair(model_type: str = "llama", seed: int = 0, **overrides):
    """Two identical copies: one to wrap, one untouched reference."""
    model = tiny_model(model_type, seed, **overrides)
    return model, copy.deepcopy(model)
