"""``sol-hf``: evaluate, train, generate with, and demo SOL policies.

    sol-hf eval     --base smollm2 --policy outputs/smollm2-policy --budgets 0.8 0.85 0.9 --output results.json
    sol-hf train    --base smollm2 --output-dir outputs/smollm2-policy
    sol-hf generate --base smollm2 --policy outputs/smollm2-policy --prompt "def fib(n):" --budget 0.85
    sol-hf demo
    sol-hf lm-eval  --model sol --model_args pretrained=BASE,compute_budget=0.6,controller=uniform --tasks TASKS

``--base smollm2`` (the default) is the embedded SmolLM2-135M-Instruct (``sol_hf.assets``).
User errors (missing paths, malformed or unreachable budgets) print one line and exit with 2.
Set ``SOL_HF_DEBUG=1`` to get the traceback instead.

``main`` sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it: waiting OpenMP
threads then sleep instead of spinning, which on cores that other jobs share made torch runs
3-9x slower (docs/benchmarks.md). It takes effect only if torch is not yet imported (as under the ``sol-hf`` command).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "CLIError", "parse_budget"]

DEFAULT_BASE = "smollm2"
_HELP_BUDGET = (
    "a unified cost fraction in (0, 1] (bytes read per decode step / dense bytes), e.g. 0.85, or a per-axis "
    "budget attention=0.5,activation=0.7 (axes left out stay dense; bits=8 where the grid has 8 bits, as the "
    "paper and int8-weights presets do)"
)


_HELP_THREADS = (
    "torch CPU threads (default: torch's choice; demo: 2). sol-hf sets OMP_WAIT_POLICY=PASSIVE unless you set it, so "
    "waiting OpenMP threads sleep instead of spinning: on cores other jobs share, spinning made runs 3-9x slower"
)
_HELP_CALIBRATE = (
    "CPU: first time decode steps with the kept-row op (channel selection included) against dense ones on the "
    "model's own weights (a few seconds), and run it only at keeps where a step measured at least 10%% faster; "
    "moves the reachable budgets too"
)
# Where OpenMP's threads wait: set before torch loads (OpenMP reads it once, at start-up).
OMP_WAIT_POLICY_DEFAULT = "PASSIVE"


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise CLIError(f"{message} (see: {self.prog} --help)")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def parse_budget(text: str) -> float | dict[str, float]:
    """``"0.85"`` -> 0.85; ``"attention=0.5,activation=0.8,bits=8"`` -> dict. Raises :class:`CLIError`."""
    from .budget import parse_compute_budget

    text = text.strip()
    if "=" in text:
        budget: Any = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise CLIError(f"bad budget {text!r}: per-axis budgets look like attention=0.5,activation=0.8,bits=8")
            try:
                budget[key] = float(value)
            except ValueError:
                raise CLIError(f"bad budget {text!r}: {key}={value!r} is not a number") from None
    else:
        try:
            budget = float(text)
        except ValueError:
            raise CLIError(f"bad budget {text!r}: expected {_HELP_BUDGET}") from None
    try:
        parse_compute_budget(budget, 1)
    except (TypeError, ValueError) as err:
        raise CLIError(f"bad budget {text!r}: {_one_line(err)}") from None
    return budget


def _check_reachable(model, budgets: Sequence[float | dict], context_length: int, controller: str = "policy") -> None:
    """Refuse unified-cost budgets below the cheapest action at this context length."""
    for budget in budgets:
        if isinstance(budget, float):
            reason = model.unreachable_budget_message(budget, context_length + 1, controller)
            if reason is not None:
                raise CLIError(f"{reason} Per-axis budgets (attention=...,activation=...) are always accepted.")


def _number_arg(name: str, parse, accept, expected: str):
    """argparse type: ``parse`` the text, then require ``accept(value)``; else "<name> must be <expected>"."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{name} must be {expected}, got {text!r}")
        return value

    return convert


def _non_negative_float(name: str):
    return _number_arg(name, float, lambda v: v >= 0.0 and math.isfinite(v), "a number >= 0")


def _positive_int(name: str):
    return _number_arg(name, int, lambda v: v >= 1, "a positive integer")


def _budget_arg(text: str):
    try:
        return parse_budget(text)
    except CLIError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _sections(text: str) -> list[str]:
    sections = [s.strip() for s in text.split(",") if s.strip()]
    if not sections:
        raise argparse.ArgumentTypeError("give at least one section, e.g. tutorial,faq,reference")
    return sections


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _looks_like_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not os.path.exists(ref)


