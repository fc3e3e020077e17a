"""sol_hf.training: reward arithmetic by hand, policy-only updates, checkpoints and resume, DDP on CPU."""

import copy
import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.training import (
    SolGRPOConfig,
    SolGRPOTrainer,
    budget_penalty,
    discounted_returns,
    episode_means,
    group_advantages,
    sample_budget_targets,
    split_texts,
    step_rewards,
    windows_dataset,
)

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import VOCAB, tiny_model  # noqa: E402

CONTEXT, STEPS, K = 24, 6, 4


# --------------------------------------------------------------------------------------------
# Reward arithmetic, against values worked out by hand
# --------------------------------------------------------------------------------------------


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]])
    # G2 = r2; G1 = r1 + 0.5 G2; G0 = r0 + 0.5 G1
    expected = torch.tensor([[1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0], [-1 + 0.5 * (0 + 0.5 * 4), 0 + 0.5 * 4, 4.0]])
    assert torch.allclose(discounted_returns(rewards, 0.5), expected)
    assert torch.equal(discounted_returns(rewards, 0.0), rewards)  # no aggregation: raw rewards
    assert torch.allclose(discounted_returns(rewards, 1.0)[:, 0], rewards.sum(-1))  # undiscounted sum
    assert torch.allclose(discounted_returns(rewards, 0.85)[0, 1], torch.tensor(2 + 0.85 * 3))
    with pytest.raises(ValueError):
        discounted_returns(rewards, 1.5)


def test_step_rewards():
    lp = torch.tensor([[-1.0, -2.0]])
    kl = torch.tensor([[0.5, 0.25]])
    assert torch.equal(step_rewards(lp, None, "loglik"), lp)
    assert torch.equal(step_rewards(lp, kl, "neg_kl"), -kl)
    with pytest.raises(ValueError, match="neg_kl"):
        step_rewards(lp, None, "neg_kl")
    with pytest.raises(ValueError, match="reward_type"):
        step_rewards(lp, None, "bleu")


def test_episode_means_units():
    cost = torch.tensor([[0.5, 1.0]])
    means = episode_means(cost, torch.tensor([[0.1, 1.0]]), torch.tensor([[0.4, 0.8]]), torch.tensor([[8, 16]]))
    assert torch.allclose(means, torch.tensor([[0.75, 0.55, 0.6, 0.75]]))  # bits as bits/16: (8+16)/2/16


def test_budget_penalty_by_hand():
    weights = (100.0, 100.0, 100.0, 200.0)
    targets = torch.tensor([[0.5, 0.5, 0.8, 0.75]])
    is_set = torch.tensor([[False, True, True, True]])
    achieved = torch.tensor([[0.9, 0.51, 0.9, 0.5]])
    # cost: not set; attention: |0.01| inside the 0.02 dead zone -> 0;
    # mlp: (0.1 - 0.02)^2 * 100 = 0.64; bits: (0.25 - 0.02)^2 * 200 = 10.58
    penalty = budget_penalty(achieved, targets, is_set, weights, 0.02)
    assert torch.allclose(penalty, torch.tensor([0.64 + 10.58]))
    # symmetric: under-spending by the same amount costs the same
    under = torch.tensor([[0.1, 0.49, 0.7, 1.0]])
    assert torch.allclose(budget_penalty(under, targets, is_set, weights, 0.02), penalty)
    # the unified cost dimension alone
    cost_only = budget_penalty(torch.tensor([[0.6, 0, 0, 0]]), targets, torch.tensor([[True, False, False, False]]), weights, 0.02)
    assert torch.allclose(cost_only, torch.tensor([(0.1 - 0.02) ** 2 * 100]))


def test_group_advantages_by_hand():
    returns = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [20.0, 0.0]])  # 2 windows x K=2
    process = group_advantages(returns, 2, "process", "center", whiten=False)
    assert torch.allclose(process, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-5.0, 0.0], [5.0, 0.0]]))
    zscore = group_advantages(returns, 2, "process", "zscore", whiten=False, eps=0.0)
    # population std of each group at each step: 1, 1 (group 0); 5, 0 (group 1; 0/0 guarded by eps)
    assert torch.allclose(zscore[:2], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert torch.allclose(group_advantages(returns, 2, "process", "zscore", whiten=False)[2:, 0], torch.tensor([-1.0, 1.0]), atol=1e-5)
    outcome = group_advantages(returns, 2, "outcome", "center", whiten=False)  # from G_0 = returns[:, 0]
    assert torch.allclose(outcome, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-5.0, -5.0], [5.0, 5.0]]))
    whitened = group_advantages(returns, 2, "process", "center", whiten=True)
    flat = process.flatten()
    assert torch.allclose(whitened.flatten(), (flat - flat.mean()) / flat.std(unbiased=False), atol=1e-5)
    assert abs(float(whitened.mean())) < 1e-6 and abs(float(whitened.std(unbiased=False)) - 1) < 1e-5
    with pytest.raises(ValueError, match="groups"):
        group_advantages(returns, 3)


