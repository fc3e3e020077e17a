"""Tiny random models of every supported family, built from configs (no downloads)."""

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96

_KW = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": VOCAB}

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
    "gpt2": {"n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2},
}
# The families test_modeling.py runs its whole suite on (table entries before discovery existed).
FAMILIES = sorted(FAMILY_KWARGS)

_GQA = dict(_KW, num_key_value_heads=2, head_dim=16)
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_MOE = {"num_experts_per_tok": 2}
# More families, found by structure: run through the family matrix (tests/test_families.py).
MATRIX_KWARGS = {
    "apertus": dict(_GQA),  # up/down MLP with xIELU, QK-norm
    "arcee": dict(_GQA),  # up/down MLP (ReLU^2)
    "cohere": dict(_GQA, use_qk_norm=True, **_TOKENS),  # parallel attention + MLP, logit scale
    "cohere2": dict(_GQA, sliding_window=24, layer_types=["sliding_attention", "full_attention"], **_TOKENS),  # parallel, sliding
    "ernie4_5": dict(_GQA, **_TOKENS),
    "exaone4": dict(_GQA, sliding_window=24, layer_types=["sliding_attention", "full_attention"], **_TOKENS),  # post-norms, QK-norm
    "glm": dict(_GQA, partial_rotary_factor=0.5, **_TOKENS),  # fused gate_up, partial rotary
    "gpt_bigcode": dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=VOCAB, multi_query=True, **_TOKENS),  # MQA, fused c_attn
    "gptj": dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, rotary_dim=8, vocab_size=VOCAB, **_TOKENS),  # parallel block
    "granite": dict(_GQA, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0),
    "granitemoe": dict(_GQA, num_local_experts=4, **_MOE, **_TOKENS),  # MoE named block_sparse_moe
    "helium": dict(_GQA, **_TOKENS),
    "mixtral": dict(_GQA, num_local_experts=4, **_MOE),  # MoE: attention sites only
    "nemotron": dict(_GQA, partial_rotary_factor=0.5, **_TOKENS),  # up/down MLP, LayerNorm1P
    "olmo": dict(_GQA, **_TOKENS),
    "olmo2": dict(_GQA, **_TOKENS),  # QK-norm, post-norms
    "olmoe": dict(_GQA, num_experts=4, **_MOE, **_TOKENS),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64, vocab_size=VOCAB, **_TOKENS),  # MLP in the layer, learned positions
    "persimmon": dict(_KW, partial_rotary_factor=0.5, qk_layernorm=True, **_TOKENS),  # fused query_key_value
    "phi": dict(_KW, num_key_value_heads=2, partial_rotary_factor=0.5, qk_layernorm=True, **_TOKENS),  # parallel, partial rotary
    "qwen2_moe": dict(_GQA, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=128, **_MOE, **_TOKENS),
    "qwen3_moe": dict(_GQA, num_experts=4, moe_intermediate_size=64, **_MOE, **_TOKENS),
    "seed_oss": dict(_GQA, attention_bias=True, **_TOKENS),  # biased q/k/v
    "smollm3": dict(_GQA, no_rope_layer_interval=2, **_TOKENS),  # NoPE layers
    "stablelm": dict(_KW, num_key_value_heads=2, partial_rotary_factor=0.25, qk_layernorm=True, use_qkv_bias=True, **_TOKENS),
    "starcoder2": dict(_GQA, use_bias=True, **_TOKENS),  # c_fc/c_proj MLP with biases
}
FAMILY_KWARGS.update(MATRIX_KWARGS)
ALL_FAMILIES = sorted(FAMILY_KWARGS)
MOE_FAMILIES = ("granitemoe", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A deterministic tiny random ``*ForCausalLM`` of ``model_type`` in eval mode, fp32."""
    if model_type == "opt" and "intermediate_size" in overrides:
        overrides["ffn_dim"] = overrides.pop("intermediate_size")
    if model_type in ("gpt2", "gpt_bigcode", "gptj") and "intermediate_size" in overrides:
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


def left_padded_batch(length: int, steps: int, num_actions: int, seed: int = 5, action_seed: int = 2):
    """Three rows of ``length`` tokens, rows 1 and 2 left-padded by 6 and 11, and random per-row
    actions for the last ``steps`` positions: (ids (3, length), mask (3, length), actions (3, steps))."""
    ids = torch.randint(3, VOCAB, (3, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    mask[2, :11] = 0
    actions = torch.randint(0, num_actions, (3, steps), generator=torch.Generator().manual_seed(action_seed))
    return ids, mask, actions


def decode_and_teacher_forced_logits(model, ids, mask, actions, context: int):
    """Logits of the positions after ``context`` under per-row ``actions`` (B, steps), twice: decoded
    one step at a time (the executed ops) and in one teacher-forced call (the masked reference).
    ``ids``/``mask``: (B, context + steps). Returns two (B, steps, V) tensors."""
    steps = actions.shape[1]
    prefix = model(ids[:, :context], attention_mask=mask[:, :context], use_cache=True)
    parallel = model(ids[:, context:], attention_mask=mask, cache=prefix.cache, actions=actions, use_cache=True)
    cache = model(ids[:, :context], attention_mask=mask[:, :context], use_cache=True).cache
    logits = []
    for t in range(steps):
        out = model(ids[:, context + t : context + t + 1], attention_mask=mask[:, : context + t + 1], cache=cache,
                    actions=actions[:, t : t + 1], use_cache=True)
        cache = out.cache
        logits.append(out.logits)
    return torch.cat(logits, 1), parallel.logits
