"""The lm-evaluation-harness model ``sol`` (``sol_hf.evaluation.lm_eval``) on the local tasks in
``tests/lm_eval_task`` (ten sentence completions), against lm-eval's own ``hf`` model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.registry import get_model

import sol_hf.evaluation.lm_eval  # noqa: F401  (registers "sol")
from sol_hf.budget import parse_compute_budget
from sol_hf.episodes import run_episodes
from sol_hf.evaluation.lm_eval import SolModelArgsError
from sol_hf.policy import UniformController

TASKS = Path(__file__).parent / "lm_eval_task"
REPO = Path(__file__).parent.parent
LIMIT = 3  # documents per task: few controlled steps keep the tests short
# The first LIMIT contexts have the same token length, so each task's requests run as one batch
# (a step costs about the same for 1 or 9 rows: it reads the weights once).
BATCH = 3 * LIMIT


def _sol(args: str, **extra):
    return get_model("sol").create_from_arg_string(args, {"device": "cpu", "batch_size": BATCH, **extra})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("pretrained=x,compute_budget=0.6,temperature=0.5", "unknown model_args ['temperature']"),
        ("pretrained=x", "model_args needs compute_budget"),
        ("pretrained=x,compute_budget=0", "must lie in (0, 1]"),
        ("pretrained=x,compute_budget=1.5", "must lie in (0, 1]"),
        ("pretrained=x,compute_budget=nan", "must lie in (0, 1]"),
        ("pretrained=x,compute_budget=cheap", "compute_budget='cheap'"),
        ("pretrained=x,compute_budget=0.6,controller=policy", "controller=policy needs a trained policy"),
        ("pretrained=x,compute_budget=0.6,policy=,controller=policy", "controller=policy needs a trained policy"),
        ("pretrained=x,compute_budget=0.6,controller=greedy", "controller must be one of"),
        ("pretrained=x,compute_budget=0.6,controller_seed=3", "controller_seed is for controller=random"),
        ("pretrained=x,compute_budget=0.6,peft=some/adapter", "model_args peft"),
        ("pretrained=x,compute_budget=0.6,trust_remote_code=True", "never runs remote code"),
    ],
)
def test_bad_model_args_are_refused_before_loading(args, message):
    # pretrained=x does not exist: each error must come before any loading
    with pytest.raises(SolModelArgsError) as err:
        _sol(args)
    assert message in str(err.value)


def test_auto_batch_size_is_refused():
    with pytest.raises(SolModelArgsError, match="fixed batch size"):
        _sol("pretrained=x,compute_budget=0.6", batch_size="auto")


def test_sol_hf_lm_eval_cli_registers_the_model_and_importing_sol_hf_does_not_import_lm_eval():
    """``sol-hf lm-eval --model sol ...`` finds the model with nothing imported by the user; a bad
    budget is one line on stderr and exit code 2; ``import sol_hf`` leaves lm_eval unimported."""
    code = (
        "import functools, sys, sol_hf, sol_hf.evaluation, sol_hf.cli\n"
        "assert 'lm_eval' not in sys.modules, 'importing sol_hf imported lm_eval'\n"
        "import lm_eval.tasks\n"  # skip indexing lm-eval's thousands of tasks (20 s); ours come from --include_path
        "lm_eval.tasks.TaskManager.__init__ = functools.partialmethod(lm_eval.tasks.TaskManager.__init__, include_defaults=False)\n"
        "sol_hf.cli.main(sys.argv[1:])\n"
    )
    argv = ["lm-eval", "--model", "sol", "--model_args", "pretrained=x,compute_budget=1.5",
            "--tasks", "sol_tiny_mc", "--include_path", str(TASKS), "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "sol-hf: error: model_args compute_budget=1.5" in done.stderr
    assert "Unknown model" not in done.stderr


# -- the real model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)


def _evaluate(model, task_manager, tasks, model_args=None):
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, task_manager=task_manager, device="cpu", batch_size=BATCH,
        limit=LIMIT, log_samples=True, verbosity="WARNING", bootstrap_iters=0,
    )


def _responses(result, task):
    """doc_id -> the filtered responses: (log-likelihood, is_greedy) per choice, or the text."""
    return {s["doc_id"]: s["filtered_resps"] for s in result["samples"][task]}


def _continuation_tokens(lm):
    """Continuation tokens of the scored requests, counted with lm-eval's own request encoding."""
    docs = [json.loads(line) for line in (TASKS / "docs.jsonl").read_text().splitlines()][:LIMIT]
    mc = sum(len(lm._encode_pair(d["context"], " " + c)[1]) for d in docs for c in d["choices"])
    text = sum(len(lm.tok_encode(d["context"])) for d in docs)
    return mc, text


