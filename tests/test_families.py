"""The family matrix: every tested family, found by structure, against its untouched base model.

Per family (tiny random model from its config): budget 1.0 reproduces the base model's greedy
tokens and logits, a budget inside ``budget_range`` runs and is met, and the executed decode path
(kept weight rows, gathered KV pages, quantized MLP output) gives the masked reference's logits
per row in a left-padded batch. Mixture-of-experts families run with the attention sites only.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from _tiny import (
    ALL_FAMILIES,
    FAMILIES,
    MOE_FAMILIES,
    VOCAB,
    decode_and_teacher_forced_logits,
    tiny_model,
    tiny_pair,
)
from transformers import AutoConfig, AutoModelForCausalLM

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.adapters import (
    ADAPTERS,
    ATTENTION_SITES,
    TESTED_MODEL_TYPES,
    ModelAdapter,
    adapter_for,
)

# Every site, and the bits axis (its quantization hook sits on each family's MLP output).
MATRIX_CONFIG = SolConfig(page_size=4, sink_tokens=2, recent_tokens=4, policy_hidden_size=64, bits=(8, 16))
MOE_CONFIG = SolConfig(page_size=4, sink_tokens=2, recent_tokens=4, policy_hidden_size=64, bits=(8, 16), sparse_inputs=ATTENTION_SITES)
WIDE = {"intermediate_size": 256}


def _config(family):
    return MOE_CONFIG if family in MOE_FAMILIES else MATRIX_CONFIG


def _ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_matrix_is_the_tested_list():
    assert tuple(ALL_FAMILIES) == TESTED_MODEL_TYPES


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_full_budget_is_the_base_model(family):
    base, ref = tiny_pair(family, **WIDE)
    model = SolForCausalLM(base, _config(family))
    assert model.adapter.found_by == "structure"
    ids = _ids(2, 20)
    kw = {"max_new_tokens": 8, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    expected = ref.generate(ids, **kw)
    got = model.generate(ids, compute_budget=1.0, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b)
    # The controlled path itself, every position on the dense action, is the base model too.
    out = model(ids, actions=torch.full_like(ids, model.space.dense_index))
    torch.testing.assert_close(out.logits, ref(ids).logits, atol=1e-5, rtol=1e-4)
    # and the policy observes the hidden state the LM head reads
    torch.testing.assert_close(out.last_hidden_state, ref(ids, output_hidden_states=True).hidden_states[-1])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_reachable_budget_is_met(family):
    model = SolForCausalLM(tiny_model(family, **WIDE), _config(family))
    ids = _ids(1, 24, seed=3)
    low, high = model.budget_range(ids.shape[1] + 1)
    assert low < 0.95 and high == 1.0, low
    budget = low + 0.3 * (1.0 - low)
    model.generate(ids, max_new_tokens=10, do_sample=False, compute_budget=budget, controller="uniform")
    report = model.last_compute_report
    assert report.controlled_steps == 9
    assert report.cost.item() == pytest.approx(budget, abs=0.05)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_executed_path_is_the_reference_path(family):
    """Decode steps run the executed ops; a teacher-forced call the masked reference. Same per-row
    actions on left-padded rows: same logits."""
    model = SolForCausalLM(tiny_model(family, **WIDE), _config(family))
    model.attention_overhead_bytes["cpu"] = 0.0  # page-sparse attention runs wherever it saves bytes
    ids = _ids(3, 36, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    steps, context = 5, 31
    actions = torch.randint(0, model.space.num_actions, (3, steps), generator=torch.Generator().manual_seed(2))
    actions[0, :3] = model.space.index_of(0.1, min(model.space.activation_keep), 8)  # sparsest everything
    decoded, teacher_forced = decode_and_teacher_forced_logits(model, ids, mask, actions, context)
    torch.testing.assert_close(decoded, teacher_forced, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# What discovery finds, and what it refuses
# --------------------------------------------------------------------------------------------

# The hand-written entries of the families that had them before discovery: discovery finds the same parts.
_LLAMA_LIKE = {"layers": "model.layers", "attention": "self_attn", "mlp": "mlp", "mlp_input_projections": ("gate_proj", "up_proj"),
                   "mlp_output_projection": "down_proj", "lm_head": "lm_head", "embeddings": ("model.embed_tokens",)}
_HAND_WRITTEN = {
    **{family: _LLAMA_LIKE for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "phi3": dict(_LLAMA_LIKE, mlp_input_projections=("gate_up_proj",), attention_input_projections=("qkv_proj",)),
    "gpt_neox": {"layers": "gpt_neox.layers", "attention": "attention", "mlp": "mlp", "mlp_input_projections": ("dense_h_to_4h",),
                     "mlp_output_projection": "dense_4h_to_h", "lm_head": "lm_head", "embeddings": ("gpt_neox.embed_in",),
                     "attention_input_projections": ("query_key_value",), "attention_output_projection": "dense"},
    "gpt2": {"layers": "transformer.h", "attention": "attn", "mlp": "mlp", "mlp_input_projections": ("c_fc",), "mlp_output_projection": "c_proj",
                 "lm_head": "lm_head", "embeddings": ("transformer.wte", "transformer.wpe"), "attention_input_projections": ("c_attn",),
                 "attention_output_projection": "c_proj"},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_finds_what_the_hand_written_entries_named(family):
    assert adapter_for(tiny_model(family)) == ModelAdapter(**_HAND_WRITTEN[family], found_by="structure")


def test_kv_bytes_come_from_the_projections():
    """Multi-query GPT-BigCode keeps one K/V head: its fused c_attn writes 64 + 2 x 16 channels."""
    model = SolForCausalLM(tiny_model("gpt_bigcode"), MATRIX_CONFIG)
    assert model.cost_model.bytes.kv_per_token == (2 * 16 * 4.0,) * 2
    llama = SolForCausalLM(tiny_model("llama"), MATRIX_CONFIG)
    assert llama.cost_model.bytes.kv_per_token == (2 * 2 * 16 * 4.0,) * 2  # 2 KV heads of 16


def test_moe_counts_only_the_experts_a_token_reads():
    """Mixtral, 4 experts, 2 per token: half the stacked expert weights are not read by a step."""
    base = tiny_model("mixtral")
    model = SolForCausalLM(base, MOE_CONFIG)
    experts = sum(p.numel() * 4 for n, p in base.named_parameters() if ".experts." in n)
    sites = model.cost_model.bytes.sparse_total
    embed = base.get_input_embeddings().weight
    total = sum(p.numel() * 4 for p in base.parameters())
    assert experts > 0
    assert model.cost_model.bytes.fixed == total - sites - experts / 2 - (embed.numel() - embed.shape[1]) * 4


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_mlp_sites_are_refused_with_what_to_set(family):
    with pytest.raises(ValueError, match=r"mixtures of experts .* SolConfig\(sparse_inputs=\('attention_input', 'attention_output'\)\)"):
        SolForCausalLM(tiny_model(family), SolConfig(policy_hidden_size=64))


def _tiny(model_type, **kw):
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))


@pytest.mark.parametrize(
    "model_type, kwargs, missing",
    [
        # attention not through the interface (ALiBi in its own code)
        ("bloom", {"hidden_size": 32, "n_layer": 1, "n_head": 2, "vocab_size": 50}, r"BloomAttention\) does not go through transformers' attention interface"),
        # no attention at all
        ("mamba", {"hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 50, "state_size": 4, "expand": 2},
         "no ModuleList of decoder layers whose attention calls"),
        # attention sinks the page-sparse path does not implement
        ("gpt_oss", {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                         "head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1, "vocab_size": 50, "layer_types": ["full_attention"] * 2},
         "GptOssAttention uses attention sinks"),
        # an encoder-decoder-style layer with cross-attention
        ("bart", {"d_model": 32, "decoder_layers": 1, "encoder_layers": 1, "decoder_attention_heads": 2, "encoder_attention_heads": 2,
                      "decoder_ffn_dim": 64, "encoder_ffn_dim": 64, "vocab_size": 50}, r"several or differently named attention modules"),
    ],
)
def test_unsupported_models_are_refused_naming_what_is_missing(model_type, kwargs, missing):
    base = _tiny(model_type, **kwargs)
    with pytest.raises(ValueError, match=rf"does not support model_type='{model_type}'.*{missing}.*Tested families: apertus, "):
        SolForCausalLM(base, MATRIX_CONFIG)


def test_an_mlp_ambiguous_by_shape_is_refused_and_a_table_entry_names_it(monkeypatch):
    """intermediate_size == hidden_size: gate/up/down all map 64 -> 64, so the MLP's input and
    output projections cannot be told apart by shape. Refused; an ADAPTERS entry names them."""
    base, ref = tiny_pair("llama", intermediate_size=64)
    with pytest.raises(ValueError, match=r"the MLP LlamaMLP could not be read by shape.*'gate_proj': \(64, 64\)"):
        SolForCausalLM(base, MATRIX_CONFIG)
    monkeypatch.setitem(ADAPTERS, "llama", ModelAdapter(**_HAND_WRITTEN["llama"]))
    model = SolForCausalLM(base, MATRIX_CONFIG)
    assert model.adapter.found_by == "table"
    ids = _ids(1, 12)
    out = model(ids, actions=torch.full_like(ids, model.space.dense_index))
    torch.testing.assert_close(out.logits, ref(ids).logits, atol=1e-5, rtol=1e-4)
    # a table entry is checked like a found adapter
    monkeypatch.setitem(ADAPTERS, "llama", ModelAdapter(**dict(_HAND_WRITTEN["llama"], attention="mlp")))
    with pytest.raises(ValueError, match=r"LlamaMLP.forward does not call transformers' attention interface"):
        SolForCausalLM(tiny_model("llama"), MATRIX_CONFIG)


def test_an_untested_family_found_by_structure_is_wrapped_with_a_warning():
    base = _tiny("ministral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, vocab_size=50)
    with pytest.warns(UserWarning, match=r"model_type='ministral' by structure, but does not test this family"):
        model = SolForCausalLM(base, MATRIX_CONFIG)
    assert model.adapter.found_by == "structure"


def test_the_supported_models_doc_matches_what_the_code_finds():
    """docs/supported-models.md is generated by benchmarks/supported_models.py; regenerate it with
    that script when this fails. The results column is the matrix above (every family passes)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "supported_models.py"
    spec = importlib.util.spec_from_file_location("supported_models", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    committed = script.DOC.read_text()
    results = script.committed_results(committed)
    assert results == dict.fromkeys(ALL_FAMILIES, script.PASSED)
    assert committed == script.render(results)
