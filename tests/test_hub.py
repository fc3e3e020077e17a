"""Policy artifacts: save_pretrained / from_pretrained / push_to_hub (issue 3).

Everything runs offline: Hub repos are simulated by a local huggingface_hub cache folder
(``models--org--name/snapshots/<commit>``), and ``push_to_hub`` is tested by intercepting
``HfApi``'s calls.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import shutil
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.config import FORMAT_VERSION
from sol_hf.hub import ARTIFACT_FILES, POLICY_WEIGHTS_NAME, SolArtifactError, base_fingerprint
from sol_hf.policy import PolicyController

BUDGET = 0.5
NEW_TOKENS = 6
# A grid cheap enough that 0.5 is reachable on tiny models (the policy's own bytes count), and a
# small policy (policy_hidden_size=32) so it does not dominate the tiny base's bytes.
TINY_CONFIG = SolConfig(
    activation_keep=(0.1, 0.25, 0.5, 1.0), sparse_inputs=("mlp_input", "mlp_output"), page_size=4, sink_tokens=1, recent_tokens=4,
    policy_hidden_size=32, policy_heads=2, policy_max_steps=64, budget_range=(0.4, 0.8),
)
BASE_COMMIT = "1" * 40
NEWER_BASE_COMMIT = "2" * 40
POLICY_COMMIT = "3" * 40


def _tiny_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=128, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    ))


def _tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        n_embd=128, n_layer=2, n_head=4, n_inner=1024, vocab_size=256, n_positions=256, bos_token_id=1, eos_token_id=2,
    ))


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny random bases of two families, saved as local checkpoints."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, model in (("llama", _tiny_llama()), ("gpt2", _tiny_gpt2()), ("llama3", _tiny_llama(layers=3, seed=5))):
        model.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _load_base(path: str):
    return AutoModelForCausalLM.from_pretrained(path)


def _sol_model(base) -> SolForCausalLM:
    """A wrapped model whose (untrained) policy is randomized so it makes varied, input-dependent choices."""
    model = SolForCausalLM(base, TINY_CONFIG)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.policy.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


def _prompts(vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (2, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    ids[1, :3] = 0
    return ids, mask


class RecordingController(PolicyController):
    """The policy controller, recording the (B,) actions it picks at every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.actions: list[torch.Tensor] = []

    def decide(self, ctx):
        actions = super().decide(ctx)
        self.actions.append(actions.clone())
        return actions


def _generate(model, ids, mask, sample: bool, budget: float = BUDGET, new_tokens: int = NEW_TOKENS):
    """(tokens, (B, steps) actions) of a policy-controlled generation; sampling seeded globally."""
    controller = RecordingController(model.policy, do_sample=sample)
    torch.manual_seed(1234)
    tokens = model.generate(
        ids, attention_mask=mask, compute_budget=budget, controller=controller, max_new_tokens=new_tokens,
        do_sample=sample, pad_token_id=0,
    )
    return tokens, torch.stack(controller.actions, dim=1)


def _generate_named(model, ids, mask, sample: bool, controller="policy"):
    torch.manual_seed(99)
    return model.generate(
        ids, attention_mask=mask, compute_budget=BUDGET, controller=controller,
        controller_kwargs={"do_sample": sample} if controller == "policy" else None,
        max_new_tokens=NEW_TOKENS, do_sample=sample, pad_token_id=0,
    )


def _assert_untouched(base) -> None:
    """The base model was never wrapped: no SOL attribute, hook or attention function, grads as loaded."""
    for name, module in base.named_modules():
        assert "_sol_runtime" not in module.__dict__, f"{name} kept _sol_runtime"
        assert not module._forward_hooks and not module._forward_pre_hooks, f"{name} kept hooks"
    assert not base.config._attn_implementation.startswith("sol_")
    assert all(p.requires_grad for p in base.parameters())