@pytest.mark.slow
def test_full_budget_log_likelihoods_equal_lm_evals_hf_model(smollm2_path, task_manager):
    """At compute_budget=1.0 every request's log-likelihood (loglikelihood and rolling), its
    is_greedy flag and the accuracy equal lm-eval's hf model on the same base."""
    tasks = ["sol_tiny_mc", "sol_tiny_text"]
    hf = _evaluate("hf", task_manager, tasks, f"pretrained={smollm2_path}")
    lm = _sol(f"pretrained={smollm2_path},compute_budget=1.0,controller=uniform")
    sol = _evaluate(lm, task_manager, tasks)
    for task in tasks:
        ours, theirs = _responses(sol, task), _responses(hf, task)
        assert sorted(ours) == sorted(theirs) == list(range(LIMIT))
        for doc in theirs:
            for a, b in zip(ours[doc], theirs[doc], strict=True):
                a, b = (a, b) if isinstance(a, (list, tuple)) else ((a,), (b,))
                assert a[0] == pytest.approx(b[0], abs=2e-4), (task, doc)
                assert a[1:] == b[1:], (task, doc)  # is_greedy (loglikelihood)
    assert sol["results"]["sol_tiny_mc"]["acc,none"] == hf["results"]["sol_tiny_mc"]["acc,none"]
    assert sol["results"]["sol_tiny_text"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["sol_tiny_text"]["word_perplexity,none"], rel=1e-4
    )
    report = sol["config"]["sol_compute"]
    assert report["compute_budget"] == 1.0 and report["controller"] == "dense (budget 1.0)"
    entry = report["loglikelihood"]
    assert entry["cost"] == 1.0 and entry["activation_keep"] == 1.0 and entry["bits"] == 16.0
    # the rolling documents start from lm-eval's prefix token: their first token is scored densely
    mc_tokens, text_tokens = _continuation_tokens(lm)
    assert entry["dense_scored_tokens"] == LIMIT
    assert entry["controlled_steps"] == mc_tokens + text_tokens - LIMIT
    assert entry["requests"] == 3 * LIMIT + LIMIT


