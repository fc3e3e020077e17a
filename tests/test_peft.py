"""PEFT LoRA models as SOL bases: exact against the PeftModel, executed = reference, adapter bytes,
switching, reversibility, artifacts pinned to the adapter, training with the adapter frozen."""

import copy
import json
import math
import os
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model  # noqa: E402

from sol_hf import SolConfig, SolForCausalLM  # noqa: E402
from sol_hf.hub import SolArtifactError, adapter_fingerprint  # noqa: E402
from sol_hf.ops import HAS_TRITON  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import VOCAB, left_padded_batch, tiny_model  # noqa: E402

CONFIG = SolConfig(page_size=4, sink_tokens=2, recent_tokens=4, policy_hidden_size=64)
WIDE = dict(intermediate_size=768)

# LoRA on attention and MLP projections of each family: separate q/k/v (llama), biased q/k/v
# (qwen2), fused qkv_proj and gate_up_proj (phi3), GPT-2's fused Conv1D c_attn (fan_in_fan_out).
TARGETS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen2": dict(target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]),
    "phi3": dict(target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
}
FAMILIES = sorted(TARGETS)


def _ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _randomize(peft_model, seed, adapter="default"):
    """LoRA initialises B to zero (the adapter would change nothing): give A and B random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if f"lora_A.{adapter}." in name or f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def lora_model(family="llama", seed=0, r=4, **model_kw):
    base = tiny_model(family, seed=seed, **model_kw)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, **TARGETS[family]))
    _randomize(model, seed + 100)
    return model.eval()


def add_adapter(model, name, family="llama", r=8, seed=7):
    model.add_adapter(name, LoraConfig(r=r, lora_alpha=r, **TARGETS[family]))
    _randomize(model, seed, adapter=name)
    model.eval()


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# --------------------------------------------------------------------------------------------
# Exactness and executed = reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_reproduces_the_peft_model(family):
    peft_model = lora_model(family)
    reference = copy.deepcopy(peft_model)
    ids = _ids(2, 12)
    with reference.disable_adapter():
        bare = _logits(reference, ids)
    adapted = _logits(reference, ids)
    assert (adapted - bare).abs().max() > 1e-2  # the adapter changes the model: the checks below can fail
    model = SolForCausalLM(peft_model, CONFIG)
    assert model.peft_model is peft_model
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    expected = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    for budget in (None, 1.0):
        assert torch.equal(model.generate(ids, compute_budget=budget, max_new_tokens=8, do_sample=False), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_executed_ops_match_the_reference_with_lora_in_padded_batches(family, monkeypatch):
    """Decode steps run the executed ops (kept rows of the base weight and of every active lora_A);
    a teacher-forced call runs the masked reference (PEFT's own forward on the pruned input)."""
    from sol_hf import ops

    model = SolForCausalLM(lora_model(family, **WIDE), CONFIG)
    model.attention_overhead_bytes["cpu"] = 0.0
    model.sparse_linear_read_factor["cpu"] = 0.01  # the sparse op runs for every row and keep below 1
    widths = []
    real = ops.sparse_linear

    def recording(x, weight_t, channel_idx, channel_count, bias=None, **kw):
        widths.append(weight_t.shape[1])
        return real(x, weight_t, channel_idx, channel_count, bias, **kw)

    monkeypatch.setattr(ops, "sparse_linear", recording)
    steps = 5
    ids, mask, actions = left_padded_batch(30, steps, model.space.num_actions)
    actions[:, 0] = model.space.index_of(0.25, min(model.space.activation_keep), 16)
    context = 30 - steps
    prefix = model(ids[:, :context], attention_mask=mask[:, :context], use_cache=True)
    parallel = model(ids[:, context:], attention_mask=mask, cache=prefix.cache, actions=actions, use_cache=True)
    assert not widths  # teacher-forced: the masked reference, no sparse op
    cache, logits = model(ids[:, :context], attention_mask=mask[:, :context], use_cache=True).cache, []
    for t in range(steps):
        out = model(ids[:, context + t : context + t + 1], attention_mask=mask[:, : context + t + 1], cache=cache,
                    actions=actions[:, t : t + 1], use_cache=True)
        cache = out.cache
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), parallel.logits, atol=5e-5, rtol=1e-4)
    # the adapters' lora_A layouts were read by the sparse op (their width is a sum of ranks, 4 per adapter)
    assert any(w % 4 == 0 and w <= 12 for w in widths), widths