def resolve_base(base: str) -> str:
    """``smollm2`` -> the embedded SmolLM2 folder; a local folder is checked to exist."""
    if base in (DEFAULT_BASE, "default"):
        from .assets import smollm2_path

        try:
            return smollm2_path()
        except ImportError as err:
            raise CLIError(_one_line(err)) from None
    path = os.path.expanduser(base)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CLIError(f"base model folder {base} has no config.json: pass a Hugging Face model folder or Hub id")
        return path
    if os.path.exists(path):
        raise CLIError(f"base model {base} is a file; pass a Hugging Face model folder or Hub id")
    if _looks_like_hub_id(base):
        return base
    raise CLIError(f"base model {base} does not exist (pass a model folder, a Hub id, or 'smollm2' for the embedded default)")


def _read_sol_config(path: str | None):
    from .config import PRESETS, SolConfig

    if path is None:
        return None
    if path in PRESETS and not os.path.isfile(path):
        return SolConfig.from_preset(path)
    if not os.path.isfile(path):
        raise CLIError(f"--sol-config {path} does not exist (pass a sol_config.json or a preset: {', '.join(sorted(PRESETS))})")
    try:
        return SolConfig.from_json_file(path)
    except (OSError, ValueError, TypeError) as err:
        raise CLIError(f"--sol-config {path}: {_one_line(err)}") from None


_UNTRAINED_NOTE = ("sol-hf: no --policy given: the 'policy' rows use an untrained (random) policy; the dense, "
                   "uniform and random rows do not depend on it")


