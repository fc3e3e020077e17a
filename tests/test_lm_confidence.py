"""The policy's view of the base model's confidence, and training/inference seeing the same thing."""

import math

import pytest
import torch

from _tiny import tiny_model
from sol_hf import SolConfig, SolForCausalLM
from sol_hf.budget import parse_compute_budget
from sol_hf.episodes import run_episodes
from sol_hf.policy import PolicyController, PolicyObservation, lm_confidence_features

CONTEXT = 20
STEPS = 7


def test_confidence_features_by_hand():
    uniform = torch.zeros(1, 4)
    assert torch.allclose(lm_confidence_features(uniform, torch.tensor([2])), torch.tensor([[1.0, 0.25, 0.25]]))
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    entropy = -(probs * probs.log()).sum() / math.log(4)  # 0.875
    got = lm_confidence_features(probs.log() + 3.0, torch.tensor([1]))  # logits up to a constant
    assert torch.allclose(got, torch.tensor([[entropy, 0.25, 0.5]]), atol=1e-6)
    certain = torch.tensor([[0.0, -torch.inf, -torch.inf, -torch.inf]])  # a masked vocabulary stays finite
    assert torch.allclose(lm_confidence_features(certain, torch.tensor([0])), torch.tensor([[0.0, 1.0, 1.0]]))


def _confident_policy_model(model_type: str, seed: int = 0) -> SolForCausalLM:
    config = SolConfig.from_preset("paper", page_size=4, sink_tokens=4, recent_tokens=4, policy_hidden_size=16, policy_heads=2,
                       action_embedding_size=8, observe_lm_confidence=True)
    layers = {"gpt2": {"n_layer": 4}}.get(model_type, {"num_hidden_layers": 4})
    model = SolForCausalLM(tiny_model(model_type, seed=seed, intermediate_size=256, **layers), config)
    torch.manual_seed(seed)
    with torch.no_grad():  # a random but decisive policy, so the greedy actions vary from step to step
        for p in model.policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def test_policy_reads_the_confidence_features():
    model = _confident_policy_model("llama")
    policy = model.policy
    n = 5
    obs = PolicyObservation(torch.randn(n, 1, policy.lm_hidden_size), torch.randn(n, 1, policy.lm_hidden_size),
                            torch.rand(n, 1, 13), torch.full((n, 1), model.space.num_actions), torch.zeros(n, 1, 3))
    sure = policy(obs)
    obs.lm_confidence = torch.ones(n, 1, 3)
    assert not torch.allclose(policy(obs), sure)
    obs.lm_confidence = None
    with pytest.raises(ValueError, match="observe_lm_confidence"):
        policy(obs)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2"])