# --------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------


def test_cost_model_counts_the_active_adapters_bytes_by_hand():
    peft_model = lora_model("llama", r=4)
    add_adapter(peft_model, "wide", r=8)
    bare = SolForCausalLM(tiny_model("llama"), CONFIG)
    model = SolForCausalLM(peft_model, CONFIG)
    H, I, F = 64, 128, 4  # hidden, intermediate, fp32 bytes
    q, kv = 64, 32  # q_proj out, k/v out (2 KV heads x 16)

    def lora(r, d_in, d_out):  # A (r, d_in) + B (d_out, r)
        return (r * d_in + d_out * r) * F

    def expected_sites(r):
        return {
            "attention_input": ((q + 2 * kv) * H * F + lora(r, H, q) + lora(r, H, kv), (q + 2 * kv) * F + 2 * r * F),
            "attention_output": (H * q * F + lora(r, q, H), H * F + r * F),
            "mlp_input": (2 * I * H * F + 2 * lora(r, H, I), 2 * I * F + 2 * r * F),
            "mlp_output": (H * I * F + lora(r, I, H), H * F + r * F),
        }

    def check(r):
        sites = {s.name: s for s in model.cost_model.bytes.sites}
        for name, (total, row) in expected_sites(r).items():
            assert sites[name].total == 2 * total, name  # two layers
            assert sites[name].row_bytes == (row, row), name
        # the dense step reads exactly the bare model's bytes plus the active adapter's
        adapter_bytes = 2 * sum(total for total, _ in expected_sites(r).values()) - sum(s.total for s in bare.cost_model.bytes.sites)
        length = torch.tensor([40])
        assert float(model.cost_model.dense_bytes(length) - bare.cost_model.dense_bytes(length)) == pytest.approx(adapter_bytes)

    check(4)
    peft_model.set_adapter("wide")  # while wrapped: the next controlled call follows
    model.budget_range(64)
    check(8)
    with peft_model.disable_adapter():
        model.budget_range(64)
        length = torch.tensor([40])
        assert float(model.cost_model.dense_bytes(length)) == float(bare.cost_model.dense_bytes(length))


# --------------------------------------------------------------------------------------------
# Switching, disabling, unwrapping
# --------------------------------------------------------------------------------------------


def test_adapters_switch_and_disable_while_wrapped():
    peft_model = lora_model("llama", **WIDE)
    add_adapter(peft_model, "other", r=8)
    reference = copy.deepcopy(peft_model)
    model = SolForCausalLM(peft_model, CONFIG)
    model.sparse_linear_read_factor["cpu"] = 0.01
    ids = _ids(1, 20, seed=3)
    per_adapter = {}
    for name in ("other", "default"):
        reference.set_adapter(name)
        per_adapter[name] = _logits(reference, ids)
    assert (per_adapter["other"] - per_adapter["default"]).abs().max() > 1e-2  # switching matters
    for name in ("other", "default", "merged"):
        if name == "merged":  # merging rewrites the base weight: the prepared layouts follow
            peft_model.merge_adapter()
            reference.merge_adapter()
        else:
            peft_model.set_adapter(name)
            reference.set_adapter(name)
        expected = reference.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(ids, compute_budget=1.0, max_new_tokens=6, do_sample=False), expected)
        # controlled decode (executed ops) against the teacher-forced reference of the same adapter
        action = model.space.index_of(1.0, 0.3, 16)
        out = model.generate(ids, compute_budget={"activation": 0.3}, max_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        tokens, prompt = out.sequences, ids.shape[1]
        # the first new token comes from the dense prefill; each later one from a controlled step
        # whose input is the token before it
        actions = torch.full((1, tokens.shape[1] - 1 - prompt), action)
        prefix = model(tokens[:, :prompt], use_cache=True)
        forced = model(tokens[:, prompt:-1], cache=prefix.cache, actions=actions, use_cache=True).logits
        torch.testing.assert_close(torch.stack(out.logits[1:], 1), forced, atol=5e-5, rtol=1e-4)
        assert model.last_compute_report.activation_keep.item() == pytest.approx(0.3)
    peft_model.unmerge_adapter()
    reference.unmerge_adapter()
    with peft_model.disable_adapter(), reference.disable_adapter():
        expected = reference.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(ids, compute_budget=1.0, max_new_tokens=6, do_sample=False), expected)
        model.generate(ids, compute_budget=0.6, max_new_tokens=4, do_sample=False)