def load_model(base: str, policy: str | None, device: str = "cpu", sol_config=None, quiet: bool = False,
               untrained_note: str = _UNTRAINED_NOTE):
    """(model, tokenizer) for a base model and an optional policy artifact folder; without a
    policy, ``untrained_note`` is printed to stderr (unless ``quiet``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import SolConfig
    from .modeling import SolForCausalLM

    base_path = resolve_base(base)
    if policy is not None:
        path = os.path.expanduser(policy)
        if not os.path.exists(path) and not _looks_like_hub_id(policy):
            raise CLIError(f"policy {policy} does not exist (pass the folder sol-hf train wrote, or a Hub id)")
        if os.path.exists(path) and not os.path.isdir(path):
            raise CLIError(f"policy {policy} is a file; pass the artifact folder (sol_config.json + policy.safetensors)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        if policy is not None:
            model = SolForCausalLM.from_pretrained(base_path, os.path.expanduser(policy), dtype=torch.float32)
        else:
            base_model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
            model = SolForCausalLM(base_model, sol_config or SolConfig())
            if not quiet:
                print(untrained_note, file=sys.stderr)
    except CLIError:
        raise
    except (OSError, ValueError, TypeError, ImportError) as err:
        what = f"base {base}" + (f" with policy {policy}" if policy else "")
        raise CLIError(f"could not load {what}: {_one_line(err)}") from None
    model.to(device)
    model.eval()
    return model, tokenizer


def read_texts(sections: Sequence[str], root: str) -> list[str]:
    from .data import python_docs_texts

    try:
        return python_docs_texts(sections, root)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(_one_line(err)) from None


def read_text_files(paths: Sequence[str]) -> list[str]:
    """Each UTF-8 text file is one document."""
    texts = []
    for path in paths:
        if not os.path.isfile(path):
            raise CLIError(f"--text-files: {path} is not a file")
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError) as err:
            raise CLIError(f"--text-files: cannot read {path} as UTF-8 text: {_one_line(err)}") from None
    return texts


def read_dataset_texts(path: str | None, column: str) -> list[str]:
    """The ``column`` of a dataset saved with ``datasets``' ``save_to_disk`` (a ``Dataset``, or the
    ``test`` / ``validation`` split of a ``DatasetDict``), one document per row."""
    if path is None:
        return []
    if not os.path.isdir(path):
        raise CLIError(f"--dataset {path} is not a folder written by datasets' save_to_disk")
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(path)
    except (OSError, ValueError, FileNotFoundError) as err:
        raise CLIError(f"--dataset {path}: {_one_line(err)}") from None
    if isinstance(data, DatasetDict):
        split = next((name for name in ("test", "validation") if name in data), None)
        if split is None:
            raise CLIError(f"--dataset {path} holds splits {sorted(data)}; evaluation reads 'test' or 'validation' (held-out text)")
        data = data[split]
    if column not in data.column_names:
        raise CLIError(f"--dataset {path} has no column {column!r} (columns: {data.column_names}); pick one with --dataset-column")
    return [text for text in data[column] if isinstance(text, str) and text.strip()]


def eval_windows(tokenizer, texts: Sequence[str], context_length: int, steps: int, count: int | None):
    """(N, context_length + steps + 1) windows of ``texts``, ``count`` of them evenly spaced over
    all windows (so every section is represented), deterministic."""
    from .data import evenly_spaced, text_windows

    try:
        windows = text_windows(texts, tokenizer, context_length + steps + 1)
    except ValueError as err:
        raise CLIError(_one_line(err)) from None
    return evenly_spaced(windows, count)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_eval(args) -> int:
    from .data import EVAL_SECTIONS
    from .evaluation import evaluate_perplexity

    _check_output_path(args.output)
    _check_output_path(args.markdown)
    _check_output_path(args.plot)
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:  # say so before the evaluation runs
            raise CLIError("--plot needs matplotlib: pip install 'sol-hf[plots]' (or pip install matplotlib)")
    _set_threads(args.threads)
    if args.text_files or args.dataset:
        if args.sections:
            raise CLIError("--sections picks Python-docs sections; it does not combine with --text-files or --dataset")
        texts = read_text_files(args.text_files or []) + read_dataset_texts(args.dataset, args.dataset_column)
        source = {"text_files": args.text_files, "dataset": args.dataset, "dataset_column": args.dataset_column}
    else:
        sections = args.sections or list(EVAL_SECTIONS)
        texts = read_texts(sections, args.text_root)
        source = {"sections": sections, "text_root": args.text_root}
    note = (_UNTRAINED_NOTE if not args.sweep else
            "sol-hf: no --policy given: the sweep scores the dense model and the non-learned schedules only")
    model, tokenizer = load_model(args.base, args.policy, args.device, _read_sol_config(args.sol_config), untrained_note=note)
    budgets = args.budgets
    _check_reachable(model, budgets, args.context_length)
    windows = eval_windows(tokenizer, texts, args.context_length, args.steps, args.windows)
    if args.sweep:
        result = _sweep(args, model, tokenizer, budgets, windows, source)
    else:
        result = evaluate_perplexity(
            model, windows, args.context_length, budgets, random_seeds=args.random_seeds, batch_size=args.batch_size,
            per_axis=not args.no_per_axis, budget_guard=None if args.budget_guard < 0 else args.budget_guard,
            policy_temperature=args.policy_temperature, seed=args.seed, progress=not args.no_progress,
            metadata={"base": args.base, "policy": args.policy, **source},
        )
    if args.output:
        result.to_json(args.output)
    if args.sweep:
        from .evaluation import sweep_markdown

        markdown = sweep_markdown(result.data)
    else:
        markdown = result.to_markdown()
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown)
    print(markdown)
    if args.plot:
        from .evaluation import plot_evaluation

        plot_evaluation(result.data, args.plot, title=f"{args.base}: perplexity against achieved cost")
        print(f"plot: {args.plot}")
    return 0


def _sweep(args, model, tokenizer, budgets, windows, source):
    """``sol-hf eval --sweep``: the best static schedule searched on validation windows (training-side
    text, never the evaluated text), then every schedule at every budget on the held-out windows."""
    from .data import TRAIN_SECTIONS
    from .evaluation.sweep import best_static_from, evaluate_sweep, search_best_static

    if any(isinstance(b, dict) for b in budgets):
        raise CLIError("--sweep takes unified budgets (floats): each schedule runs at the target cost itself")
    if len(budgets) < 2:
        raise CLIError("--sweep draws a curve: give at least two --budgets (e.g. --budgets 0.5 0.6 0.7 0.8 0.9)")
    progress = not args.no_progress
    earlier = None
    if args.baselines_from:
        if args.policy is None:
            raise CLIError("--baselines-from reuses an earlier sweep's non-learned rows to score a policy: give --policy")
        try:
            with open(args.baselines_from, encoding="utf-8") as f:
                earlier = json.load(f)
            static = best_static_from(earlier)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CLIError(f"--baselines-from {args.baselines_from}: not a sweep document ({_one_line(err)})") from None
        if sorted(static) != sorted(budgets):
            raise CLIError(f"--baselines-from {args.baselines_from} has budgets {sorted(static)}; pass the same --budgets")
    else:
        validation_texts = read_texts(list(TRAIN_SECTIONS), args.text_root)
        validation = eval_windows(tokenizer, validation_texts, args.context_length, args.steps, args.validation_windows)
        if progress:
            print(f"searching the best static schedule on {validation.shape[0]} validation windows "
                  f"({', '.join(TRAIN_SECTIONS)}) ...", flush=True)
        static = search_best_static(model, validation, args.context_length, budgets, batch_size=args.batch_size,
                                    progress=progress)
    try:
        return evaluate_sweep(
            model, windows, args.context_length, static, policy=args.policy is not None, baselines=earlier,
            random_seeds=args.random_seeds, batch_size=args.batch_size,
            budget_guard=None if args.budget_guard < 0 else args.budget_guard, seed=args.seed, progress=progress, metadata={"base": args.base, "policy": args.policy, "validation_sections": list(TRAIN_SECTIONS),
                                         "baselines_from": args.baselines_from, **source},
        )
    except ValueError as err:
        raise CLIError(_one_line(err)) from None


def cmd_generate(args) -> int:
    import torch

    _set_threads(args.threads)
    model, tokenizer = load_model(
        args.base, args.policy, args.device, _read_sol_config(args.sol_config), quiet=args.controller != "policy",
        untrained_note="sol-hf: no --policy given: --controller policy would pick actions with an untrained (random) "
                       "policy; pass --policy, or use --controller uniform",
    )
    _calibrate(model, args.calibrate)
    encoded = tokenizer(args.prompt, return_tensors="pt")
    input_ids = encoded["input_ids"].to(model.device)
    budget = args.budget
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id
    controller_kwargs = {"seed": args.seed} if args.controller == "random" else None
    try:
        with torch.no_grad():
            output = model.generate(input_ids, compute_budget=budget, controller=args.controller,
                                    controller_kwargs=controller_kwargs, attention_mask=encoded["attention_mask"], **kwargs)
    except ValueError as err:  # unreachable budgets and the like
        message = _one_line(err).replace("model.budget_range(context_length) gives the range.",
                                         "`sol-hf range` prints the reachable budgets.")
        raise CLIError(message) from None
    text = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    print(args.prompt + text)
    report = model.last_compute_report
    if report is None:
        print("\n[dense: compute_budget 1.0 runs the base model unchanged]")
    else:
        print("\n" + str(report))
    return 0


def _check_output_path(path: str | None) -> None:
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise CLIError(f"cannot write {path}: folder {folder} does not exist")


def _training_api():
    """``sol_hf.training.train_policy`` (imported lazily: it pulls in TRL)."""
    try:
        from .training import train_policy
    except ImportError as err:
        raise CLIError(f"training needs the training extra (pip install 'sol-hf[training]'): {_one_line(err)}") from None
    return train_policy


def _range(name: str):
    def convert(text: str) -> tuple[float, float]:
        parts = text.split(",")
        try:
            low, high = (float(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be LOW,HIGH (two numbers), got {text!r}") from None
        return low, high

    return convert


def train_kwargs(args) -> dict[str, Any]:
    """The keyword arguments ``sol-hf train`` / ``demo`` hand to ``train_policy`` (besides the base,
    the output folder, the texts and progress)."""
    return {
        "steps": args.steps, "seed": args.seed, "context_length": args.context_length, "rollout_steps": args.rollout_steps,
        "windows_per_step": args.windows_per_step, "num_generations": args.num_generations, "max_windows": args.max_windows,
        "budget_mode": args.budget_mode, "cost_budget_range": args.cost_budget_range,
        "budget_guard": None if args.budget_guard < 0 else args.budget_guard, "action_head": args.action_head,
        "observe_lm_confidence": args.lm_confidence, "learning_rate": args.learning_rate, "entropy_coef": args.entropy_coef,
        "reward_type": args.reward_type, "reward_gamma": args.reward_gamma, "cost_price": args.cost_price,
    }


def _train(args, texts, output_dir: str, progress: bool, **extra: Any) -> tuple[str, float, float]:
    train_policy = _training_api()
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        train_policy(resolve_base(args.base), output_dir, texts=texts, progress=progress, **train_kwargs(args), **extra)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(_one_line(err)) from None
    return output_dir, time.perf_counter() - started, time.process_time() - cpu_started


def cmd_train(args) -> int:
    if os.path.isfile(args.output_dir):
        raise CLIError(f"--output-dir {args.output_dir} is a file; pass a folder")
    _set_threads(args.threads)
    texts = read_texts(args.sections, args.text_root)
    extra = {"warm_start_updates": args.warm_start_updates} if args.warm_start_updates else {}
    out, wall, cpu = _train(args, texts, args.output_dir, not args.no_progress, **extra)
    print(f"sol-hf train: {args.steps} updates in {wall:.0f} s wall ({wall / args.steps:.1f} s per update), "
          f"{cpu:.0f} s CPU; policy artifact in {out}")
    return 0


DEMO_BUDGETS = ({"attention": 0.6, "activation": 0.8, "bits": 8}, {"attention": 0.3, "activation": 0.6, "bits": 6})


def _calibrate(model, wanted: bool) -> None:
    """With ``--calibrate``: measure this machine's sparse read factor (CPU) and say what it is."""
    if not wanted:
        return
    try:
        result = model.calibrate_sparse_read_factor()
    except ValueError as err:  # not on the CPU
        raise CLIError(f"--calibrate: {_one_line(err)} (drop --calibrate)") from None
    levels = ", ".join(f"keep {k:g}: {v['time_ratio']:.2f}" for k, v in result["levels"].items())
    print(f"sol-hf: calibrated {result['key']} sparse read factor {result['factor']:.2f} (pruned sites' time in a "
          f"decode step / dense projections': {levels})", file=sys.stderr)


