"""The best static baseline and the budget sweep, on a tiny model: schedules checked against
brute force and against the base model."""

import math
import os
import sys

import pytest
import torch

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.episodes import run_episodes
from sol_hf.evaluation import StaticMixtureController, evaluate_sweep, plot_evaluation, search_best_static, sweep_markdown
from sol_hf.evaluation.sweep import _run_group
from sol_hf.budget import parse_compute_budget

sys.path.insert(0, os.path.dirname(__file__))
from _tiny import VOCAB, tiny_model  # noqa: E402

CONTEXT, STEPS = 24, 8
CONFIG = SolConfig(page_size=4, sink_tokens=2, recent_tokens=4, policy_hidden_size=16, policy_heads=2,
                   action_embedding_size=8)


@pytest.fixture(scope="module")
def model():
    return SolForCausalLM(tiny_model("llama", intermediate_size=768), CONFIG)


def _windows(n, seed):
    return torch.randint(3, VOCAB, (n, CONTEXT + STEPS + 1), generator=torch.Generator().manual_seed(seed))


def test_static_mixture_plays_two_actions_at_the_target_and_one_alone(model):
    space = model.space
    low, high = space.index_of(1.0, 0.3, 16), space.index_of(1.0, 1.0, 16)
    windows = _windows(2, 0)
    costs = model.cost_model.cost_table(torch.tensor([CONTEXT + 1]), False)[0]
    target = float(costs[low] + costs[high]) / 2
    run = run_episodes(model, windows, CONTEXT, StaticMixtureController(space, low, high), parse_compute_budget(target, 2))
    assert set(run.actions.unique().tolist()) == {low, high}
    assert float(run.step_cost.mean()) == pytest.approx(target, rel=0.02)
    alone = run_episodes(model, windows, CONTEXT, StaticMixtureController(space, low, low), parse_compute_budget(0.9, 2))
    assert (alone.actions == low).all()
    with pytest.raises(ValueError, match="outside"):
        StaticMixtureController(space, low, space.num_actions)


def test_best_static_is_the_best_candidate_by_brute_force(model):
    validation = _windows(4, 1)
    budget = 0.7
    found = search_best_static(model, validation, CONTEXT, [budget], top_pairs=None)[budget]
    space = model.space
    # every action alone, scored again: the frontier the search used
    singles = [StaticMixtureController(space, a, a) for a in range(space.num_actions)]
    nll, cost = _run_group(model, validation, CONTEXT, singles, 1.0, batch_size=4, max_rows=64)
    mean_nll, mean_cost = nll.mean(-1), cost.mean(-1)
    # attention runs dense at this length on CPU: the four attention levels of an activation keep
    # score identically, and only the densest of each such group is a distinct schedule
    distinct = [a for a in range(space.num_actions)
                if not any(o > a and mean_cost[o] == mean_cost[a] and mean_nll[o] == mean_nll[a] for o in range(space.num_actions))]
    assert len(distinct) == len(space.activation_keep)
    frontier = [a for a in distinct if not any(mean_cost[o] <= mean_cost[a] and mean_nll[o] < mean_nll[a] for o in distinct)]
    for side in ([a for a in distinct if mean_cost[a] >= budget], [a for a in distinct if mean_cost[a] <= budget]):
        frontier.append(min(side, key=lambda a: float(mean_nll[a])))  # the best on each side of the budget
    frontier = sorted(set(frontier))
    assert found.low in frontier and found.high in frontier
    pairs = [(lo, hi) for lo in frontier for hi in frontier if mean_cost[lo] <= budget <= mean_cost[hi] and mean_cost[lo] < mean_cost[hi]]
    pairs += [(a, a) for a in frontier if abs(float(mean_cost[a]) / budget - 1) <= 0.02]
    assert len(pairs) >= 2 and found.candidates == len(pairs)
    members = [StaticMixtureController(space, lo, hi) for lo, hi in pairs]
    p_nll, p_cost = _run_group(model, validation, CONTEXT, members, budget, batch_size=4, max_rows=64)
    ok = [i for i in range(len(pairs)) if abs(float(p_cost[i].mean()) / budget - 1) <= 0.02]
    best = min(math.exp(float(p_nll[i].mean())) for i in ok)
    assert found.validation_ppl == pytest.approx(best, rel=1e-9)
    assert abs(found.validation_cost / budget - 1) <= 0.02
    # scoring only the pair with the lowest interpolated NLL: one candidate, among those above
    pruned = search_best_static(model, validation, CONTEXT, [budget], top_pairs=1)[budget]
    assert pruned.candidates == 1 and (pruned.low, pruned.high) in pairs
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        search_best_static(model, validation, CONTEXT, [1.5])