def test_unwrap_restores_the_peft_model_bit_for_bit():
    peft_model = lora_model("llama", **WIDE)
    reference = copy.deepcopy(peft_model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable  # get_peft_model leaves the LoRA weights trainable
    model = SolForCausalLM(peft_model, CONFIG)
    assert not any(p.requires_grad for p in peft_model.parameters())  # frozen while wrapped
    model.generate(_ids(2, 16), compute_budget=0.6, max_new_tokens=5, do_sample=False)
    restored = model.unwrap()
    assert restored is peft_model
    state, expected = restored.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert {n for n, p in restored.named_parameters() if p.requires_grad} == trainable
    assert not any("forward" in m.__dict__ or "_sol_runtime" in m.__dict__ for m in restored.modules())
    assert restored.get_base_model().config._attn_implementation == reference.get_base_model().config._attn_implementation
    ids = _ids(2, 12, seed=9)
    assert torch.equal(_logits(restored, ids), _logits(reference, ids))
    merged = restored.merge_and_unload()  # still a working PeftModel
    torch.testing.assert_close(_logits(merged, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)


def test_unsupported_peft_methods_are_refused_clearly():
    ia3 = get_peft_model(tiny_model("llama"), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                        feedforward_modules=["down_proj"]))
    with pytest.raises(TypeError, match="IA3 adapter.*LoRA"):
        SolForCausalLM(ia3, CONFIG)
    prompt = get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(TypeError, match="PROMPT_TUNING adapter.*LoRA"):
        SolForCausalLM(prompt, CONFIG)
    dora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(TypeError, match=r"LoRA variant \(Dora"):
        SolForCausalLM(dora, CONFIG)
    # DoRA outside the pruned sites is fine: those projections always run PEFT's own forward
    dora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert SolForCausalLM(dora, SolConfig(**{**CONFIG.to_dict(), "sparse_inputs": ["mlp_input"]})).peft_model is dora


# --------------------------------------------------------------------------------------------
# Artifacts pinned to the adapter
# --------------------------------------------------------------------------------------------


def _saved_base_and_adapter(tmp_path, seed=0):
    peft_model = lora_model("llama", seed=0)
    _randomize(peft_model, seed + 100)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / f"adapter{seed}"
    if not base_dir.exists():
        copy.deepcopy(peft_model).unload().save_pretrained(base_dir)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def test_artifact_records_the_adapter_and_refuses_another(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir = _saved_base_and_adapter(tmp_path, seed=0)
    _, other_dir = _saved_base_and_adapter(tmp_path, seed=1)
    load = lambda adapter: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()  # noqa: E731
    peft_model = load(adapter_dir)
    config = SolConfig(**{**CONFIG.to_dict(), "adapter_name_or_path": str(adapter_dir)})
    model = SolForCausalLM(peft_model, config)
    fingerprint = adapter_fingerprint(peft_model)
    model.save_pretrained(tmp_path / "policy")
    saved = json.loads((tmp_path / "policy" / "sol_config.json").read_text())
    assert saved["adapter_fingerprint"] == fingerprint and fingerprint["adapters"] == ["default"]
    assert saved["adapter_name_or_path"] == str(adapter_dir) and saved["base_model_name_or_path"] == str(base_dir)
    assert fingerprint["parameters"] == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    card = (tmp_path / "policy" / "README.md").read_text()
    assert str(base_dir) in card and str(adapter_dir) in card and fingerprint["sha256"] in card

    ids = _ids(1, 10)
    budget = {"attention": 0.5, "activation": 0.5}  # per-axis: the tiny model's policy outweighs it
    expected = model.generate(ids, compute_budget=budget, max_new_tokens=6, do_sample=False, controller="policy")
    # the artifact alone: loads the base, then the recorded adapter, and decodes the same tokens
    alone = SolForCausalLM.from_pretrained(str(tmp_path / "policy"))
    assert isinstance(alone.peft_model, PeftModel)
    assert torch.equal(alone.generate(ids, compute_budget=budget, max_new_tokens=6, do_sample=False), expected)
    # a freshly loaded PeftModel of the same adapter: accepted
    SolForCausalLM.from_pretrained(load(adapter_dir), str(tmp_path / "policy")).unwrap()

    other = load(other_dir)
    with pytest.raises(SolArtifactError, match="trained on PEFT adapter") as err:
        SolForCausalLM.from_pretrained(other, str(tmp_path / "policy"))
    assert fingerprint["sha256"] in str(err.value) and adapter_fingerprint(other)["sha256"] in str(err.value)
    assert "forward" not in other.get_base_model().model.layers[0].mlp.up_proj.__dict__  # left untouched
    with pytest.raises(SolArtifactError, match="the bare base model"):
        SolForCausalLM.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "policy"))
    with pytest.warns(UserWarning, match="trained on PEFT adapter"):
        SolForCausalLM.from_pretrained(other, str(tmp_path / "policy"), allow_fingerprint_mismatch=True)
    # and the other way round: a policy of the bare base refuses an adapted model
    bare_policy = tmp_path / "bare-policy"
    SolForCausalLM(AutoModelForCausalLM.from_pretrained(base_dir), CONFIG).save_pretrained(bare_policy)
    assert json.loads((bare_policy / "sol_config.json").read_text())["adapter_fingerprint"] is None
    with pytest.raises(SolArtifactError, match="the bare base model.*but the given model has PEFT adapter"):
        SolForCausalLM.from_pretrained(load(adapter_dir), str(bare_policy))