def test_penalty_shifts_advantages_of_the_overspender():
    """Same likelihoods, one schedule misses its budget: it gets the lower advantage at every step."""
    returns = torch.zeros(2, 3)
    penalty = budget_penalty(torch.tensor([[0, 0.5, 1, 1], [0, 0.8, 1, 1]]), torch.tensor([[1, 0.5, 1, 1]] * 2),
                             torch.tensor([[False, True, False, False]] * 2), (100, 100, 100, 200))
    adv = group_advantages(returns - penalty.unsqueeze(-1), 2, whiten=False)
    expected = 100 * (0.3 - 0.02) ** 2 / 2
    assert torch.allclose(adv, torch.tensor([[expected] * 3, [-expected] * 3]))


# --------------------------------------------------------------------------------------------
# Config and budgets
# --------------------------------------------------------------------------------------------


def test_config_defaults_and_validation(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated TrainingArguments field set by us
        cfg = SolGRPOConfig(output_dir=str(tmp_path))
    assert cfg.gradient_checkpointing is False and getattr(cfg, "activation_checkpointing", False) is False
    assert (cfg.rollout_steps, cfg.context_length, cfg.num_generations) == (16, 1024, 16)
    assert (cfg.temperature, cfg.reward_gamma, cfg.budget_tolerance, cfg.entropy_coef) == (1.3, 0.85, 0.02, 0.05)
    assert (cfg.reward_type, cfg.advantage_level, cfg.advantage_normalization, cfg.whiten_advantages) == ("loglik", "process", "center", True)
    assert cfg.budget_penalty_weights == (100.0, 100.0, 100.0, 200.0)
    assert cfg.budget_guard is None and cfg.learning_rate == 1e-4 and cfg.max_grad_norm == 2.0
    if not torch.cuda.is_available():
        assert cfg.bf16 is False
    assert cfg.window_length == 1024 + 16 + 1
    for bad in (dict(beta=0.1), dict(reward_type="x"), dict(advantage_level="x"), dict(budget_mode="x"),
                dict(per_device_train_batch_size=6, num_generations=4), dict(attention_budget_range=(0.5, 0.2)),
                dict(budget_penalty_weights=(1, 2))):
        with pytest.raises(ValueError):
            SolGRPOConfig(output_dir=str(tmp_path), **{"num_generations": 4, "per_device_train_batch_size": 8, **bad})


def test_budget_sampling_modes(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = dict(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8)
    per_axis = sample_budget_targets(200, SolGRPOConfig(**base, budget_mode="per_axis"), 0.5, (0.3, 1.0), g)
    assert not per_axis.is_set[:, 0].any() and per_axis.is_set[:, 1:].all()
    assert per_axis.values[:, 1].min() >= 0.1 and per_axis.values[:, 2].min() >= 0.4
    assert per_axis.values[:, 3].min() >= 5 / 16 and per_axis.values[:, 3].max() <= 1.0
    cost = sample_budget_targets(200, SolGRPOConfig(**base, budget_mode="cost"), 0.5, (0.3, 1.0), g)
    assert cost.is_set[:, 0].all() and not cost.is_set[:, 1:].any()
    assert cost.values[:, 0].min() >= 0.5  # floored at the cheapest reachable cost
    mixed = sample_budget_targets(200, SolGRPOConfig(**base, budget_mode="mixed"), 0.5, (0.3, 1.0), g)
    n_cost = int(mixed.is_set[:, 0].sum())
    assert 60 < n_cost < 140 and torch.equal(mixed.is_set[:, 1], ~mixed.is_set[:, 0])


def test_split_texts_holds_out_whole_documents():
    texts = [f"doc{i}" for i in range(25)]
    train, val = split_texts(texts, 10)
    assert val == ["doc9", "doc19"] and len(train) == 23 and not set(train) & set(val)


# --------------------------------------------------------------------------------------------
# Training runs on a tiny model
# --------------------------------------------------------------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w0", eos_token="w1", bos_token="w2")


def tiny_sol(seed: int = 0, preset: str = "default"):
    base = tiny_model("llama", seed=seed)
    reference = copy.deepcopy(base)
    config = SolConfig.from_preset(preset, page_size=4, sink_tokens=4, recent_tokens=4, policy_hidden_size=16, policy_heads=2,
                                   action_embedding_size=8)
    torch.manual_seed(seed)
    return SolForCausalLM(base, config), reference


def tiny_dataset(n: int = 16):
    windows = torch.randint(3, VOCAB, (n, CONTEXT + STEPS + 1), generator=torch.Generator().manual_seed(0))
    return windows_dataset(windows)


def tiny_args(tmp_path, **kw) -> SolGRPOConfig:
    defaults = dict(
        output_dir=str(tmp_path / "run"), max_steps=1, context_length=CONTEXT, rollout_steps=STEPS, num_generations=K,
        per_device_train_batch_size=2 * K, budget_guard=0.25, budget_mode="mixed", learning_rate=1e-2,
        disable_tqdm=True, seed=0, dataloader_pin_memory=False,
    )
    defaults.update(kw)
    return SolGRPOConfig(**defaults)


def test_one_step_changes_only_policy_parameters(tmp_path):
    model, reference = tiny_sol()
    policy_before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    trainer = SolGRPOTrainer(model, tiny_args(tmp_path), train_dataset=tiny_dataset(), processing_class=tiny_tokenizer())
    trainable = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert trainable == {id(p) for p in model.policy.parameters()}
    assert set(trainer.model.state_dict()) == {f"policy.{k}" for k in model.policy.state_dict()}
    trainer.train()
    after = model.policy.state_dict()
    assert any(not torch.equal(policy_before[k], after[k]) for k in after)
    base_now, base_ref = model.base_model.state_dict(), reference.state_dict()
    assert base_now.keys() == base_ref.keys()
    assert all(torch.equal(base_now[k], base_ref[k]) for k in base_ref)
    logs = trainer.state.log_history[0]
    for key in ("loss", "reward", "budget/penalty", "entropy", "episode_time", "budget/cost"):
        assert key in logs and math.isfinite(logs[key]), key
    assert math.isfinite(logs["grad_norm"])


def test_training_on_int8_weight_copies_and_the_artifact_keeps_them(tmp_path):
    """The trainer needs no special case for the precision axis: one update on the int8 preset
    samples 8-bit actions, and the saved policy reloads on the same action grid."""
    model, reference = tiny_sol(preset="int8-weights")
    trainer = SolGRPOTrainer(model, tiny_args(tmp_path), train_dataset=tiny_dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    logs = trainer.state.log_history[0]
    assert math.isfinite(logs["loss"]) and math.isfinite(logs["reward"])
    model.save_pretrained(tmp_path / "policy")
    loaded = SolForCausalLM.from_pretrained(reference, tmp_path / "policy")
    assert loaded.sol_config.quantize == "weights" and loaded.space.bits == (8, 16)
    ids = torch.randint(3, VOCAB, (1, CONTEXT), generator=torch.Generator().manual_seed(1))
    low = loaded.budget_range(CONTEXT + 1, "policy")[0]
    loaded.generate(ids, compute_budget=low + 0.02, max_new_tokens=4, do_sample=False)
    assert loaded.last_compute_report.bits.item() < 16  # near the floor the policy must play int8 steps


def test_advantages_are_per_step_and_group_relative(tmp_path):
    model, _ = tiny_sol()
    trainer = SolGRPOTrainer(model, tiny_args(tmp_path, whiten_advantages=False), train_dataset=tiny_dataset(),
                             processing_class=tiny_tokenizer())
    rows = [{"input_ids": w} for w in tiny_dataset(2)["input_ids"] for _ in range(K)]
    batch = trainer._generate_and_score_completions(rows)
    assert batch["advantages"].shape == (2 * K, STEPS) == batch["actions"].shape == batch["old_log_probs"].shape
    assert torch.allclose(batch["advantages"].view(2, K, STEPS).sum(1), torch.zeros(2, STEPS), atol=1e-5)
    # the stored log-probs are those the policy recomputes with grad (same guard mask and temperature)
    lp, entropy = trainer.model(**{k: batch[k] for k in ("hidden", "token_embedding", "features", "previous_action", "actions")},
                                allowed=batch.get("allowed"), temperature=trainer.args.temperature)
    assert torch.allclose(lp, batch["old_log_probs"], atol=1e-4)
    assert (entropy >= -1e-6).all()
    with pytest.raises(RuntimeError, match="split"):
        trainer._generate_and_score_completions(rows[1:] + rows[:1])


def _policy_files(folder):
    return sorted(os.listdir(folder))


def test_checkpoint_holds_the_policy_artifact_and_no_base_weights(tmp_path):
    model, _ = tiny_sol()
    args = tiny_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    trainer = SolGRPOTrainer(model, args, train_dataset=tiny_dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    files = _policy_files(checkpoint)
    assert {"sol_config.json", "policy.safetensors", "README.md", "trainer_state.json", "optimizer.pt"} <= set(files)
    assert not any(f.startswith(("model", "pytorch_model")) or f == "training_args.bin" for f in files)
    tensors = load_file(str(checkpoint / "policy.safetensors"))
    assert set(tensors) == set(model.policy.state_dict())
    base_shapes = {tuple(p.shape) for p in model.base_model.parameters()}
    assert not any(tuple(t.shape) == tuple(model.base_model.get_input_embeddings().weight.shape) for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in model.policy.parameters())
    assert base_shapes  # sanity
    # the final output is the artifact alone: it loads back onto a fresh base
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert _policy_files(out) == ["README.md", "policy.safetensors", "sol_config.json"]
    config = json.loads((out / "sol_config.json").read_text())
    assert config["attention_keep"] == list(model.sol_config.attention_keep)
    fresh, _ = tiny_sol(seed=0)
    from sol_hf.training.trainer import load_policy_weights

    load_policy_weights(fresh.policy, str(out))
    assert all(torch.equal(a, b) for a, b in zip(fresh.policy.state_dict().values(), model.policy.state_dict().values()))


def test_resume_from_checkpoint_continues_with_the_same_state(tmp_path):
    dataset = tiny_dataset()
    straight, _ = tiny_sol()
    args = tiny_args(tmp_path / "a", max_steps=3, save_strategy="steps", save_steps=1)
    trainer = SolGRPOTrainer(straight, args, train_dataset=dataset, processing_class=tiny_tokenizer())
    trainer.train()
    final_straight = {k: v.clone() for k, v in straight.policy.state_dict().items()}
    losses_straight = [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > 1]

    resumed, _ = tiny_sol()
    with torch.no_grad():  # a different initial policy: everything must come from the checkpoint
        for p in resumed.policy.parameters():
            p.add_(0.1)
    args_b = tiny_args(tmp_path / "a", max_steps=3, save_strategy="no")
    trainer_b = SolGRPOTrainer(resumed, args_b, train_dataset=dataset, processing_class=tiny_tokenizer())
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "run" / "checkpoint-1"))
    assert trainer_b.state.global_step == 3
    losses_resumed = [h["loss"] for h in trainer_b.state.log_history if "loss" in h and h["step"] > 1]
    assert len(losses_straight) == 2 and losses_resumed == pytest.approx(losses_straight, rel=1e-6, abs=1e-8)
    for name, value in resumed.policy.state_dict().items():
        assert torch.allclose(value, final_straight[name], atol=1e-6), name


def test_trainer_rejects_bad_inputs(tmp_path):
    model, _ = tiny_sol()
    from datasets import Dataset

    with pytest.raises(ValueError, match="input_ids"):
        SolGRPOTrainer(model, tiny_args(tmp_path), train_dataset=Dataset.from_dict({"text": ["a"]}), processing_class=tiny_tokenizer())
    with pytest.raises(TypeError, match="SolForCausalLM"):
        SolGRPOTrainer(model.base_model, tiny_args(tmp_path), train_dataset=tiny_dataset(), processing_class=tiny_tokenizer())
    trainer = SolGRPOTrainer(model, tiny_args(tmp_path, context_length=CONTEXT + 1), train_dataset=tiny_dataset(),
                             processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match="tokens"):
        trainer.train()


# --------------------------------------------------------------------------------------------
# accelerate launch with 2 CPU processes
# --------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_training import tiny_args, tiny_dataset, tiny_sol, tiny_tokenizer
    from sol_hf.training import SolGRPOTrainer
    from pathlib import Path

    model, _ = tiny_sol()
    args = tiny_args(Path({out!r}), max_steps=2)
    trainer = SolGRPOTrainer(model, args, train_dataset=tiny_dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    rank = trainer.accelerator.process_index
    flat = torch.cat([p.detach().flatten() for p in model.policy.parameters()])
    with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"world": trainer.accelerator.num_processes, "sum": float(flat.double().sum()),
                   "first": flat[:8].tolist(), "steps": trainer.state.global_step}}, f)
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    # Leave without running C++ static destructors: gloo's threads occasionally abort the process
    # at interpreter teardown ("terminate called without an active exception"), after all work
    # is done and written; what this test checks is above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


