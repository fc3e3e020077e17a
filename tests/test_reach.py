"""Which budgets the action grid reaches, what is refused, presets and format-1 artifacts."""

import json

import pytest
import torch
from _tiny import VOCAB, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.config import FORMAT_VERSION


def _llama_8b_on_meta() -> LlamaForCausalLM:
    """Llama-3.1-8B's shapes in bf16 on the meta device (no memory; bytes are counted from shapes)."""
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.fixture(scope="module")
def llama_8b():
    return _llama_8b_on_meta()


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_default_reaches_0_4_on_an_8b_shape(llama_8b, backend):
    model = SolForCausalLM(llama_8b, SolConfig())
    try:
        for context in (1024, 8192):
            for controller in ("uniform", "policy"):
                low, high = model.budget_range(context, controller, device=backend)
                assert low <= 0.40 and high == 1.0, (context, controller, low)
    finally:
        model.unwrap()


def test_int8_weights_reach_below_0_25_on_an_8b_shape(llama_8b):
    """bf16 weights: the int8 copy halves the bytes of every kept channel's row, so the cheapest
    action (pages 0.1, keep 0.3, 8 bits) reads about 0.3 x 0.5 of the projections."""
    model = SolForCausalLM(llama_8b, SolConfig.from_preset("int8-weights"))
    try:
        for context in (1024, 8192):
            low = model.budget_range(context, "uniform", device="cuda")[0]
            assert low <= 0.25, (context, low)
        sites = model.cost_model.bytes.sites
        # per input channel: Dout codes + 8 bytes per group of <= 2048 columns (14 here), against 2 * Dout bytes in bf16
        mlp_input = next(s for s in sites if s.name == "mlp_input")
        assert mlp_input.int8_row_bytes[0] == 2 * 14336 + 8 * 14 and mlp_input.row_bytes[0] == 2 * 2 * 14336
    finally:
        model.unwrap()


def test_the_paper_preset_reaches_what_it_did(llama_8b):
    """The paper's axes on the same shape: 0.695 at 1k, 0.664 at 8k (the figures measured before
    the activation axis covered every projection)."""
    model = SolForCausalLM(llama_8b, SolConfig.from_preset("paper"))
    try:
        assert model.budget_range(1024, device="cpu")[0] == pytest.approx(0.695, abs=0.002)
        assert model.budget_range(8192, device="cpu")[0] == pytest.approx(0.664, abs=0.002)
    finally:
        model.unwrap()


def test_default_reaches_0_5_on_smollm2(smollm2_path):
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    model = SolForCausalLM(base, SolConfig())
    for controller in ("uniform", "policy"):
        low, _ = model.budget_range(256, controller)
        assert low <= 0.50, (controller, low)
    # and a budget of 0.5 is met by the executed bytes, not only predicted
    ids = torch.randint(3, 1000, (1, 255), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=8, do_sample=False, compute_budget=0.5, controller="uniform")
    assert model.last_compute_report.cost.item() == pytest.approx(0.5, abs=0.03)


def test_nothing_below_1_is_reachable_when_the_policy_outweighs_the_savings():
    config = SolConfig(policy_hidden_size=256, policy_heads=4, policy_layers=2)
    model = SolForCausalLM(tiny_model("llama"), config)
    assert model.budget_range(30, "policy") == (1.0, 1.0)
    assert model.budget_range(30, "uniform")[0] < 1.0  # without the policy's bytes the grid saves
    ids = torch.randint(3, VOCAB, (1, 29), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no budget below 1.0 is reachable with the policy controller"):
        model.generate(ids, max_new_tokens=2, compute_budget=0.9, controller="policy")
    model.generate(ids, max_new_tokens=2, compute_budget=1.0, controller="policy")  # 1.0 is the base model


def test_an_unreachable_budget_says_what_is_reachable():
    model = SolForCausalLM(tiny_model("llama"), SolConfig(policy_hidden_size=32))
    low, _ = model.budget_range(30)
    assert model.budget_range(torch.tensor(30)) == model.budget_range(30)  # integer-like lengths are fine
    for bad in (0, -3, 2.5, "30", True, None):
        with pytest.raises(ValueError, match="context_length must be a positive integer"):
            model.budget_range(bad)
    with pytest.raises(ValueError, match="controller must be 'policy', 'uniform' or 'random'"):
        model.budget_range(30, "greedy")
    ids = torch.randint(3, VOCAB, (1, 29), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=rf"reachable: \[{low:.3f}, 1.0\]"):
        model.generate(ids, max_new_tokens=2, compute_budget=low / 2, controller="uniform")


@pytest.mark.parametrize(
    "config,budget,needle",
    [
        (SolConfig.from_preset("paper"), {"bits": 3.5}, r"compute_budget\['bits'\]=3.5 is below the lowest level .* \[8, 16\]"),
        (SolConfig(), {"bits": 8}, r"compute_budget\['bits'\]=8 is below .* \[16\]"),
        (SolConfig(), {"activation": 0.2}, r"compute_budget\['activation'\]=0.2 is below .* \[0.3, 0.5, 0.7, 1.0\]"),
        (SolConfig(), {"attention": 0.05, "activation": 0.5}, r"compute_budget\['attention'\]=0.05"),
        (SolConfig(), {"mlp": 0.5}, r"renamed 'activation'"),
    ],
)
def test_per_axis_targets_outside_the_grid_are_refused(config, budget, needle):
    model = SolForCausalLM(tiny_model("llama"), config)
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=needle):
        model.generate(ids, max_new_tokens=2, compute_budget=budget, controller="uniform")