def test_an_unnamed_adapter_policy_needs_the_peft_model(tmp_path):
    base_dir, adapter_dir = _saved_base_and_adapter(tmp_path)
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    SolForCausalLM(peft_model, CONFIG).save_pretrained(tmp_path / "policy")  # no adapter_name_or_path
    card = (tmp_path / "policy" / "README.md").read_text()
    assert "PeftModel.from_pretrained(base" in card
    with pytest.raises(SolArtifactError, match="names no adapter to load"):
        SolForCausalLM.from_pretrained(str(tmp_path / "policy"))


# --------------------------------------------------------------------------------------------
# Training with the adapter frozen
# --------------------------------------------------------------------------------------------


def test_training_updates_only_the_policy_of_a_lora_base(tmp_path):
    from test_training import tiny_args, tiny_dataset, tiny_tokenizer

    from sol_hf.training import SolGRPOTrainer

    peft_model = lora_model("llama")
    reference = copy.deepcopy(peft_model)
    config = SolConfig(page_size=4, sink_tokens=4, recent_tokens=4, policy_hidden_size=16, policy_heads=2, action_embedding_size=8)
    model = SolForCausalLM(peft_model, config)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    trainer = SolGRPOTrainer(model, tiny_args(tmp_path, max_steps=2), train_dataset=tiny_dataset(), processing_class=tiny_tokenizer())
    trainable = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert trainable == {id(p) for p in model.policy.parameters()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in model.policy.state_dict().items())
    state, expected = peft_model.state_dict(), reference.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)  # base and adapter untouched
    assert all(math.isfinite(entry.get("loss", 0.0)) for entry in trainer.state.log_history)


