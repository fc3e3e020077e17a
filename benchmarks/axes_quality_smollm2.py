"""What the action axes cost in quality: perplexity of uniform schedules against achieved cost.

SmolLM2-135M-Instruct (fp32), held-out Python documentation (``sol_hf.data.EVAL_SECTIONS``, never
used for training), teacher-forced windows: a dense ``--context`` prefill, then ``--steps``
controlled steps, each scoring the next true token. For each ``SolConfig`` preset (``default``:
activation sparsity on every projection; ``paper``: MLP-input sparsity and MLP-output bits) and
each budget the preset reaches at this context length, the uniform controller spends the budget
evenly; budgets below a preset's cheapest action are listed as unreachable. No policy is
involved: this is the price of the actions themselves.

Prints JSON (perplexity with a 95 % bootstrap interval over windows, paired difference to dense,
achieved cost per step as each row would read decoded alone on this backend, per-axis means);
``--output`` writes it, ``--markdown`` a table, ``--plot`` a PNG (needs matplotlib).

    python benchmarks/axes_quality_smollm2.py --output docs/results/axes_quality_smollm2.json \
        --markdown docs/results/axes_quality_smollm2.md --plot docs/results/axes_quality_smollm2.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.budget import parse_compute_budget
from sol_hf.cli import eval_windows, read_texts
from sol_hf.data import EVAL_SECTIONS, PYTHON_DOCS_ROOT
from sol_hf.episodes import run_episodes
from sol_hf.evaluation.stats import bootstrap_indices, paired_comparison, perplexity, perplexity_interval
from sol_hf.policy import UniformController


def window_nll(log_probs: torch.Tensor) -> torch.Tensor:
    """(W, T) token log-probabilities -> (W,) mean NLL per window."""
    return (-log_probs.double()).mean(-1)


def score(model: SolForCausalLM, windows: torch.Tensor, context: int, budget: float | None, batch_size: int) -> dict:
    """Per-window NLL and per-step means of one schedule (``budget`` None: dense)."""
    nll, cost, attention, activation, bits = [], [], [], [], []
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start : start + batch_size]
        targets = parse_compute_budget(1.0 if budget is None else budget, chunk.shape[0])
        run = run_episodes(model, chunk, context, UniformController(model.space), targets)
        nll.append(window_nll(run.token_log_probs))
        cost.append(run.step_cost.double().mean(-1))
        attention.append(run.attention_keep.double().mean(-1))
        activation.append(run.activation_keep.double().mean(-1))
        bits.append(run.bits.double().mean(-1))
    mean = lambda parts: float(torch.cat(parts).mean())  # noqa: E731
    return {"window_nll": torch.cat(nll), "cost": mean(cost), "attention_keep": mean(attention),
            "activation_keep": mean(activation), "bits": mean(bits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--presets", nargs="*", default=["default", "paper"])
    parser.add_argument("--site-sets", nargs="*", default=[],
                        help="also the default preset restricted to these sparse_inputs, one comma-separated set "
                             "per entry, e.g. mlp_input,mlp_output")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--text-root", default=PYTHON_DOCS_ROOT)
    parser.add_argument("--output")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sol_hf.assets import smollm2_path

    started = time.perf_counter()
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = eval_windows(tokenizer, read_texts(EVAL_SECTIONS, args.text_root), args.context, args.steps, args.windows)
    indices = bootstrap_indices(windows.shape[0], args.resamples)

    rows, dense = [], None
    configs = [(preset, SolConfig.from_preset(preset)) for preset in args.presets]
    configs += [(f"default/{sites}", SolConfig(sparse_inputs=tuple(sites.split(",")))) for sites in args.site_sets]
    for preset, config in configs:
        model = SolForCausalLM(base, config)
        if dense is None:
            dense = score(model, windows, args.context, None, args.batch_size)
        low, _ = model.budget_range(args.context + 1)
        for budget in args.budgets:
            row = {"preset": preset, "budget": budget}
            if budget < low - 1e-6:
                row["unreachable"] = f"cheapest action costs {low:.3f} at context {args.context + 1}"
            else:
                got = score(model, windows, args.context, budget, args.batch_size)
                paired = paired_comparison(got["window_nll"], dense["window_nll"], indices)  # dense - candidate
                row.update({
                    "ppl": perplexity(got["window_nll"]),
                    "ppl_ci95": perplexity_interval(got["window_nll"], indices),
                    "ppl_minus_dense": -paired["ppl_difference"],
                    "ppl_minus_dense_ci95": [-paired["ppl_difference_ci"][1], -paired["ppl_difference_ci"][0]],
                    **{k: got[k] for k in ("cost", "attention_keep", "activation_keep", "bits")},
                })
            rows.append(row)
            print(json.dumps(row), flush=True)
        base = model.unwrap()

    result = {
        "benchmark": "axes_quality_smollm2",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "command": "python benchmarks/axes_quality_smollm2.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not None and k not in ("output", "markdown", "plot", "text_root")),
        "text": f"held-out sections {list(EVAL_SECTIONS)} of the Python docs, {windows.shape[0]} windows of "
                f"{args.context} context + {args.steps} scored tokens",
        "dense": {"ppl": perplexity(dense["window_nll"]), "ppl_ci95": perplexity_interval(dense["window_nll"], indices)},
        "rows": rows,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
    if args.plot:
        plot(result, args.plot)


def markdown(result: dict) -> str:
    d = result["dense"]
    lines = [
        f"Dense perplexity {d['ppl']:.3f} [{d['ppl_ci95'][0]:.3f}, {d['ppl_ci95'][1]:.3f}]; {result['text']}.",
        "",
        "| preset | budget | ppl [95 % CI] | ppl - dense [95 % CI] | achieved cost | attention keep | activation keep | bits |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        if "unreachable" in r:
            lines.append(f"| {r['preset']} | {r['budget']:g} | unreachable ({r['unreachable']}) | | | | | |")
            continue
        ci = r["ppl_minus_dense_ci95"]
        lines.append(
            f"| {r['preset']} | {r['budget']:g} | {r['ppl']:.3f} [{r['ppl_ci95'][0]:.3f}, {r['ppl_ci95'][1]:.3f}] "
            f"| {r['ppl_minus_dense']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] | {r['cost']:.3f} "
            f"| {r['attention_keep']:.3f} | {r['activation_keep']:.3f} | {r['bits']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plotting needs matplotlib: pip install matplotlib")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for preset in dict.fromkeys(r["preset"] for r in result["rows"]):
        points = sorted((r["cost"], r["ppl"], r["ppl_ci95"]) for r in result["rows"] if r["preset"] == preset and "ppl" in r)
        points.append((1.0, result["dense"]["ppl"], result["dense"]["ppl_ci95"]))
        x = [p[0] for p in points]
        y = [p[1] for p in points]
        err = [[p[1] - p[2][0] for p in points], [p[2][1] - p[1] for p in points]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"uniform, preset '{preset}'")
    ax.set_xlabel("achieved cost (bytes read / dense step)")
    ax.set_ylabel("perplexity (held-out text)")
    ax.set_title("SmolLM2-135M: quality of uniform schedules by cost")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
