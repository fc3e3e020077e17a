"""The supervised warm start on a tiny model: sensitivities against brute force, the oracle
schedule by hand, and imitation that learns while the base stays bit-identical."""

import copy
import math
import os
import sys

import pytest
import torch

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.budget import parse_compute_budget
from sol_hf.episodes import run_episodes
from sol_hf.evaluation.sweep import StaticSchedule
from sol_hf.policy import ScheduleController
from sol_hf.training.warm_start import (
    ScheduledPolicyController,
    imitation_loss,
    low_share,
    oracle_batch,
    oracle_schedule,
    step_sensitivities,
    warm_start_policy,
)

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import VOCAB, tiny_model  # noqa: E402

CONTEXT, STEPS = 24, 8
CONFIG = SolConfig(page_size=4, sink_tokens=2, recent_tokens=4, policy_hidden_size=16, policy_heads=2,
                   action_embedding_size=8)


def _sol(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return SolForCausalLM(tiny_model("llama", intermediate_size=768).to(dtype), CONFIG)


@pytest.fixture(scope="module")
def model():
    return _sol()


def _windows(n, seed):
    return torch.randint(3, VOCAB, (n, CONTEXT + STEPS + 1), generator=torch.Generator().manual_seed(seed))


def _pair(space, low=(1.0, 0.3, 16), high=(1.0, 1.0, 16)):
    return StaticSchedule(space.index_of(*low), space.index_of(*high), math.nan, math.nan, 1)


def _costs(model):
    """(N,) cost of each action with the policy, averaged over the T steps' lengths."""
    lengths = torch.arange(CONTEXT + 1, CONTEXT + STEPS + 1)
    return model.cost_model.cost_table(lengths, True).double().mean(0)


def test_sensitivities_equal_a_brute_force_loop():
    model = _sol(torch.float64)  # float64 base: the batched and the one-schedule runs agree to the bit
    space = model.space
    windows = _windows(3, 0)
    low = torch.tensor([space.index_of(1.0, 0.3, 16), space.index_of(1.0, 0.5, 16), space.index_of(1.0, 0.3, 16)])
    high = torch.tensor([space.dense_index, space.dense_index, space.index_of(1.0, 0.7, 16)])
    got = step_sensitivities(model, windows, CONTEXT, low, high)
    assert got.shape == (3, STEPS) and got.dtype == torch.float64
    budget = parse_compute_budget(1.0, 3)
    reference = run_episodes(model, windows, CONTEXT, ScheduleController(space, high.view(-1, 1).repeat(1, STEPS)), budget)
    reference_nll = (-reference.token_log_probs.double()).sum(-1)
    for t in range(STEPS):
        schedule = high.view(-1, 1).repeat(1, STEPS)
        schedule[:, t] = low
        probed = run_episodes(model, windows, CONTEXT, ScheduleController(space, schedule), budget)
        assert torch.equal(got[:, t], (-probed.token_log_probs.double()).sum(-1) - reference_nll), t
    assert (got.abs() > 1e-3).float().mean() > 0.5  # the probe changes the text's NLL: not a vacuous comparison
    # a window whose two actions are the same has no sensitivity at all
    same = step_sensitivities(model, windows[:1], CONTEXT, high[:1], high[:1])
    assert torch.equal(same, torch.zeros(1, STEPS, dtype=torch.float64))


def test_oracle_schedule_by_hand():
    sensitivity = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 5.0, -1.0], [1.0, 2.0, 3.0, 4.0]])
    low, high = torch.tensor([7, 7, 2]), torch.tensor([9, 9, 5])
    got = oracle_schedule(sensitivity, low, high, torch.tensor([2, 3, 0]))
    assert got.tolist() == [[9, 7, 9, 7], [7, 7, 9, 7], [5, 5, 5, 5]]
    ties = oracle_schedule(torch.zeros(1, 4), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    assert ties.tolist() == [[1, 1, 0, 0]]  # equal sensitivities: the earlier steps


def test_low_share_meets_the_budget_by_hand(model):
    pair = _pair(model.space)
    costs = _costs(model)
    c_low, c_high = float(costs[pair.low]), float(costs[pair.high])
    assert c_low < c_high - 0.1
    budget = 0.25 * c_low + 0.75 * c_high
    assert low_share(model, CONTEXT, STEPS, pair.low, pair.high, budget) == pytest.approx(0.25, abs=1e-9)
    assert low_share(model, CONTEXT, STEPS, pair.low, pair.high, c_high + 0.01) == 0.0
    assert low_share(model, CONTEXT, STEPS, pair.low, pair.high, c_low - 0.01) == 1.0
    assert low_share(model, CONTEXT, STEPS, pair.high, pair.high, budget) == 0.0


def test_oracle_batch_places_low_on_the_least_sensitive_steps(model):
    space = model.space
    costs = _costs(model)
    a, b = _pair(space), _pair(space, low=(1.0, 0.5, 16), high=(1.0, 0.7, 16))
    budget_a = round(0.5 * float(costs[a.low] + costs[a.high]), 4)
    budget_b = round(0.6 * float(costs[b.low]) + 0.4 * float(costs[b.high]), 4)
    best = {budget_a: a, budget_b: b}
    windows = _windows(3, 1)
    budgets = torch.tensor([budget_a, budget_b, budget_a], dtype=torch.float64)
    batch = oracle_batch(model, windows, CONTEXT, best, budgets)
    pairs = [a, b, a]
    assert batch.low.tolist() == [p.low for p in pairs] and batch.high.tolist() == [p.high for p in pairs]
    assert torch.equal(batch.sensitivity, step_sensitivities(model, windows, CONTEXT, batch.low, batch.high))
    for row, (pair, budget) in enumerate(zip(pairs, budgets.tolist())):
        share = (float(costs[pair.high]) - budget) / float(costs[pair.high] - costs[pair.low])
        is_low = batch.actions[row] == pair.low
        assert int(is_low.sum()) == round(share * STEPS) and int(is_low.sum()) in (3, 4, 5)
        assert (is_low | (batch.actions[row] == pair.high)).all()
        assert batch.sensitivity[row][is_low].max() <= batch.sensitivity[row][~is_low].min()
        # the oracle schedule was played (policy overhead included) and meets the budget up to rounding
        assert float(batch.cost[row]) == pytest.approx(budget, abs=0.5 / STEPS * float(costs[pair.high] - costs[pair.low]) + 0.01)
    # the policy observed the oracle's schedule (teacher forcing of the actions) at each row's budget
    obs = batch.observations
    assert obs.hidden.shape[:2] == (3, STEPS)
    assert torch.equal(obs.previous_action[:, 1:], batch.actions[:, :-1])
    assert (obs.previous_action[:, 0] == space.num_actions).all()
    assert torch.allclose(obs.features[:, 0, 1].double(), budgets.float().double())
    with pytest.raises(ValueError, match="not keys of best_static"):
        oracle_batch(model, windows, CONTEXT, best, torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))