def _policy_logits(policy, lm_hidden: int) -> torch.Tensor:
    from sol_hf.policy import PolicyObservation

    g = torch.Generator().manual_seed(11)
    obs = PolicyObservation(
        hidden=torch.randn(2, 5, lm_hidden, generator=g), token_embedding=torch.randn(2, 5, lm_hidden, generator=g),
        features=torch.rand(2, 5, 13, generator=g), previous_action=torch.randint(0, policy.config.num_actions + 1, (2, 5), generator=g),
    )
    with torch.no_grad():
        return policy(obs)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip_picks_identical_actions_and_tokens(family, base_dirs, tmp_path):
    model = _sol_model(_load_base(base_dirs[family]))
    ids, mask = _prompts()
    low, _ = model.budget_range(ids.shape[1] + 1, "policy")
    assert low < BUDGET, f"budget {BUDGET} unreachable ({low:.3f}): the test would not exercise the policy"
    greedy, greedy_actions = _generate(model, ids, mask, sample=False)
    sampled, sampled_actions = _generate(model, ids, mask, sample=True)
    named_greedy = _generate_named(model, ids, mask, sample=False)
    named_sampled = _generate_named(model, ids, mask, sample=True)
    assert len(torch.unique(greedy_actions)) > 1, "the policy should make varied choices for a meaningful check"
    reference_logits = _policy_logits(model.policy, model.policy.lm_hidden_size)

    folder = tmp_path / "policy"
    model.save_pretrained(folder)
    base = model.unwrap()

    # Explicit base (an already loaded model) + policy folder.
    loaded = SolForCausalLM.from_pretrained(base, folder)
    assert loaded.policy is not model.policy and not loaded.training and loaded._policy_trained
    assert torch.equal(_policy_logits(loaded.policy, loaded.policy.lm_hidden_size), reference_logits)
    for name, tensor in model.policy.state_dict().items():
        assert torch.equal(loaded.policy.state_dict()[name], tensor), name
    assert loaded.sol_config.to_dict() == model.sol_config.to_dict()
    for sample, tokens, actions in ((False, greedy, greedy_actions), (True, sampled, sampled_actions)):
        new_tokens, new_actions = _generate(loaded, ids, mask, sample=sample)
        assert torch.equal(new_actions, actions)
        assert torch.equal(new_tokens, tokens)
    assert torch.equal(_generate_named(loaded, ids, mask, sample=False), named_greedy)
    assert torch.equal(_generate_named(loaded, ids, mask, sample=True), named_sampled)
    loaded.unwrap()

    # The policy folder alone: the base is loaded from the path recorded in sol_config.json,
    # and generate() defaults to the policy controller.
    alone = SolForCausalLM.from_pretrained(str(folder))
    assert alone.base_model is not base
    assert torch.equal(_generate_named(alone, ids, mask, sample=False, controller=None), named_greedy)
    assert alone.last_compute_report.controller == "policy"


def test_folder_holds_exactly_three_files_and_no_pickle(base_dirs, tmp_path):
    model = _sol_model(_load_base(base_dirs["llama"]))
    written = model.save_pretrained(tmp_path, evaluation=[{"budget": 0.5, "perplexity": 12.25}])
    assert sorted(os.listdir(tmp_path)) == sorted(ARTIFACT_FILES)
    assert sorted(written) == sorted(str(tmp_path / n) for n in ARTIFACT_FILES)
    for name in ARTIFACT_FILES:
        head = (tmp_path / name).read_bytes()[:4]
        assert not head.startswith(b"\x80"), f"{name} looks like a pickle"
        assert not head.startswith(b"PK"), f"{name} looks like a torch.save zip"
    tensors = load_file(tmp_path / POLICY_WEIGHTS_NAME)
    assert set(tensors) == set(model.policy.state_dict())
    base_params = {n for n, _ in model.base_model.named_parameters()}
    assert not base_params & set(tensors), "base weights must never be saved"
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in model.policy.parameters())

    saved = json.loads((tmp_path / "sol_config.json").read_text())
    assert SolConfig.from_dict(saved).to_dict() == model.sol_config.to_dict()
    assert saved["base_fingerprint"] == base_fingerprint(model.base_model)
    assert saved["base_fingerprint"]["num_key_value_heads"] == 2 and saved["base_fingerprint"]["intermediate_size"] == 1024
    assert saved["sol_hf_version"] and saved["format_version"] == FORMAT_VERSION == 4
    assert saved["base_model_name_or_path"] == base_dirs["llama"]

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "sol_hf" and card.data.pipeline_tag == "text-generation"
    assert "sol" in card.data.tags
    assert card.data.base_model is None, "a local base path is not Hub metadata"
    assert "| 0.5 | 12.25 |" in card.text and "0.4 to 0.8" in card.text
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    compile(snippet, "README.md", "exec")
    assert f'SolForCausalLM.from_pretrained("{tmp_path}")' in snippet