def cmd_range(args) -> int:
    """Print the reachable unified budgets at a few context lengths, for the uniform controller and
    (its own weights counted) the policy."""
    _set_threads(args.threads)
    model, _ = load_model(args.base, args.policy, args.device, _read_sol_config(args.sol_config), quiet=True)
    _calibrate(model, args.calibrate)
    config = model.sol_config
    print(f"sol-hf range: {args.base}, {config.num_actions} actions (activation sparsity on "
          f"{', '.join(config.sparse_inputs)}; attention keep {list(config.attention_keep)}; activation keep "
          f"{list(config.activation_keep)}; bits {list(config.bits)}), as executed on {model.device.type}")
    print("| context tokens | lowest budget, uniform | lowest budget, policy |")
    print("| --- | --- | --- |")
    for length in args.context_lengths:
        uniform, _ = model.budget_range(length, "uniform")
        policy, _ = model.budget_range(length, "policy")
        show = lambda low: "none below 1.0" if low >= 1.0 else f"{low:.3f}"  # noqa: E731
        print(f"| {length} | {show(uniform)} | {show(policy)} |")
    print("A unified budget between the lowest value and 1.0 is reachable; 1.0 runs the base model.")
    return 0


def demo_verdict(data: dict) -> str:
    """One sentence per budget: did the policy beat the cost-matched uniform schedule, with the
    paired 95 % interval of the perplexity difference (uniform - policy)."""
    parts = []
    for entry in data["budgets"]:
        comparison = entry["comparisons"]["policy_vs_uniform"]
        diff, (low, high) = comparison["ppl_difference"], comparison["ppl_difference_ci"]
        if low > 0:
            verdict = "the policy beat the uniform schedule"
        elif high < 0:
            verdict = "the uniform schedule beat the policy"
        else:
            verdict = "the policy and the uniform schedule were not distinguishable"
        parts.append(f"at budget {entry['label']} {verdict} (uniform - policy perplexity {diff:+.2f}, "
                     f"95 % interval [{low:+.2f}, {high:+.2f}])")
    return "In this short run, " + "; ".join(parts) + "."