def test_scheduled_policy_controller_plays_the_schedule_and_records_the_policy(model):
    schedule = torch.tensor([[0, 5, 15, 3, 3, 0, 1, 2]] * 2)
    windows = _windows(2, 2)
    run = run_episodes(model, windows, CONTEXT, ScheduledPolicyController(model.policy, schedule), parse_compute_budget(0.8, 2))
    assert torch.equal(run.actions.cpu(), schedule)
    # the recorded observations give the same log-probabilities in one parallel pass as step by step
    with torch.no_grad():
        parallel = model.policy(run.observations).gather(-1, schedule.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(parallel, run.behaviour_log_probs, atol=1e-5)


def test_imitation_learns_a_fixed_batch_and_changes_only_the_policy():
    model = _sol()
    base_before = copy.deepcopy(model.base_model.state_dict())
    policy_before = copy.deepcopy(model.policy.state_dict())
    costs = _costs(model)
    pair = _pair(model.space)
    budget = round(0.5 * float(costs[pair.low] + costs[pair.high]), 4)
    best = {budget: pair}
    windows = _windows(2, 3)  # a fixed batch: every update draws both windows
    batch = oracle_batch(model, windows, CONTEXT, best, torch.full((2,), budget, dtype=torch.float64))
    with torch.no_grad():
        loss_before, accuracy_before = imitation_loss(model.policy, batch)
    # an untrained policy is near uniform: its NLL of an oracle action is about log N
    assert float(loss_before) == pytest.approx(math.log(model.space.num_actions), abs=0.1)
    log = warm_start_policy(model, windows, CONTEXT, best, updates=20, batch_size=2, learning_rate=1e-2, seed=0)
    updates = log["updates"]
    assert len(updates) == 20 and log["budgets"] == [budget]
    assert updates[0]["loss"] == pytest.approx(float(loss_before), rel=1e-5)  # logged before the step
    assert updates[0]["accuracy"] == pytest.approx(float(accuracy_before))
    assert updates[-1]["loss"] < 0.5 * updates[0]["loss"]
    assert updates[0]["sensitivity_spread"] == pytest.approx(float(batch.sensitivity.std(dim=1).mean()), rel=1e-9)
    assert updates[0]["low_share"] == pytest.approx(float((batch.actions == pair.low).double().mean()))
    again = oracle_batch(model, windows, CONTEXT, best, torch.full((2,), budget, dtype=torch.float64))
    assert torch.equal(again.actions, batch.actions)  # the oracle does not depend on the policy
    with torch.no_grad():
        loss_after, accuracy_after = imitation_loss(model.policy, again)
    assert float(loss_after) < float(loss_before)
    assert float(accuracy_after) > float(accuracy_before) and float(accuracy_after) >= 0.75
    assert all(torch.equal(v, base_before[k]) for k, v in model.base_model.state_dict().items())
    after = model.policy.state_dict()
    assert any(not torch.equal(after[k], policy_before[k]) for k in after)


def test_bad_inputs_are_refused(model):
    pair = _pair(model.space)
    windows = _windows(2, 4)
    with pytest.raises(ValueError, match="empty"):
        warm_start_policy(model, windows, CONTEXT, {}, updates=1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        warm_start_policy(model, windows, CONTEXT, {1.5: pair}, updates=1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        warm_start_policy(model, windows, CONTEXT, {0.0: pair}, updates=1)
    with pytest.raises(ValueError, match="no controlled step"):
        warm_start_policy(model, windows[:, : CONTEXT + 1], CONTEXT, {0.8: pair}, updates=1)
    with pytest.raises(ValueError, match="updates"):
        warm_start_policy(model, windows, CONTEXT, {0.8: pair}, updates=0)


def test_train_policy_warm_starts_before_grpo(tmp_path):
    pytest.importorskip("trl")
    import json

    from safetensors.torch import load_file

    from sol_hf.training import train_policy
    from test_training import tiny_tokenizer

    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    rng = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (200,), generator=rng)) for _ in range(10)]
    common = dict(texts=texts, steps=1, context_length=CONTEXT, rollout_steps=STEPS, windows_per_step=2, num_generations=2,
                  grid={"attention_keep": (0.5, 1.0), "activation_keep": (0.5, 1.0), "bits": (8, 16)},
                  sol_config_overrides={"page_size": 4, "sink_tokens": 4, "recent_tokens": 4, "policy_hidden_size": 16,
                                        "policy_heads": 2}, progress=False, dataloader_pin_memory=False)
    train_policy(str(base_dir), str(tmp_path / "plain"), **common)
    train_policy(str(base_dir), str(tmp_path / "warm"), warm_start_updates=2, warm_start_budgets=[0.9],
                 warm_start_search_windows=4, **common)
    log = json.loads((tmp_path / "warm-run" / "training_log.json").read_text())
    assert "warm_start" not in json.loads((tmp_path / "plain-run" / "training_log.json").read_text())
    warm = log["warm_start"]
    assert len(warm["updates"]) == 2 and warm["budgets"] == [0.9] and list(warm["best_static"]) == ["0.9"]
    assert all(math.isfinite(u["loss"]) for u in warm["updates"])
    plain = load_file(str(tmp_path / "plain" / "policy.safetensors"))
    warmed = load_file(str(tmp_path / "warm" / "policy.safetensors"))
    assert any(not torch.equal(plain[k], warmed[k]) for k in plain)  # same seed: only the warm start differs
    with pytest.raises(ValueError, match="per_axis|unified cost"):
        train_policy(str(base_dir), str(tmp_path / "x"), warm_start_updates=1, **{**common, "budget_mode": "per_axis"})


def test_sol_hf_train_passes_warm_start_updates(monkeypatch, tmp_path):
    import sol_hf.cli as cli

    calls = []
    monkeypatch.setattr(cli, "_training_api", lambda: lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(cli, "read_texts", lambda sections, root: ["w3 w4"])
    argv = ["train", "--output-dir", str(tmp_path / "out"), "--no-progress", "--threads", "1"]
    assert cli.main([*argv, "--warm-start-updates", "3"]) == 0
    assert cli.main(argv) == 0
    assert calls[0]["warm_start_updates"] == 3
    assert "warm_start_updates" not in calls[1]  # off by default: the recipe's training, unchanged
    with pytest.raises(cli.CLIError, match="warm-start-updates"):
        cli.build_parser().parse_args([*argv, "--warm-start-updates", "-1"])