@pytest.mark.slow
def test_smollm2_with_a_lora_adapter_trains_a_few_updates(smollm2_path, tmp_path):
    """The real model plus a LoRA adapter on attention and MLP projections: exact at 1.0 against the
    PeftModel, a few GRPO updates of the policy on real text, the adapter frozen throughout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sol_hf.training import SolGRPOConfig, SolGRPOTrainer, windows_dataset

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    _randomize(peft_model, 0)
    with torch.no_grad():  # a modest adapter: the random B above is scaled down to keep the text fluent
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    peft_model.eval()
    text = "The Python standard library provides modules for file handling, networking and data processing. " * 8
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :96]
    expected = peft_model.generate(input_ids=ids[:, :32], max_new_tokens=6, do_sample=False)
    lora_before = {n: p.clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    model = SolForCausalLM(peft_model, SolConfig(budget_range=(0.5, 1.0)))
    assert torch.equal(model.generate(ids[:, :32], compute_budget=1.0, max_new_tokens=6, do_sample=False), expected)
    context, steps, k = 24, 6, 2
    windows = torch.stack([ids[0, i : i + context + steps + 1] for i in (0, 30, 60)])
    args = SolGRPOConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, context_length=context, rollout_steps=steps, num_generations=k,
        per_device_train_batch_size=2 * k, learning_rate=1e-3, disable_tqdm=True, seed=0, dataloader_pin_memory=False,
        report_to=[],
    )
    trainer = SolGRPOTrainer(model, args, train_dataset=windows_dataset(windows), processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.equal(p, lora_before[n]) for n, p in peft_model.named_parameters() if "lora_" in n)
    model.save_pretrained(tmp_path / "policy")
    saved = json.loads((tmp_path / "policy" / "sol_config.json").read_text())
    assert saved["adapter_fingerprint"]["sha256"] == adapter_fingerprint(peft_model)["sha256"]


def test_lora_layers_injected_without_a_peft_model_work_too():
    """``peft.inject_adapter_in_model`` (what transformers' own ``load_adapter`` builds on) puts LoRA
    layers into a plain transformers model: found the same way, exact at 1.0, bytes and
    fingerprint counted. (transformers 5.24's ``add_adapter`` asks for peft >= 0.22, not on PyPI yet.)"""
    from peft import inject_adapter_in_model

    base = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "up_proj"]), tiny_model("llama"), adapter_name="mine")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    base.eval()
    reference = copy.deepcopy(base)
    model = SolForCausalLM(base, CONFIG)
    assert model.peft_model is None
    assert adapter_fingerprint(base)["adapters"] == ["mine"]
    ids = _ids(2, 12)
    torch.testing.assert_close(model(ids).logits, _logits(reference, ids), atol=1e-5, rtol=1e-5)
    sites = {s.name: s for s in model.cost_model.bytes.sites}
    assert sites["attention_input"].row_bytes[0] == (64 + 32 + 32) * 4 + 4 * 4  # q/k/v rows + lora_A row of q


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_backend_reads_the_lora_rows_too():
    """The Triton sparse-linear kernel (interpreted on CPU) runs the base and the lora_A layouts of
    a decode step: same logits as the teacher-forced reference."""
    from sol_hf.ops import use_backend

    model = SolForCausalLM(lora_model("llama", **WIDE), CONFIG)
    ids = _ids(1, 16, seed=4)
    steps = 3
    actions = torch.full((1, steps), model.space.index_of(1.0, 0.3, 16))
    context = 16 - steps
    with use_backend("triton"):
        parallel = model(ids[:, context:], cache=model(ids[:, :context], use_cache=True).cache, actions=actions, use_cache=True)
        cache, logits = model(ids[:, :context], use_cache=True).cache, []
        for t in range(steps):
            out = model(ids[:, context + t : context + t + 1], cache=cache, actions=actions[:, t : t + 1], use_cache=True)
            cache = out.cache
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), parallel.logits, atol=5e-5, rtol=1e-4)