def test_generate_and_episodes_give_the_policy_the_same_observations(model_type):
    """A greedy policy run through HF generate and the teacher-forced episode runner on the tokens
    generate produced must take the same actions at the same costs: training sees what inference sees."""
    model = _confident_policy_model(model_type)
    context = torch.randint(3, 90, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    low, high = model.budget_range(CONTEXT + 1, "policy")
    assert low < 0.95, "the tiny model must leave room for a budget"
    budget = (low + min(high, 1.0)) / 2
    captured = []
    original = PolicyController.decide

    def spy(self, ctx):
        actions = original(self, ctx)
        captured.append(actions.clone())
        return actions

    PolicyController.decide = spy
    try:
        out = model.generate(context, max_new_tokens=STEPS + 1, do_sample=False, compute_budget=budget, controller="policy",
                             controller_kwargs={"budget_guard": 0.25})
    finally:
        PolicyController.decide = original
    assert out.shape[1] == CONTEXT + STEPS + 1
    generated_actions = torch.stack(captured, dim=1)
    assert generated_actions.shape == (2, STEPS)
    episodes = run_episodes(model, out, CONTEXT, PolicyController(model.policy, budget_guard=0.25),
                            parse_compute_budget(budget, 2))
    assert torch.equal(episodes.actions, generated_actions)
    assert len(set(generated_actions.flatten().tolist())) > 1, "the test policy should not be constant"
    # the confidence the episode recorded is the base model's view of each processed token
    assert episodes.observations.lm_confidence.shape == (2, STEPS, 3)
    assert torch.allclose(episodes.observations.lm_confidence.sum(-1) > 0, torch.ones(2, STEPS, dtype=torch.bool))
    report = model.last_compute_report
    assert torch.allclose(report.standalone_cost, episodes.step_cost.mean(1).float().cpu(), atol=1e-5)


def test_ranked_decisions_save_where_the_policy_prefers_the_cheaper_action_most():
    from sol_hf.budget import BudgetTargets
    from sol_hf.policy import DecisionContext, SolPolicy

    config = SolConfig(policy_hidden_size=16, policy_heads=2, action_embedding_size=8)
    controller = PolicyController(SolPolicy(config, 8), ranked=True)
    n = controller.space.num_actions
    cost = torch.full((1, n), 1.0)
    cost[0, :3] = torch.tensor([1.0, 0.9, 0.76])
    targets = BudgetTargets(torch.tensor([[0.85, 1.0, 1.0, 1.0]]), torch.tensor([[True, False, False, False]]))

    def step(log_probs_of_three, requirement):
        masked = torch.full((1, n), -torch.inf)
        masked[0, :3] = torch.tensor(log_probs_of_three).log()
        ctx = DecisionContext(torch.tensor([[requirement, 1.0, 1.0, 1.0]]), targets, cost, None, 0)
        return int(controller._ranked(ctx, masked))

    # most likely action 0 (cost 1.0); the most likely cheaper one is action 1
    assert step([0.7, 0.2, 0.1], 0.85) == 0  # no history yet: greedy
    assert step([0.6, 0.3, 0.1], 0.85) == 1  # log(0.3/0.6) above the usual log(0.2/0.7): save here
    assert step([0.8, 0.1, 0.1], 0.85) == 0  # below the usual preference: keep the best
    assert step([0.5, 0.4, 0.1], 1.05) == 0  # on budget (requirement above the best's cost): no saving
    with pytest.raises(ValueError, match="ranked"):
        PolicyController(controller.policy, do_sample=True, ranked=True)


def test_surprise_rule_saves_after_unsurprising_tokens_and_matches_in_generate():
    from sol_hf import SurpriseRuleController

    model = _confident_policy_model("llama")
    low, high = model.budget_range(CONTEXT + 1, "uniform")
    budget = (low + min(high, 1.0)) / 2
    rule = SurpriseRuleController(model.space, full=(1.0, 1.0, 16), cheap=(1.0, 0.4, 16))
    context = torch.randint(3, 90, (3, CONTEXT), generator=torch.Generator().manual_seed(4))
    out = model.generate(context, max_new_tokens=STEPS + 1, do_sample=False, compute_budget=budget, controller=rule)
    generated_cost = model.last_compute_report.standalone_cost
    episodes = run_episodes(model, out, CONTEXT, rule, parse_compute_budget(budget, 3))
    assert torch.allclose(episodes.step_cost.mean(1).float().cpu(), generated_cost, atol=1e-5)  # same decisions
    assert set(episodes.actions.unique().tolist()) <= {rule.full, rule.cheap}
    # by hand: replay the rule's arithmetic from the surprises it was shown and the costs it achieved
    seen = []
    original = SurpriseRuleController.decide

    def spy(self, ctx):
        seen.append(ctx.lm_confidence.clone())
        return original(self, ctx)

    SurpriseRuleController.decide = spy
    try:
        again = run_episodes(model, out, CONTEXT, rule, parse_compute_budget(budget, 3))
    finally:
        SurpriseRuleController.decide = original
    assert torch.equal(again.actions, episodes.actions)
    surprise = -torch.stack(seen, 1)[..., 1].double().log()  # (3, STEPS)
    with torch.no_grad():  # step 0 reads the dense prefill's prediction of the first controlled token
        prefill = torch.log_softmax(model.base_model(out[:, :CONTEXT]).logits[:, -1].double(), -1)
    assert torch.allclose(surprise[:, 0], -prefill.gather(-1, out[:, CONTEXT:CONTEXT + 1]).squeeze(-1), atol=1e-4)
    full_cost = model.cost_model.cost_table(torch.arange(CONTEXT + 1, CONTEXT + 1 + STEPS), False)[:, rule.full]
    cheap_cost = model.cost_model.cost_table(torch.arange(CONTEXT + 1, CONTEXT + 1 + STEPS), False)[:, rule.cheap]
    decided_cheap = 0
    for row in range(3):
        spent = 0.0
        for t in range(STEPS):
            requirement = budget * (t + 1) - spent
            easy = t > 0 and float(surprise[row, t]) <= float(surprise[row, :t].mean())
            expect_cheap = requirement < float(full_cost[t]) and (easy or requirement <= float(cheap_cost[t]))
            assert (int(episodes.actions[row, t]) == rule.cheap) == expect_cheap, (row, t)
            decided_cheap += expect_cheap
            spent += float(episodes.step_cost[row, t])
    assert 0 < decided_cheap < 3 * STEPS
    assert abs(float(generated_cost.mean()) - budget) < 0.05
    with pytest.raises(ValueError, match="unified compute_budget"):
        model.generate(context, max_new_tokens=3, compute_budget={"activation": 0.6}, controller=rule)
    with pytest.raises(ValueError, match="different actions"):
        SurpriseRuleController(model.space, full=(1.0, 0.4, 16), cheap=(1.0, 0.4, 16))


def test_the_surprise_rule_by_name_plays_dense_and_the_grids_cheapest_action():
    """``controller="surprise"`` in generate: the rule with its defaults, the dense action and the
    grid's lowest level on every axis, on any grid (the default one has no 0.4 keep); it meets a
    budget between the two actions' costs and reports itself by name."""
    from sol_hf import SolConfig, SolForCausalLM, SurpriseRuleController

    model = SolForCausalLM(tiny_model("llama", intermediate_size=768), SolConfig(page_size=4, sink_tokens=2, recent_tokens=4,
                                                                                   policy_hidden_size=64))
    rule = SurpriseRuleController(model.space)
    assert rule.full == model.space.dense_index
    assert rule.cheap == model.space.index_of(min(model.space.attention_keep), min(model.space.activation_keep), 16)
    context = torch.randint(3, 90, (2, CONTEXT), generator=torch.Generator().manual_seed(4))
    costs = model.cost_model.cost_table(torch.tensor([CONTEXT + 1]), False)[0]
    budget = float(costs[rule.cheap] + costs[rule.full]) / 2
    model.generate(context, max_new_tokens=25, do_sample=False, compute_budget=budget, controller="surprise")
    report = model.last_compute_report
    assert report.controller == "surprise"
    assert report.standalone_cost.sub(budget).abs().max() < 0.05
    assert 0.0 < float(report.activation_keep.min()) and float(report.activation_keep.max()) < 1.0  # both actions played