def cmd_demo(args) -> int:
    """Train briefly on library/howto/whatsnew, evaluate on held-out tutorial/faq/reference, and
    save the policy, the results JSON / Markdown and a plot in ``--output-dir``."""
    import importlib.util

    from .data import EVAL_SECTIONS, TRAIN_SECTIONS
    from .evaluation import evaluate_perplexity

    _check_output_path(args.output)
    _set_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    train_texts = read_texts(list(TRAIN_SECTIONS), args.text_root)
    eval_texts = read_texts(list(EVAL_SECTIONS), args.text_root)
    run_dir = args.output_dir
    os.makedirs(run_dir, exist_ok=True)
    policy_dir = os.path.join(run_dir, "policy")
    print(f"sol-hf demo: training a policy for SmolLM2-135M on {', '.join(TRAIN_SECTIONS)} "
          f"({args.steps} updates of {args.windows_per_step} windows x {args.num_generations} schedules x "
          f"{args.rollout_steps} steps, context {args.context_length}); everything goes to {run_dir}", file=sys.stderr)
    _, train_wall, _ = _train(args, train_texts, policy_dir, not args.no_progress)
    print(f"sol-hf demo: trained in {train_wall:.0f} s ({train_wall / args.steps:.1f} s per update); evaluating on held-out "
          f"{', '.join(EVAL_SECTIONS)}", file=sys.stderr)
    model, tokenizer = load_model(args.base, policy_dir)
    windows = eval_windows(tokenizer, eval_texts, args.context_length, args.rollout_steps, args.eval_windows)
    result = evaluate_perplexity(
        model, windows, args.context_length, list(DEMO_BUDGETS), random_seeds=args.random_seeds, batch_size=8,
        progress=not args.no_progress, metadata={"demo": True, "policy": policy_dir, "train_s": train_wall},
    )
    markdown = result.to_markdown()
    print(markdown)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    result.data["run"] = {"wall_s": wall, "cpu_s": cpu, "train_wall_s": train_wall}
    json_path = args.output or os.path.join(run_dir, "demo.json")
    result.to_json(json_path)
    md_path = os.path.join(run_dir, "demo.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown)
    saved = [json_path, md_path]
    if importlib.util.find_spec("matplotlib") is not None:
        from .evaluation import plot_evaluation

        saved.append(os.path.join(run_dir, "demo.png"))
        plot_evaluation(result.data, saved[-1], title="sol-hf demo: SmolLM2-135M, held-out Python docs")
    else:
        print("sol-hf demo: no plot (it needs matplotlib: pip install 'sol-hf[plots]')", file=sys.stderr)
    print(demo_verdict(result.data) + " A brief demo: for the full result see docs/results.md.")
    print(f"demo: {wall:.0f} s wall, {cpu:.0f} s CPU (training {train_wall:.0f} s). Saved: policy {policy_dir}, "
          + ", ".join(saved))
    return 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def _grid_text(grid) -> str:
    """``attention keep 0.1/0.6/1.0, activation keep (mlp_input) 0.4/0.8/1.0, bits 5/7/16``."""
    levels = lambda key: "/".join(f"{v:g}" for v in grid[key])  # noqa: E731
    return (f"attention keep {levels('attention_keep')}, activation keep ({', '.join(grid['sparse_inputs'])}) "
            f"{levels('activation_keep')}, bits {levels('bits')}")


def build_parser() -> argparse.ArgumentParser:
    from .data import PYTHON_DOCS_ROOT
    from .recipe import DEMO_TRAINING, RECIPE

    parser = _Parser(prog="sol-hf", description="SOL: a learned per-token compute policy for any Hugging Face causal LM",
                     epilog="Threads: --threads N sets torch's CPU threads; sol-hf sets OMP_WAIT_POLICY=PASSIVE unless "
                            "you set it, so waiting threads do not spin on shared cores.")
    sub = parser.add_subparsers(dest="command", metavar="{eval,train,generate,range,demo,lm-eval}", parser_class=_Parser)

    def common(p, policy_help: str):
        p.add_argument("--base", default=DEFAULT_BASE, help="base model folder or Hub id; 'smollm2' = the embedded SmolLM2-135M (default)")
        p.add_argument("--policy", default=None, help=policy_help)
        p.add_argument("--device", default="cpu", help="torch device for the model (default cpu; e.g. cuda)")
        p.add_argument("--threads", type=_positive_int("--threads"), default=None, help=_HELP_THREADS)
        p.add_argument("--sol-config", default=None, help="sol_config.json, or a preset name (default, paper, int8-weights), for the untrained policy used "
                       "without --policy")

    e = sub.add_parser("eval", help="perplexity of controlled tokens: policy vs dense, uniform and random at matched budget")
    common(e, "policy artifact folder (default: an untrained policy)")
    e.add_argument("--budgets", nargs="+", type=_budget_arg, default=[0.85], help=f"one or more budgets; each {_HELP_BUDGET}")
    e.add_argument("--sections", type=_sections, default=None, help="comma-separated doc sections (default: tutorial,faq,reference)")
    e.add_argument("--text-root", default=PYTHON_DOCS_ROOT, help=f"root of the *.rst.txt sections (default {PYTHON_DOCS_ROOT})")
    e.add_argument("--text-files", nargs="+", default=None, metavar="FILE",
                   help="evaluate on these UTF-8 text files (one document each) instead of the Python docs")
    e.add_argument("--dataset", default=None, metavar="FOLDER",
                   help="evaluate on a dataset saved with datasets' save_to_disk (a Dataset, or its test/validation split)")
    e.add_argument("--dataset-column", default="text", help="the dataset's text column (default text)")
    e.add_argument("--windows", type=_positive_int("--windows"), default=112, help="windows to score, evenly spaced (default 112)")
    e.add_argument("--context-length", type=_positive_int("--context-length"), default=256,
                   help="dense prefill tokens before the controlled ones (default 256)")
    e.add_argument("--steps", type=_positive_int("--steps"), default=16, help="controlled tokens per window (default 16)")
    e.add_argument("--random-seeds", type=_positive_int("--random-seeds"), default=8, help="random schedules per budget (default 8)")
    e.add_argument("--batch-size", type=_positive_int("--batch-size"), default=8, help="windows scored together (default 8)")
    e.add_argument("--budget-guard", type=float, default=0.25, help="policy budget-guard slack; negative = unguarded")
    e.add_argument("--policy-temperature", type=_non_negative_float("--policy-temperature"), default=0.0,
                   help="0 = greedy policy decisions (default); > 0 samples them at this temperature (seeded)")
    e.add_argument("--no-per-axis", action="store_true", help="skip the uniform schedule matched per axis")
    e.add_argument("--sweep", action="store_true",
                   help="score every schedule at each budget itself (dense, uniform, best static searched on validation "
                        "text, surprise rule, random, the policy and its shuffled actions) instead of matching to the policy")
    e.add_argument("--validation-windows", type=_positive_int("--validation-windows"), default=24,
                   help="--sweep: training-side windows the best static schedule is searched on (default 24)")
    e.add_argument("--baselines-from", default=None, metavar="JSON",
                   help="--sweep --policy: reuse the best static schedules and non-learned rows of this earlier sweep "
                        "(same windows, budgets and steps; checked) and run only the policy")
    e.add_argument("--seed", type=int, default=0, help="first random-schedule seed and bootstrap seed")
    e.add_argument("--output", default=None, help="write the results JSON here")
    e.add_argument("--markdown", default=None, help="write the Markdown table here")
    e.add_argument("--plot", default=None, metavar="PNG",
                   help="write a PNG of perplexity against achieved cost, one line per schedule (needs matplotlib)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text at a compute budget and print the compute report")
    common(g, "policy artifact folder (needed for --controller policy to mean anything)")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--budget", type=_budget_arg, default=None, help=f"{_HELP_BUDGET}; omitted = dense")
    g.add_argument("--controller", choices=("policy", "uniform", "random", "surprise"), default="policy",
                   help="who picks each step's action: the policy (default), the uniform schedule, random actions, or "
                        "the surprise rule (the cheapest action after tokens the base model saw coming, else dense)")
    g.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=40, help="tokens to generate (default 40)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random controller")
    g.add_argument("--calibrate", action="store_true", help=_HELP_CALIBRATE)
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("range", help="print the reachable compute budgets of a model and action grid by context length")
    common(r, "policy artifact folder (its action grid; default: SolConfig() or --sol-config)")
    r.add_argument("--context-lengths", nargs="+", type=_positive_int("--context-lengths"), default=[64, 256, 1024, 4096],
                   help="context lengths in tokens, the current one included (default 64 256 1024 4096)")
    r.add_argument("--calibrate", action="store_true", help=_HELP_CALIBRATE)
    r.set_defaults(func=cmd_range)

    def training_options(p, defaults):
        """The training options; ``defaults`` is ``RECIPE`` (train) or ``DEMO_TRAINING`` (demo)."""
        d = defaults
        p.add_argument("--base", default=DEFAULT_BASE, help="base model folder or Hub id; 'smollm2' = the embedded SmolLM2-135M")
        p.add_argument("--text-root", default=PYTHON_DOCS_ROOT, help=f"root of the *.rst.txt sections (default {PYTHON_DOCS_ROOT})")
        p.add_argument("--steps", type=_positive_int("--steps"), default=d["steps"], help=f"policy updates (default {d['steps']})")
        p.add_argument("--context-length", type=_positive_int("--context-length"), default=d["context_length"],
                       help=f"dense prefill tokens before the controlled ones (default {d['context_length']})")
        p.add_argument("--rollout-steps", type=_positive_int("--rollout-steps"), default=d["rollout_steps"],
                       help=f"T controlled steps per window (default {d['rollout_steps']})")
        p.add_argument("--windows-per-step", type=_positive_int("--windows-per-step"), default=d["windows_per_step"],
                       help=f"text windows per policy update (default {d['windows_per_step']})")
        p.add_argument("--num-generations", type=_positive_int("--num-generations"), default=d["num_generations"],
                       help=f"K schedules per window (default {d['num_generations']})")
        p.add_argument("--budget-mode", choices=("per_axis", "cost", "mixed"), default=d["budget_mode"],
                       help="budgets sampled for training: per-axis targets, unified cost, or either per window "
                            f"(default {d['budget_mode']})")
        p.add_argument("--cost-budget-range", type=_range("--cost-budget-range"), default=d["cost_budget_range"],
                       help="LOW,HIGH unified cost targets (default: from the cheapest reachable cost to 1.0)")
        p.add_argument("--budget-guard", type=float, default=d["budget_guard"],
                       help=f"slack of the guard that keeps sampled schedules near their target; negative = off "
                            f"(default {d['budget_guard']})")
        p.add_argument("--action-head", choices=("factorized", "joint"), default=d["action_head"],
                       help=f"one softmax per axis, or the paper's one over the whole grid (default {d['action_head']})")
        p.add_argument("--lm-confidence", action=argparse.BooleanOptionalAction, default=d["observe_lm_confidence"],
                       help="the policy also reads the base model's confidence in the current token "
                            f"(default {'on' if d['observe_lm_confidence'] else 'off'})")
        p.add_argument("--learning-rate", type=_non_negative_float("--learning-rate"), default=d["learning_rate"],
                       help=f"policy learning rate (default {d['learning_rate']:g}; the paper used 1e-4)")
        p.add_argument("--entropy-coef", type=_non_negative_float("--entropy-coef"), default=d["entropy_coef"],
                       help=f"entropy bonus (default {d['entropy_coef']:g}; the paper used 0.05)")
        p.add_argument("--reward-type", choices=("loglik", "neg_kl"), default=d["reward_type"],
                       help=f"per-step reward: log p of the true token, or minus the KL to dense (default {d['reward_type']})")
        p.add_argument("--reward-gamma", type=_number_arg("--reward-gamma", float, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
                       default=d["reward_gamma"], help=f"discount of the reward-to-go (default {d['reward_gamma']:g}, the authors')")
        p.add_argument("--cost-price", type=_non_negative_float("--cost-price"), default=d["cost_price"],
                       help=f"per-step price on the step's cost fraction (default {d['cost_price']:g}: the authors' reward)")
        p.add_argument("--max-windows", type=_positive_int("--max-windows"), default=d["max_windows"],
                       help=f"cap on training windows (default {'all' if d['max_windows'] is None else d['max_windows']})")
        p.add_argument("--seed", type=int, default=d["seed"],
                       help=f"seed of budgets, schedules and the policy's initialisation (default {d['seed']})")
        p.add_argument("--threads", type=_positive_int("--threads"), default=None, help=_HELP_THREADS)
        p.add_argument("--no-progress", action="store_true", help="no progress lines")

    t = sub.add_parser("train", help="train a policy with GRPO on teacher-forced counterfactual schedules; the "
                       "defaults are the recipe of the documented result (sol_hf.recipe.RECIPE, docs/results.md)",
                       description="Train a policy. Every default is the recipe of the documented result "
                                   f"(docs/results.md, sol_hf.recipe.RECIPE): the grid {_grid_text(RECIPE['grid'])} and "
                                   "the values below.")
    training_options(t, RECIPE)
    t.add_argument("--output-dir", required=True, help="where the policy artifact is written")
    t.add_argument("--sections", type=_sections, default=list(RECIPE["sections"]),
                   help=f"comma-separated training sections (default: {','.join(RECIPE['sections'])})")
    t.add_argument("--warm-start-updates", default=0,
                   type=_number_arg("--warm-start-updates", int, lambda v: v >= 0, "an integer >= 0"),
                   help="supervised updates before GRPO: the policy imitates the hindsight placement of the best "
                        "static mixture (sol_hf.training.warm_start; default 0: none, as the recipe)")
    t.set_defaults(func=cmd_train)

    smaller = (f"{DEMO_TRAINING['steps']} updates at context {DEMO_TRAINING['context_length']} on at most "
               f"{DEMO_TRAINING['max_windows']} windows with {DEMO_TRAINING['budget_mode']} budgets, against the documented "
               f"recipe's {RECIPE['steps']} at {RECIPE['context_length']} with {RECIPE['budget_mode']} budgets (sol-hf train's "
               "defaults)")
    d = sub.add_parser("demo", help="train briefly on SmolLM2, then compare dense / uniform / random / policy at two "
                       f"budgets; a short demo, smaller than the documented recipe: {smaller}",
                       description=f"A short demo, smaller than the documented recipe: it trains {smaller}; then it "
                                   "compares dense / uniform / random / policy schedules at two budgets on held-out text.")
    training_options(d, DEMO_TRAINING)
    d.add_argument("--eval-windows", type=_positive_int("--eval-windows"), default=16, help="held-out windows scored (default 16)")
    d.add_argument("--random-seeds", type=_positive_int("--random-seeds"), default=8, help="random schedules per budget (default 8)")
    d.add_argument("--output-dir", default="sol-hf-demo",
                   help="folder for the trained policy, demo.json, demo.md and demo.png (default ./sol-hf-demo)")
    d.add_argument("--output", default=None, help="write the evaluation JSON here instead of OUTPUT_DIR/demo.json")
    d.set_defaults(func=cmd_demo, threads=2)
    # Only listed here: main() hands everything after "lm-eval" to lm-eval's own parser.
    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness with --model sol registered; takes lm-eval's arguments (needs sol-hf[lm-eval])")
    return parser


def cmd_lm_eval(argv: Sequence[str]) -> int:
    """``sol-hf lm-eval ARGS``: lm-eval's command line, with the ``sol`` model registered (plain
    ``lm_eval`` has no way to find a model defined outside its package)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise CLIError("sol-hf lm-eval needs lm-evaluation-harness: pip install 'sol-hf[lm-eval]'")
    from .evaluation.lm_eval import SolModelArgsError, cli_main

    try:
        return cli_main(argv)
    except SolModelArgsError as err:
        raise CLIError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns 0; user errors print one line to stderr and raise ``SystemExit(2)``.

    Sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (before any command imports torch)."""
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT)
    try:
        argv = list(argv) if argv is not None else sys.argv[1:]
        if argv[:1] == ["lm-eval"]:
            return cmd_lm_eval(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return args.func(args)
    except CLIError as err:
        if os.environ.get("SOL_HF_DEBUG"):
            raise
        print(f"sol-hf: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("sol-hf: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