def test_accelerate_launch_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # torchrun under the hood; SolGRPOConfig sets use_cpu on a CPU-only machine, so the two processes
    # form one gloo DDP group (accelerate's --cpu with several processes would need mpirun).
    with socket.socket() as sock:  # a free port: concurrent runs must not meet on torchrun's default 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 2 for r in ranks)
    # DDP keeps the replicas identical: same gradients (all-reduced), same updates
    assert ranks[0]["first"] == pytest.approx(ranks[1]["first"], abs=1e-7)
    assert ranks[0]["sum"] == pytest.approx(ranks[1]["sum"], rel=1e-9)


def test_train_policy_end_to_end_writes_only_the_artifact(tmp_path):
    from sol_hf.training import train_policy

    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    rng = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (200,), generator=rng)) for _ in range(10)]
    out = train_policy(
        str(base_dir), str(tmp_path / "policy"), texts=texts, steps=1, context_length=CONTEXT, rollout_steps=STEPS,
        windows_per_step=2, num_generations=K, grid={"attention_keep": (0.5, 1.0), "activation_keep": (0.5, 1.0), "bits": (8, 16)},
        sol_config_overrides={"page_size": 4, "sink_tokens": 4, "recent_tokens": 4, "policy_hidden_size": 16, "policy_heads": 2},
        progress=False, dataloader_pin_memory=False,
    )
    assert sorted(os.listdir(out)) == ["README.md", "policy.safetensors", "sol_config.json"]
    config = json.loads((tmp_path / "policy" / "sol_config.json").read_text())
    assert config["action_head"] == "factorized" and config["bits"] == [8, 16]
    run = tmp_path / "policy-run"
    assert (run / "training_log.json").exists() and (run / "validation_windows.safetensors").exists()


