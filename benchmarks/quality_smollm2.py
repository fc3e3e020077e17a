"""Issue 4's result: does a trained SOL policy beat uniform and random schedules at matched budget?

SmolLM2-135M-Instruct (the embedded default), a policy trained on Python documentation
(library, howto, whatsnew: ``sol_hf.data.TRAIN_SECTIONS``), evaluated on held-out sections
(tutorial, faq, reference: ``EVAL_SECTIONS``) at three or more budgets fixed before looking at
any held-out number. Prints the evaluation JSON (plus run facts) and writes it to ``--output``.

    python benchmarks/quality_smollm2.py --policy outputs/smollm2-policy --output outputs/quality_smollm2.json

Budgets: by default they follow how the policy was trained (``training_args.json`` in the
policy folder: ``budget_mode``): per-axis points for ``per_axis``, unified-cost points for
``cost``, both for ``mixed``. They are a fixed rule, never tuned on the held-out text.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from sol_hf.cli import eval_windows, load_model, parse_budget, read_texts
from sol_hf.data import EVAL_SECTIONS, PYTHON_DOCS_ROOT, TRAIN_SECTIONS
from sol_hf.evaluation import evaluate_perplexity

# Per-axis points, chosen a priori: the first is the authors' CPU-scaled point (achieved keep
# 0.725 / activation keep 0.896 / about 10.3 bits), then two cheaper ones.
PER_AXIS_BUDGETS = (
    {"attention": 0.7, "activation": 0.9, "bits": 10},
    {"attention": 0.5, "activation": 0.8, "bits": 8},
    {"attention": 0.3, "activation": 0.6, "bits": 6},
)
COST_FRACTIONS = (0.75, 0.5, 0.25)  # of the way from the cheapest reachable cost up to dense


def training_facts(policy_dir: str) -> dict:
    """What the policy folder says about its training (arguments, time per update)."""
    facts: dict = {}
    args_path = os.path.join(policy_dir, "training_args.json")
    if os.path.isfile(args_path):
        with open(args_path, encoding="utf-8") as f:
            args = json.load(f)
        keys = ("context_length", "rollout_steps", "num_generations", "per_device_train_batch_size", "max_steps",
                "budget_mode", "cost_budget_range", "attention_budget_range", "activation_budget_range", "bits_budget_range",
                "budget_guard", "learning_rate", "temperature", "reward_type", "seed")
        facts["training_args"] = {k: args.get(k) for k in keys if k in args}
    log_path = os.path.join(policy_dir.rstrip("/") + "-run", "training_log.json")  # sol_hf.training.train_policy's log
    if os.path.isfile(log_path):
        with open(log_path, encoding="utf-8") as f:
            log = json.load(f)
        steps, wall = log.get("steps"), log.get("wall_s")
        facts["training_log"] = {
            "path": log_path,
            "train_windows": log.get("train_windows"),
            "steps": steps,
            "wall_s": wall,
            "s_per_update": wall / steps if steps and wall else None,
            "last_log": (log.get("log_history") or [{}])[-1],
        }
        for key in ("budget_mode", "context_length", "rollout_steps"):
            if key in log:
                facts.setdefault("training_args", {})[key] = log[key]
    return facts


def default_budgets(model, budget_mode: str | None, context_length: int) -> list:
    budgets: list = []
    if budget_mode in (None, "per_axis", "mixed"):
        budgets += [dict(b) for b in PER_AXIS_BUDGETS]
    if budget_mode in ("cost", "mixed"):
        low, _ = model.budget_range(context_length + 1, "policy")
        budgets += [round(low + f * (1.0 - low), 3) for f in COST_FRACTIONS]
    return budgets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="outputs/smollm2-policy")
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--budgets", nargs="+", type=parse_budget, default=None)
    parser.add_argument("--windows", type=int, default=112, help="held-out windows (112 x 16 = 1,792 tokens, as the bar)")
    parser.add_argument("--context-length", type=int, default=None, help="default: the policy's training context")
    parser.add_argument("--steps", type=int, default=None, help="default: the policy's rollout steps")
    parser.add_argument("--random-seeds", type=int, default=8)
    parser.add_argument("--policy-temperature", type=float, default=0.0, help="0 = greedy policy; > 0 = sampled (seeded)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-root", default=PYTHON_DOCS_ROOT)
    parser.add_argument("--output", default="outputs/quality_smollm2.json")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)

    assert not set(EVAL_SECTIONS) & set(TRAIN_SECTIONS), "held-out sections overlap the training sections"
    torch.set_num_threads(args.threads)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    facts = training_facts(args.policy)
    train_args = facts.get("training_args", {})
    context_length = args.context_length or train_args.get("context_length") or 256
    steps = args.steps or train_args.get("rollout_steps") or 16
    texts = read_texts(EVAL_SECTIONS, args.text_root)
    model, tokenizer = load_model(args.base, args.policy)
    budgets = args.budgets or default_budgets(model, train_args.get("budget_mode"), context_length)
    windows = eval_windows(tokenizer, texts, context_length, steps, args.windows)
    result = evaluate_perplexity(model, windows, context_length, budgets, random_seeds=args.random_seeds,
                                 batch_size=args.batch_size, policy_temperature=args.policy_temperature, progress=True)
    data = result.data
    data["run"] = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPU cores visible, "
        f"torch threads {torch.get_num_threads()}, GPU: {'yes' if torch.cuda.is_available() else 'none'}",
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
        "base": args.base,
        "policy": args.policy,
        "train_sections": list(TRAIN_SECTIONS),
        "eval_sections": list(EVAL_SECTIONS),
        "training": facts,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    result.to_json(args.output)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(result.to_markdown())
    print(result.to_markdown(), file=sys.stderr)
    compact = json.loads(json.dumps(data))
    for entry in [compact["dense"]] + [row for b in compact["budgets"] for row in b.values() if isinstance(row, dict)]:
        entry.pop("window_nll", None)
    print(json.dumps(compact, indent=2))
    return 0


if __name__ == "__main__":
    from sol_hf.cli import CLIError

    try:
        sys.exit(main())
    except CLIError as err:
        print(f"quality_smollm2: error: {err}", file=sys.stderr)
        sys.exit(2)