def test_gpt2_fingerprint_counts_default_inner_size():
    fp = base_fingerprint(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100))
    assert fp["intermediate_size"] == 256 and fp["num_key_value_heads"] == 2 and fp["model_type"] == "gpt2"


# ---------------------------------------------------------------------------------------------
# Hub repos (a local huggingface_hub cache, offline)
# ---------------------------------------------------------------------------------------------


def _cache_repo(cache: Path, repo_id: str, source: Path, commit: str, ref: str = "main") -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in Path(source).iterdir():
        shutil.copy(item, snapshot / item.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


def test_hub_ids_load_offline_pinned_to_the_base_revision(base_dirs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _cache_repo(cache, "org/tiny-llama", Path(base_dirs["llama"]), BASE_COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # where save looks up the base commit

    model = _sol_model(AutoModelForCausalLM.from_pretrained("org/tiny-llama", cache_dir=cache))
    ids, mask = _prompts()
    greedy, actions = _generate(model, ids, mask, sample=False)
    model.save_pretrained(tmp_path / "policy")
    saved = json.loads((tmp_path / "policy" / "sol_config.json").read_text())
    assert saved["base_model_name_or_path"] == "org/tiny-llama" and saved["base_revision"] == BASE_COMMIT
    card = ModelCard.load(tmp_path / "policy" / "README.md")
    assert card.data.base_model == "org/tiny-llama"
    assert "base_model:adapter:org/tiny-llama" in card.data.tags
    assert f'revision="{BASE_COMMIT}"' in card.text
    model.unwrap()

    # The base repo moves on: main now points to other weights of the same architecture.
    other = tmp_path / "other"
    _tiny_llama(seed=42).save_pretrained(other)
    _cache_repo(cache, "org/tiny-llama", other, NEWER_BASE_COMMIT)
    _cache_repo(cache, "org/tiny-policy", tmp_path / "policy", POLICY_COMMIT)

    loaded = SolForCausalLM.from_pretrained("org/tiny-policy", cache_dir=cache)
    pinned = torch.equal(loaded.base_model.lm_head.weight, model.base_model.lm_head.weight)
    assert pinned, "the policy alone must load its base at the pinned revision, not the moved main branch"
    new_greedy, new_actions = _generate(loaded, ids, mask, sample=False)
    assert torch.equal(new_actions, actions) and torch.equal(new_greedy, greedy)
    loaded.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "sol_config.json").read_text())["base_revision"] == BASE_COMMIT
    loaded.unwrap()

    # Explicit base id + policy id at a policy revision; base_revision overrides the pin.
    newer = SolForCausalLM.from_pretrained(
        "org/tiny-llama", "org/tiny-policy", revision=POLICY_COMMIT, base_revision=NEWER_BASE_COMMIT, cache_dir=cache
    )
    assert not torch.equal(newer.base_model.lm_head.weight, model.base_model.lm_head.weight)
    newer.unwrap()

    with pytest.raises(SolArtifactError, match="could not find policy 'org/tiny-policy'.*revision='v9'"):
        SolForCausalLM.from_pretrained("org/tiny-llama", "org/tiny-policy", revision="v9", cache_dir=cache)
    with pytest.raises(SolArtifactError, match="not a SOL policy artifact"):
        SolForCausalLM.from_pretrained("org/tiny-llama", cache_dir=cache)  # a base repo is not a policy


def test_push_to_hub_commits_the_three_files(base_dirs, monkeypatch):
    calls: dict[str, list] = {"create_repo": [], "create_branch": [], "create_commit": []}
    real = {name: inspect.signature(getattr(HfApi, name)) for name in calls}  # calls must fit the real API

    def create_repo(self, repo_id, **kwargs):
        real["create_repo"].bind(self, repo_id, **kwargs)
        calls["create_repo"].append((repo_id, kwargs))
        return types.SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        real["create_branch"].bind(self, repo_id, **kwargs)
        calls["create_branch"].append((repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        real["create_commit"].bind(self, repo_id, operations, **kwargs)
        assert all(isinstance(op, CommitOperationAdd) for op in operations)
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        calls["create_commit"].append((repo_id, files, kwargs))
        return "commit-info"

    def refuse(self, *args, **kwargs):
        raise AssertionError("push_to_hub must send exactly one commit")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    monkeypatch.setattr(HfApi, "upload_file", refuse)

    model = _sol_model(_load_base(base_dirs["llama"]))
    result = model.push_to_hub(
        "me/sol-tiny", private=True, token="hf_test", revision="v1", commit_message="first policy",
        evaluation=[{"budget": 0.5, "perplexity": 9.5}],
    )
    assert result == "commit-info"
    assert calls["create_repo"] == [("me/sol-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert calls["create_branch"][0][0] == "me/sol-tiny" and calls["create_branch"][0][1]["branch"] == "v1"
    [(repo_id, files, kwargs)] = calls["create_commit"]
    assert repo_id == "me/sol-tiny"
    assert sorted(files) == sorted(ARTIFACT_FILES), "only the artifact, never base weights"
    assert kwargs["commit_message"] == "first policy" and kwargs["revision"] == "v1"

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "sol_hf" and card.data.pipeline_tag == "text-generation"
    assert {"sol", "sol_hf"} <= set(card.data.tags)
    assert 'SolForCausalLM.from_pretrained("me/sol-tiny")' in card.text
    assert "| 0.5 | 9.5 |" in card.text
    config = json.loads(files["sol_config.json"])
    assert config["base_fingerprint"] == base_fingerprint(model.base_model)
    weights_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sol-push-{os.getpid()}.safetensors"
    weights_path.write_bytes(files[POLICY_WEIGHTS_NAME])
    try:
        assert set(load_file(weights_path)) == set(model.policy.state_dict())
    finally:
        weights_path.unlink()


# ---------------------------------------------------------------------------------------------
# Bad artifacts: each one its error, and the base model untouched
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_artifact(base_dirs, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifact")
    model = _sol_model(_load_base(base_dirs["llama"]))
    model.save_pretrained(folder)
    model.unwrap()
    return folder


def _edit_config(folder: Path, **changes) -> None:
    data = json.loads((folder / "sol_config.json").read_text())
    data.update(changes)
    (folder / "sol_config.json").write_text(json.dumps(data))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / POLICY_WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, folder / POLICY_WEIGHTS_NAME)


def _pickle_only(folder: Path) -> None:
    tensors = load_file(folder / POLICY_WEIGHTS_NAME)
    (folder / POLICY_WEIGHTS_NAME).unlink()
    torch.save(tensors, folder / "policy.bin")


def _truncate(folder: Path) -> None:
    data = (folder / POLICY_WEIGHTS_NAME).read_bytes()
    (folder / POLICY_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _tamper_fingerprint(folder: Path) -> None:
    data = json.loads((folder / "sol_config.json").read_text())
    data["base_fingerprint"]["vocab_size"] = 999
    (folder / "sol_config.json").write_text(json.dumps(data))


BAD_ARTIFACTS = {
    "pickle policy": (_pickle_only, "pickle-based checkpoint"),
    "missing sol_config.json": (lambda f: (f / "sol_config.json").unlink(), "has no sol_config.json"),
    "missing policy.safetensors": (lambda f: (f / POLICY_WEIGHTS_NAME).unlink(), "no policy.safetensors"),
    "invalid JSON": (lambda f: (f / "sol_config.json").write_text('{"attention_keep": [0.5, 1.0'), "not valid JSON"),
    "JSON not an object": (lambda f: (f / "sol_config.json").write_text("[1, 2]"), "must hold a JSON object"),
    "newer format": (lambda f: _edit_config(f, format_version=FORMAT_VERSION + 1, kv_refresh_schedule="x"), "newer sol_hf"),
    "invalid config value": (lambda f: _edit_config(f, page_size=-1), "valid SolConfig.*page_size"),
    "unknown config field": (lambda f: _edit_config(f, surprise=1), "unknown SolConfig fields"),
    "tampered fingerprint": (_tamper_fingerprint, "does not match its fields"),
    "truncated safetensors": (_truncate, "truncated or corrupt"),
    "garbage safetensors": (lambda f: (f / POLICY_WEIGHTS_NAME).write_bytes(os.urandom(512)), "truncated or corrupt"),
    "pickle renamed to safetensors": (
        lambda f: (f / POLICY_WEIGHTS_NAME).write_bytes(pickle.dumps({"x": 1})), "truncated or corrupt"
    ),
    "missing tensor": (lambda f: _edit_tensors(f, lambda t: t.pop("head.weight")), r"missing tensors \['head.weight'\]"),
    "extra tensor": (lambda f: _edit_tensors(f, lambda t: t.update(extra=torch.zeros(3))), r"unexpected tensors \['extra'\]"),
    "mis-shaped tensor": (
        lambda f: _edit_tensors(f, lambda t: t.update({"head.bias": torch.zeros(7)})), r"mis-shaped tensors \[head.bias"
    ),
    "integer tensor": (
        lambda f: _edit_tensors(f, lambda t: t.update({"head.bias": t["head.bias"].long()})), "wrong dtype kind"
    ),
    "other policy's config": (lambda f: _edit_config(f, policy_hidden_size=64), "mis-shaped tensors"),
}


@pytest.mark.parametrize("case", list(BAD_ARTIFACTS))
def test_bad_artifact_is_refused_and_base_untouched(case, good_artifact, base_dirs, tmp_path, monkeypatch):
    corrupt, message = BAD_ARTIFACTS[case]
    folder = tmp_path / "artifact"
    shutil.copytree(good_artifact, folder)
    corrupt(folder)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    base = _load_base(base_dirs["llama"])
    with pytest.raises(SolArtifactError, match=message):
        SolForCausalLM.from_pretrained(base, folder)
    _assert_untouched(base)

    # With the policy alone, the artifact is refused before any base weights are loaded.
    def no_base(*args, **kwargs):
        raise AssertionError("base weights were loaded for a bad artifact")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_base)
    with pytest.raises(SolArtifactError, match=message):
        SolForCausalLM.from_pretrained(str(folder))


def test_pickle_file_path_is_refused(good_artifact, base_dirs, tmp_path):
    path = tmp_path / "policy.pt"
    path.write_bytes(b"\x80\x04not really")
    base = _load_base(base_dirs["llama"])
    with pytest.raises(SolArtifactError, match="pickle-based checkpoint.*policy.safetensors"):
        SolForCausalLM.from_pretrained(base, path)
    _assert_untouched(base)


def test_fingerprint_mismatch_is_refused_with_both_fingerprints(good_artifact, base_dirs):
    other = _load_base(base_dirs["llama3"])  # same width, one more layer
    theirs = json.loads((good_artifact / "sol_config.json").read_text())["base_fingerprint"]
    ours = base_fingerprint(other)
    with pytest.raises(SolArtifactError) as err:
        SolForCausalLM.from_pretrained(other, good_artifact)
    text = str(err.value)
    assert theirs["sha256"] in text and ours["sha256"] in text and "num_hidden_layers: policy 2 vs base 3" in text
    _assert_untouched(other)

    gpt2 = _load_base(base_dirs["gpt2"])
    with pytest.raises(SolArtifactError, match="'model_type': 'gpt2'"):
        SolForCausalLM.from_pretrained(gpt2, good_artifact)
    _assert_untouched(gpt2)

    with pytest.warns(UserWarning, match="different base model"):
        model = SolForCausalLM.from_pretrained(other, good_artifact, allow_fingerprint_mismatch=True)
    assert model._policy_trained
    model.unwrap()


def test_missing_fingerprint_needs_the_override(good_artifact, base_dirs, tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(good_artifact, folder)
    data = json.loads((folder / "sol_config.json").read_text())
    del data["base_fingerprint"]
    (folder / "sol_config.json").write_text(json.dumps(data))
    base = _load_base(base_dirs["llama"])
    with pytest.raises(SolArtifactError, match="has no base_fingerprint"):
        SolForCausalLM.from_pretrained(base, folder)
    _assert_untouched(base)
    with pytest.warns(UserWarning, match="has no base_fingerprint"):
        SolForCausalLM.from_pretrained(base, folder, allow_fingerprint_mismatch=True).unwrap()


def test_bad_arguments(good_artifact, base_dirs, tmp_path):
    base = _load_base(base_dirs["llama"])
    with pytest.raises(TypeError, match="needs a policy"):
        SolForCausalLM.from_pretrained(base)
    with pytest.raises(SolArtifactError, match="not a SOL policy artifact"):
        SolForCausalLM.from_pretrained(base_dirs["llama"])  # a base checkpoint is not a policy
    with pytest.raises(SolArtifactError, match="does not exist"):
        SolForCausalLM.from_pretrained(base, str(tmp_path / "nowhere" / "policy"))
    with pytest.raises(TypeError, match="already loaded"):
        SolForCausalLM.from_pretrained(base, good_artifact, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="trust_remote_code"):
        SolForCausalLM.from_pretrained(str(good_artifact), trust_remote_code=True)
    wrapped = SolForCausalLM.from_pretrained(base, good_artifact)
    with pytest.raises(ValueError, match="already wrapped"):
        SolForCausalLM.from_pretrained(base, good_artifact)
    with pytest.raises(TypeError, match="pass model.unwrap"):
        SolForCausalLM.from_pretrained(wrapped, good_artifact)
    wrapped.unwrap()
    assert not [m for m in base.modules() if "_sol_runtime" in m.__dict__]


# ---------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_round_trip_and_card_snippet(smollm2_path, tmp_path):
    """SmolLM2-135M: save, reload through the model card's own usage snippet (policy alone, base
    from the recorded path), identical actions and tokens at budget 0.5, greedy and sampled."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.padding_side = "left"
    enc = tokenizer(["The capital of France is", "Once upon a time, there was a"], padding=True, return_tensors="pt")
    config = SolConfig(activation_keep=(0.1, 0.25, 0.5, 1.0), sparse_inputs=("mlp_input", "mlp_output"), budget_range=(0.4, 0.8))
    model = SolForCausalLM(AutoModelForCausalLM.from_pretrained(smollm2_path), config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.policy.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    model.eval()
    assert model.budget_range(enc.input_ids.shape[1] + 1, "policy")[0] < BUDGET
    runs = {s: _generate(model, enc.input_ids, enc.attention_mask, sample=s, new_tokens=4) for s in (False, True)}
    folder = tmp_path / "smollm2-policy"
    model.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == sorted(ARTIFACT_FILES)
    model.unwrap()
    del model

    card = (folder / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # runs as written
    loaded = namespace["model"]
    assert namespace["model"].last_compute_report.controller == "policy"
    for sample, (tokens, actions) in runs.items():
        new_tokens, new_actions = _generate(loaded, enc.input_ids, enc.attention_mask, sample=sample, new_tokens=4)
        assert torch.equal(new_actions, actions)
        assert torch.equal(new_tokens, tokens)