def test_saved_windows_load_cut_and_evenly_spaced(tmp_path):
    from safetensors.torch import save_file

    from sol_hf.data import evenly_spaced, load_windows

    windows = torch.arange(10 * 6).view(10, 6)
    path = str(tmp_path / "w.safetensors")
    save_file({"windows": windows}, path)
    got = load_windows(path, 4, count=3)
    assert torch.equal(got, windows[[0, 4, 9], :4])  # linspace(0, 9, 3) = 0, 4.5 -> 4 (round half even), 9
    assert torch.equal(load_windows(path, 6), windows)
    assert torch.equal(evenly_spaced(windows, 50), windows)
    with pytest.raises(ValueError, match="7 are needed"):
        load_windows(path, 7)
    save_file({"other": windows}, path)
    with pytest.raises(ValueError, match="no \\(N, L\\) 'windows'"):
        load_windows(path, 4)


def test_priced_rewards_by_hand_and_their_effect_on_advantages():
    from sol_hf.training import priced_rewards

    rewards = torch.tensor([[-1.0, -2.0], [-1.5, -2.0]])
    cost = torch.tensor([[1.0, 0.8], [0.76, 0.8]])
    assert torch.equal(priced_rewards(rewards, cost, 0.0), rewards)
    assert torch.allclose(priced_rewards(rewards, cost, 2.0), torch.tensor([[-3.0, -3.6], [-3.02, -3.6]]))
    # step 0: the cheap row lost 0.5 nats and saved 0.24 of a step; it wins once the price exceeds 0.5 / 0.24
    for price, cheap_wins in ((2.0, False), (2.2, True)):
        adv = group_advantages(discounted_returns(priced_rewards(rewards, cost, price), 0.0), 2, whiten=False)
        assert (adv[1, 0] > adv[0, 0]) == cheap_wins, price
        assert adv[0, 1] == adv[1, 1] == 0.0
    with pytest.raises(ValueError, match="price"):
        priced_rewards(rewards, cost, -1.0)
    with pytest.raises(ValueError, match="cost_price"):
        SolGRPOConfig(output_dir="/tmp/x", cost_price=float("nan"), per_device_train_batch_size=16)