@pytest.mark.parametrize("with_policy", [False, True])
def test_sweep_scores_every_schedule_at_its_target(model, with_policy, tmp_path):
    validation, held_out = _windows(4, 2), _windows(4, 3)
    budgets = [0.6, 0.8]
    static = search_best_static(model, validation, CONTEXT, budgets)
    result = evaluate_sweep(model, held_out, CONTEXT, static, policy=with_policy, random_seeds=2, resamples=200)
    data = result.data
    # dense: the base model's own perplexity of the same tokens, computed here independently
    with torch.no_grad():
        logits = model.base_model(held_out[:, :-1]).logits[:, CONTEXT:]
    lp = torch.log_softmax(logits.double(), -1).gather(-1, held_out[:, CONTEXT + 1 :].unsqueeze(-1)).squeeze(-1)
    assert data["dense"]["ppl"] == pytest.approx(math.exp(float(-lp.mean())), rel=1e-4)
    for entry in data["budgets"]:
        rows = entry["schedules"]
        expected = {"uniform", "best_static", "surprise", "random"} | ({"policy", "policy_shuffled"} if with_policy else set())
        assert set(rows) == expected
        for name in ("uniform", "best_static", "surprise", "random"):
            # on target within what mixing two actions over STEPS steps allows (costs 0.33 to 1.0 here)
            assert abs(rows[name]["cost"] - entry["budget"]) <= 0.67 / STEPS, (entry["budget"], name, rows[name]["cost"])
            assert rows[name]["within_tolerance"] == (abs(rows[name]["cost"] / entry["budget"] - 1) <= 0.02)
        comparison = entry["comparisons"]["best_static_vs_uniform"]
        assert comparison["ppl_difference"] == pytest.approx(rows["uniform"]["ppl"] - rows["best_static"]["ppl"])
    table = sweep_markdown(data)
    assert "best_static" in table and "Best static schedules" in table
    figure = plot_evaluation(data, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 0
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert "best static (searched on validation)" in labels and ("policy" in labels) == with_policy
    assert figure.axes[0].get_xlabel().startswith("achieved cost")


def test_a_policy_is_scored_against_an_earlier_baseline_sweep(model):
    """baselines= reuses the non-learned rows of a policy-free sweep on the same windows and runs only
    the policy: same numbers as a full sweep for every schedule, and other windows are refused."""
    from sol_hf.evaluation.sweep import best_static_from

    validation, held_out = _windows(4, 2), _windows(4, 3)
    static = search_best_static(model, validation, CONTEXT, [0.6, 0.8])
    earlier = evaluate_sweep(model, held_out, CONTEXT, static, policy=False, random_seeds=2, resamples=200).data
    assert best_static_from(earlier) == static
    full = evaluate_sweep(model, held_out, CONTEXT, static, policy=True, random_seeds=2, resamples=200).data
    reused = evaluate_sweep(model, held_out, CONTEXT, best_static_from(earlier), baselines=earlier, resamples=200).data
    for a, b in zip(full["budgets"], reused["budgets"]):
        assert set(a["schedules"]) == set(b["schedules"])
        for name in a["schedules"]:
            assert b["schedules"][name]["ppl"] == pytest.approx(a["schedules"][name]["ppl"], rel=1e-9), name
        assert b["comparisons"]["policy_vs_best_static"]["ppl_difference"] == pytest.approx(
            a["comparisons"]["policy_vs_best_static"]["ppl_difference"], rel=1e-9)
    with pytest.raises(ValueError, match="other windows"):
        evaluate_sweep(model, _windows(4, 9), CONTEXT, static, baselines=earlier, resamples=200)
    with pytest.raises(ValueError, match="budgets"):
        evaluate_sweep(model, held_out, CONTEXT, {0.6: static[0.6]}, baselines=earlier, resamples=200)