@pytest.mark.slow
def test_budget_0_6_reports_achieved_cost_and_generates_through_sol_generate(smollm2_path, task_manager):
    """At 0.6 (uniform controller): the report's achieved executed cost of the log-likelihood
    steps is within 2 % of the target and counts every continuation token as a controlled step; a
    request's log-likelihood is the teacher-forced episode of sol_hf.episodes (context densely
    prefilled but for its last token); generations are SolForCausalLM.generate's at the budget."""
    lm = _sol(f"pretrained={smollm2_path},compute_budget=0.6,controller=uniform")
    result = _evaluate(lm, task_manager, ["sol_tiny_mc", "sol_tiny_gen"])
    report = result["config"]["sol_compute"]
    entry = report["loglikelihood"]
    mc_tokens, _ = _continuation_tokens(lm)
    assert entry["controlled_steps"] == mc_tokens and "dense_scored_tokens" not in entry
    # the uniform controller approaches the target from below within each request (its first step
    # takes the ladder rung at or under it), so short continuations land a little under 0.6
    assert 0.6 * 0.98 <= entry["cost"] <= 0.6, entry
    assert entry["within_tolerance"] and entry["target"] == {"cost": 0.6}
    assert entry["activation_keep"] < 1.0

    # one request by hand: window = context + continuation, all but the context's last token
    # prefilled densely, one controlled step per continuation token. (Run alone on both sides: below
    # budget 1.0 a score moves by tenths of a nat with the batch it runs in, as top-k channel
    # choices flip on float summation order.)
    from lm_eval.api.instance import Instance

    doc = json.loads((TASKS / "docs.jsonl").read_text().splitlines()[0])
    request = Instance("loglikelihood", doc, (doc["context"], " " + doc["choices"][0]), 0)
    (score, _), = lm.loglikelihood([request], disable_tqdm=True)
    context, continuation = lm._encode_pair(doc["context"], " " + doc["choices"][0])
    window = torch.tensor([context + continuation])
    run = run_episodes(lm.sol_model, window, len(context) - 1, UniformController(lm.sol_model.space),
                       parse_compute_budget(0.6, 1))
    assert run.token_log_probs.shape[1] == len(continuation)
    assert score == pytest.approx(float(run.token_log_probs.double().sum()), abs=1e-6)
    dense = lm.sol_model(input_ids=window).logits[0, len(context) - 1 : -1].log_softmax(-1)
    assert abs(score - float(dense.gather(-1, window[0, len(context):, None]).sum())) > 1e-2  # the budget acts

    # generations: SolForCausalLM.generate at the budget, on the same batch lm-eval built
    generated = _responses(result, "sol_tiny_gen")
    docs = [json.loads(line) for line in (TASKS / "docs.jsonl").read_text().splitlines()][:LIMIT]
    order = sorted(range(LIMIT), key=lambda i: (-len(lm.tok_encode(docs[i]["context"])), docs[i]["context"]))
    for start in range(0, LIMIT, BATCH):
        rows = order[start : start + BATCH]
        ids, mask = lm.tok_batch_encode([docs[i]["context"] for i in rows])
        out = lm.sol_model.generate(ids, attention_mask=mask, compute_budget=0.6, controller="uniform", max_new_tokens=6,
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        for row, i in enumerate(rows):
            text = lm.tok_decode(out[row, ids.shape[1]:].tolist()).split("\n")[0]
            assert generated[i][0] == text, i
    gen = report["generate_until"]
    assert gen["requests"] == LIMIT and gen["controlled_steps"] > 0
    assert gen["standalone_cost"] <= 0.6 * 1.02 and gen["cost"] >= gen["standalone_cost"] - 1e-9
    assert math.isfinite(gen["relative_error"]["cost"])


def test_policy_artifact_scores_each_request_as_its_policy_episode(tmp_path):
    """policy=ARTIFACT: the controller defaults to the policy, and a request's log-likelihood is
    the policy-controlled episode of its window (requests of different lengths in one call). A
    tiny random Llama with a word-level tokenizer keeps it fast."""
    from _tiny import tiny_model
    from lm_eval.api.instance import Instance
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from sol_hf import SolConfig, SolForCausalLM
    from sol_hf.policy import PolicyController

    context = "the cat saw a mouse run under the sofa , and it"
    endings = [" crouched low .", " crouched low and waited for the mouse to come out ."]
    words = sorted(set((context + " ".join(endings)).split()))
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    base_dir, policy_dir = tmp_path / "base", tmp_path / "policy"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>").save_pretrained(base_dir)
    tiny_model("llama", intermediate_size=512).save_pretrained(base_dir)
    # a policy small next to the tiny base, so that its own bytes leave budgets below 1.0 reachable
    config = SolConfig(policy_hidden_size=16, policy_heads=2, action_embedding_size=8, policy_max_steps=64)
    SolForCausalLM(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(policy_dir)

    lm = _sol(f"pretrained={base_dir},policy={policy_dir},compute_budget=0.6")
    assert lm.controller.name == "policy"
    scores = lm.loglikelihood([Instance("loglikelihood", {}, (context, e), i) for i, e in enumerate(endings)],
                              disable_tqdm=True)
    for ending, (score, _) in zip(endings, scores, strict=True):
        ctx, cont = lm._encode_pair(context, ending)
        run = run_episodes(lm.sol_model, torch.tensor([ctx + cont]), len(ctx) - 1,
                           PolicyController(lm.sol_model.policy), parse_compute_budget(0.6, 1))
        assert score == pytest.approx(float(run.token_log_probs.double().sum()), abs=1e-5)
    report = lm.compute_report()
    assert report["controller"] == "policy" and report["policy"] == str(policy_dir)
    assert report["loglikelihood"]["controlled_steps"] == sum(len(lm._encode_pair(context, e)[1]) for e in endings)
    assert report["loglikelihood"]["activation_keep"] < 1.0
