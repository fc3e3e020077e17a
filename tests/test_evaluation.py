"""sol_hf.evaluation: leak-free prefill, no state between batches, matched baselines, statistics."""

import copy
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.budget import BudgetTargets, parse_compute_budget
from sol_hf.episodes import run_episodes
from sol_hf.evaluation import (
    GroupedController,
    bootstrap_indices,
    evaluate_perplexity,
    gap_closed,
    paired_comparison,
    perplexity,
    perplexity_interval,
)
from sol_hf.policy import RandomController, UniformController

CONTEXT = 24
STEPS = 6
VOCAB = 256


def tiny_base(seed: int = 0) -> LlamaForCausalLM:
    """4 layers, so the policy's own bytes stay a small part of a step (~10 %)."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # sharper logits: perplexities move with the actions
    return model


def sol_config() -> SolConfig:
    return SolConfig.from_preset("paper", page_size=4, sink_tokens=4, recent_tokens=4, policy_hidden_size=16, policy_heads=2, action_embedding_size=8)


@pytest.fixture(scope="module")
def pair():
    """(wrapped model, untouched copy of its base). The copy is frozen as SOL freezes the base:
    torch picks a different linear kernel for the (B, 1, H) slice ``logits_to_keep=1`` makes when
    the weight requires grad (2e-7 apart), which is not what these tests are about."""
    base = tiny_base()
    reference = copy.deepcopy(base).requires_grad_(False)
    return SolForCausalLM(base, sol_config()), reference


def windows(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, CONTEXT + STEPS + 1), generator=torch.Generator().manual_seed(seed))


def schedules(entry: dict) -> dict:
    """schedule name -> row, for every per-window row of one budget entry."""
    out = {k: entry[k] for k in ("policy", "uniform", "uniform_per_axis", "random_best") if k in entry}
    return out


# ------------------------------------------------------------------------------------------------
# Leak-freedom
# ------------------------------------------------------------------------------------------------


def test_every_prefill_is_the_base_model_bit_for_bit(pair):
    """The paper's evaluator sparsified 990/1020 "dense" prefills with the previous batch's budgets.
    Here every prefill the evaluation runs (4 per batch, 2 batches, after controlled episodes on the
    same model) gives logits and a KV cache bit-identical to an untouched copy of the base model."""
    model, reference = pair
    w = windows(4)
    prefills = []

    def capture(module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == CONTEXT:
            cache = output.past_key_values
            kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            prefills.append((ids.clone(), kwargs.get("logits_to_keep", 0), output.logits.clone(), kv))

    handle = model.base_model.register_forward_hook(capture, with_kwargs=True)
    try:
        result = evaluate_perplexity(model, w, CONTEXT, [0.8, {"attention": 0.25}], random_seeds=2, batch_size=2,
                                     resamples=10)
    finally:
        handle.remove()
    # the controlled steps really were sparse, so a leak would have something to leak
    assert result["budgets"][0]["policy"]["attention_keep"] < 1.0
    assert result["budgets"][1]["uniform_per_axis"]["attention_keep"] < 0.5
    assert len(prefills) == 2 * 2 * 2  # batches x budgets x (policy run, baseline run)
    with torch.no_grad():
        for ids, keep, logits, kv in prefills:
            expected = reference(input_ids=ids, use_cache=True, logits_to_keep=keep)
            assert torch.equal(logits, expected.logits)  # the logits the prefill returned ...
            for (k, v), layer in zip(kv, expected.past_key_values.layers, strict=True):  # ... and the KV it cached
                assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
        # and a plain forward after the evaluation is still the base model
        assert torch.equal(model(w[:, :CONTEXT]).logits, reference(input_ids=w[:, :CONTEXT]).logits)
    assert model._runtime.step is None and model._runtime.session is None


def test_the_prefill_check_detects_a_sparsified_prefill(pair):
    """Negative control: a prefill run under sparse actions (what the paper's leak did) changes the
    logits, so the bit-for-bit check above would catch it; a dense call right after is exact again."""
    model, reference = pair
    ids = windows(2)[:, :CONTEXT]
    sparse = model.space.index_of(0.1, 0.4, 8)
    with torch.no_grad():
        leaked = model(ids, actions=torch.full(ids.shape, sparse)).logits
        assert not torch.equal(leaked, reference(input_ids=ids).logits)
        assert torch.equal(model(ids).logits, reference(input_ids=ids).logits)


def test_no_state_reaches_the_next_batch_or_call(pair):
    """Windows scored after other batches (and after a whole evaluation at another budget) get
    exactly the numbers they get when scored first, for every schedule."""
    model, _ = pair
    w = windows(6, seed=2)
    evaluate_perplexity(model, windows(4, seed=3), CONTEXT, [{"attention": 0.1, "activation": 0.4}], random_seeds=2, batch_size=2)
    after = evaluate_perplexity(model, w, CONTEXT, [0.85], random_seeds=2, batch_size=2, resamples=10)
    alone = evaluate_perplexity(model, w[4:], CONTEXT, [0.85], random_seeds=2, batch_size=2, resamples=10)
    assert alone["dense"]["window_nll"] == after["dense"]["window_nll"][4:]
    for name, row in schedules(alone["budgets"][0]).items():
        if name == "random_best":  # the best seed is picked over the windows evaluated: 2 here, 6 there
            continue
        assert row["window_nll"] == after["budgets"][0][name]["window_nll"][4:], name
    for a, b in zip(alone["budgets"][0]["random_mean"]["seeds"], after["budgets"][0]["random_mean"]["seeds"]):
        assert a["seed"] == b["seed"]


# ------------------------------------------------------------------------------------------------
# What the rows mean
# ------------------------------------------------------------------------------------------------


def test_dense_row_is_the_base_models_teacher_forced_perplexity(pair):
    model, reference = pair
    w = windows(4)
    result = evaluate_perplexity(model, w, CONTEXT, [0.85], random_seeds=1, batch_size=3, per_axis=False, resamples=10)
    with torch.no_grad():
        logits = reference(input_ids=w).logits[:, CONTEXT : CONTEXT + STEPS]
    lp = torch.log_softmax(logits.double(), -1).gather(-1, w[:, CONTEXT + 1 :].unsqueeze(-1)).squeeze(-1)
    expected = math.exp(float(-lp.mean()))
    dense = result["dense"]
    assert dense["ppl"] == pytest.approx(expected, rel=1e-5)
    assert (dense["cost"], dense["attention_keep"], dense["activation_keep"], dense["bits"]) == (1.0, 1.0, 1.0, 16.0)
    assert dense["ppl_ci"][0] <= dense["ppl"] <= dense["ppl_ci"][1]


def test_baselines_are_matched_to_the_policys_achieved_budget(pair):
    model, _ = pair
    result = evaluate_perplexity(model, windows(4), CONTEXT, [0.85], random_seeds=3, batch_size=4, resamples=10)
    entry = result["budgets"][0]
    policy = entry["policy"]
    assert policy["budget"]["target"] == {"cost": 0.85}
    assert entry["uniform"]["cost"] == pytest.approx(policy["cost"], abs=0.03)
    for seed in entry["random_mean"]["seeds"]:
        assert seed["cost"] == pytest.approx(policy["cost"], abs=0.03)
    # per-axis matching: each axis lands on the policy's value, up to the grid's granularity
    per_axis = entry["uniform_per_axis"]
    for axis, tol in (("attention_keep", 0.1), ("activation_keep", 0.1), ("bits", 2.0)):
        assert per_axis[axis] == pytest.approx(policy[axis], abs=tol), axis
    # best-of-N is the seed with the lowest perplexity; the mean is over the N seeds
    ppls = [s["ppl"] for s in entry["random_mean"]["seeds"]]
    assert entry["random_best"]["ppl"] == min(ppls)
    assert entry["random_mean"]["ppl"] == pytest.approx(sum(ppls) / 3)
    assert entry["random_best"]["seed"] == entry["random_mean"]["seeds"][ppls.index(min(ppls))]["seed"]
    assert set(entry["comparisons"]) == {"policy_vs_uniform", "policy_vs_uniform_per_axis", "policy_vs_random_best"}


def test_grouped_members_schedule_exactly_as_alone(pair):
    """A member of the shared baseline batch picks the actions it would pick in a batch of its own."""
    model, _ = pair
    w = windows(3)
    targets = parse_compute_budget(0.8, 3)
    cost_only = torch.tensor([True, False, False, False])
    all_set = BudgetTargets(targets.values.clone(), torch.ones_like(targets.is_set))
    all_set.values[:, 1:] = torch.tensor([0.5, 0.6, 0.75])
    grouped = GroupedController(model.space, [(UniformController(model.space), cost_only),
                                              (RandomController(model.space, seed=5), cost_only)])
    together = run_episodes(model, w, CONTEXT, grouped, all_set, repeats=2)
    for g, ctrl in enumerate([UniformController(model.space), RandomController(model.space, seed=5)]):
        alone = run_episodes(model, w, CONTEXT, ctrl, targets)
        assert torch.equal(together.actions[g::2], alone.actions)
        torch.testing.assert_close(together.token_log_probs[g::2], alone.token_log_probs, rtol=1e-4, atol=1e-4)


def test_outputs_json_and_markdown(pair, tmp_path):
    model, _ = pair
    result = evaluate_perplexity(model, windows(2), CONTEXT, [0.9, {"attention": 0.5, "bits": 8}], random_seeds=2, batch_size=2,
                                 resamples=20, metadata={"note": "x"})
    path = tmp_path / "r.json"
    result.to_json(str(path))
    data = json.loads(path.read_text())
    assert data["protocol"]["scored_tokens_per_schedule"] == 2 * STEPS
    assert data["budgets"][1]["policy"]["budget"]["target"] == {"attention": 0.5, "bits": 8.0}
    assert data["metadata"] == {"note": "x"}
    md = result.to_markdown()
    assert md.count("| 0.9 |") == 5 and md.count("| attention=0.5,bits=8 |") == 5
    assert "| - | dense |" in md and "gap the policy closes" in md


def test_bad_arguments():
    model = SolForCausalLM(tiny_base(), sol_config())
    with pytest.raises(ValueError, match="compute_budget"):
        evaluate_perplexity(model, windows(2), CONTEXT, [1.5])
    with pytest.raises(ValueError, match="no controlled step"):
        evaluate_perplexity(model, windows(2)[:, : CONTEXT + 1], CONTEXT, [0.9])
    with pytest.raises(ValueError, match="random_seeds"):
        evaluate_perplexity(model, windows(2), CONTEXT, [0.9], random_seeds=0)


# ------------------------------------------------------------------------------------------------
# Statistics (worked by hand)
# ------------------------------------------------------------------------------------------------


def test_statistics_by_hand():
    nll = torch.tensor([1.0, 2.0, 3.0])
    assert perplexity(nll) == pytest.approx(math.exp(2.0))
    idx = bootstrap_indices(3, 500, seed=0)
    low, high = perplexity_interval(nll, idx)
    assert math.exp(1.0) <= low <= math.exp(2.0) <= high <= math.exp(3.0)
    # a candidate better on every window wins every resample
    cmp = paired_comparison(nll - 0.1, nll, idx)
    assert cmp["p_candidate_better"] == 1.0
    assert cmp["ppl_difference"] == pytest.approx(math.exp(2.0) - math.exp(1.9))
    assert cmp["ppl_difference_ci"][0] > 0
    # gap closed: uniform 12, dense 10, policy 11 -> half the gap
    assert gap_closed(11.0, 12.0, 10.0) == pytest.approx(0.5)
    assert gap_closed(12.5, 12.0, 10.0) == pytest.approx(-0.25)
    assert gap_closed(11.0, 10.0, 10.0) is None
    assert gap_closed(13.3, 12.554 + 1e-9, 12.554) is None  # a baseline that ran dense, up to float rounding


def test_schedule_controller_replays_a_schedule_exactly(pair):
    from sol_hf.policy import ScheduleController

    model, _ = pair
    w = windows(3, seed=5)
    targets = parse_compute_budget(0.9, 3)
    played = run_episodes(model, w, CONTEXT, RandomController(model.space, seed=3), targets)
    replayed = run_episodes(model, w, CONTEXT, ScheduleController(model.space, played.actions), targets)
    assert torch.equal(replayed.actions, played.actions)
    assert torch.allclose(replayed.token_log_probs, played.token_log_probs, atol=1e-6)
    assert torch.allclose(replayed.step_cost, played.step_cost)
    with pytest.raises(ValueError, match="does not cover"):
        run_episodes(model, w[:2], CONTEXT, ScheduleController(model.space, played.actions), targets)
    with pytest.raises(ValueError, match="outside"):
        ScheduleController(model.space, played.actions + model.space.num_actions)
    with pytest.raises(ValueError, match="int64"):
        ScheduleController(model.space, played.actions.float())


def test_sampled_policy_evaluation_is_reproducible_and_differs_from_greedy(pair):
    model, _ = pair
    saved = {k: v.clone() for k, v in model.policy.state_dict().items()}
    try:
        with torch.no_grad():  # a decisive random policy: sampling and argmax then disagree on some steps
            for p in model.policy.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        w = windows(4, seed=9)
        kwargs = dict(random_seeds=1, batch_size=2, resamples=10, per_axis=False)
        greedy = evaluate_perplexity(model, w, CONTEXT, [0.9], **kwargs)["budgets"][0]["policy"]
        first = evaluate_perplexity(model, w, CONTEXT, [0.9], policy_temperature=1.3, **kwargs)
        again = evaluate_perplexity(model, w, CONTEXT, [0.9], policy_temperature=1.3, **kwargs)
        sampled = first["budgets"][0]["policy"]
        assert sampled["ppl"] == again["budgets"][0]["policy"]["ppl"]
        assert (sampled["ppl"], sampled["cost"]) != (greedy["ppl"], greedy["cost"])
        assert "temperature 1.3" in first["protocol"]["policy"]
        with pytest.raises(ValueError, match="policy_temperature"):
            evaluate_perplexity(model, w, CONTEXT, [0.9], policy_temperature=-1.0, **kwargs)
    finally:
        model.policy.load_state_dict(saved)


def test_progress_moves_once_per_controlled_step(pair, monkeypatch):
    """The bar counts controlled steps (policy run + baselines run per batch and budget), so it
    moves during a batch instead of once per batch."""
    import tqdm.auto

    model, _ = pair
    updates, totals = [], []

    class Bar:
        def __init__(self, total, **kwargs):
            totals.append(total)

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    w = windows(3, seed=4)
    evaluate_perplexity(model, w, CONTEXT, [0.85, 0.9], random_seeds=1, batch_size=2, resamples=10, progress=True)
    steps = w.shape[1] - CONTEXT - 1
    expected = 2 * 2 * 2 * steps  # 2 batches x 2 budgets x (policy, baselines) x steps
    assert totals == [expected] and sum(updates) == expected