def test_presets():
    assert SolConfig.from_preset("default") == SolConfig()
    paper = SolConfig.from_preset("paper", page_size=8)
    assert paper.sparse_inputs == ("mlp_input",) and paper.bits == (8, 16) and paper.page_size == 8
    assert paper.activation_keep == (0.4, 0.6, 0.8, 1.0)
    with pytest.raises(ValueError, match="unknown SolConfig preset 'fast'; presets: \\['default', 'int8-weights', 'paper'\\]"):
        SolConfig.from_preset("fast")
    with pytest.raises(ValueError, match="sparse_inputs must name at least one of"):
        SolConfig(sparse_inputs=("mlp_input", "lm_head"))
    assert SolConfig(sparse_inputs=("mlp_output", "attention_input")).sparse_inputs == ("attention_input", "mlp_output")


FORMAT_1 = {
    "format_version": 1, "attention_keep": [0.1, 0.5, 1.0], "mlp_keep": [0.4, 0.8, 1.0], "bits": [8, 16],
    "prune_intermediate": True, "page_size": 4, "sink_tokens": 2, "recent_tokens": 4, "policy_hidden_size": 32,
    "policy_heads": 2, "selection": "quest", "budget_range": [0.5, 1.0],
}


def test_a_format_1_config_reads_as_the_same_actions():
    config = SolConfig.from_dict(dict(FORMAT_1))
    assert config.format_version == FORMAT_VERSION == 4
    assert config.activation_keep == (0.4, 0.8, 1.0) and config.bits == (8, 16)
    assert config.sparse_inputs == ("mlp_input", "mlp_output")
    without_intermediate = SolConfig.from_dict({k: v for k, v in FORMAT_1.items() if k != "prune_intermediate"})
    assert without_intermediate.sparse_inputs == ("mlp_input",)
    # fields format 1 never wrote take format 1's defaults, not today's
    bare = SolConfig.from_dict({"format_version": 1})
    assert bare.sparse_inputs == ("mlp_input",) and bare.bits == (8, 16) and bare.activation_keep == (0.4, 0.6, 0.8, 1.0)
    with pytest.raises(ValueError, match="newer sol_hf"):
        SolConfig.from_dict({"format_version": FORMAT_VERSION + 1})


def test_a_format_1_artifact_loads_and_decides_the_same(tmp_path):
    """An artifact written before format 2, recreated by rewriting a saved sol_config.json in
    format 1's field names: it loads, and the policy picks the same actions."""
    config = SolConfig.from_dict(dict(FORMAT_1))
    model = SolForCausalLM(tiny_model("llama"), config)
    torch.manual_seed(0)
    for p in model.policy.parameters():
        p.data.normal_(0, 0.5)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    model.generate(ids, max_new_tokens=6, do_sample=False, compute_budget={"attention": 0.5, "activation": 0.6}, controller="policy")
    before = json.dumps(model.last_compute_report.to_dict())  # (NaN targets compare equal as text)
    model.save_pretrained(tmp_path)
    path = tmp_path / "sol_config.json"
    saved = json.loads(path.read_text())
    saved["mlp_keep"] = saved.pop("activation_keep")
    saved["prune_intermediate"] = saved.pop("sparse_inputs") == ["mlp_input", "mlp_output"]
    saved["format_version"] = 1
    path.write_text(json.dumps(saved))
    loaded = SolForCausalLM.from_pretrained(model.unwrap(), tmp_path)
    assert loaded.sol_config == config
    loaded.generate(ids, max_new_tokens=6, do_sample=False, compute_budget={"attention": 0.5, "activation": 0.6}, controller="policy")
    assert json.dumps(loaded.last_compute_report.to_dict()) == before
