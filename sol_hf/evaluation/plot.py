"""PNGs of results: an evaluation's perplexity against achieved cost, one line per schedule
(:func:`plot_evaluation`), and decode time against executed cost, one line per measured
configuration (:func:`plot_speed`, from ``benchmarks/decode_speed.py``).

Plotting is optional: it needs matplotlib (``pip install 'sol-hf[plots]'``); without it both
functions raise an ``ImportError`` that says so.
"""

from __future__ import annotations

from typing import Any

__all__ = ["plot_evaluation", "plot_speed", "SCHEDULES", "SWEEP_SCHEDULES", "PLOTS_NEED_MATPLOTLIB"]

PLOTS_NEED_MATPLOTLIB = "plots need matplotlib: pip install 'sol-hf[plots]' (or pip install matplotlib)"

# The schedules an evaluation scores per budget, in drawing order, with their legend names.
SCHEDULES = {
    "policy": "policy",
    "uniform": "uniform (cost-matched)",
    "uniform_per_axis": "uniform (per-axis matched)",
    "random_best": "random (best seed)",
    "random_mean": "random (mean of seeds)",
}
# The schedules of a sweep (``evaluate_sweep``), each run at the target itself.
SWEEP_SCHEDULES = {
    "policy": "policy",
    "best_static": "best static (searched on validation)",
    "uniform": "uniform ladder",
    "surprise": "surprise rule (best static pair)",
    "random": "random (mean of seeds)",
    "policy_shuffled": "policy's actions, shuffled",
}


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or an ImportError saying how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(PLOTS_NEED_MATPLOTLIB) from None
    return plt


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: str | None, legend_size: int):
    """Labels, grid and legend; saves a PNG to ``path`` if given; returns ``fig``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_evaluation(data: dict[str, Any], path: str | None = None, title: str | None = None):
    """Draw ``data`` (an :class:`~sol_hf.evaluation.EvaluationResult`'s JSON document, from
    ``evaluate_perplexity`` or ``evaluate_sweep``): for each schedule, its perplexity at each
    budget against the cost it achieved there (95 % intervals where the evaluation has them), and
    the dense model at cost 1.0. Saves a PNG to ``path`` if given; returns the matplotlib ``Figure``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = data["dense"]
    ax.axhline(dense["ppl"], color="gray", linestyle=":", linewidth=1)
    # every entry an errorbar container, so the legend keeps this order
    ax.errorbar([dense["cost"]], [dense["ppl"]], marker="*", markersize=11, color="black", linestyle="none", label="dense")
    sweep = data.get("kind") == "sweep"
    for key, name in (SWEEP_SCHEDULES if sweep else SCHEDULES).items():
        rows = [(entry["schedules"] if sweep else entry).get(key) for entry in data["budgets"]]
        rows = sorted((row for row in rows if row is not None), key=lambda row: row["cost"])
        if not rows:
            continue
        x = [row["cost"] for row in rows]
        y = [row["ppl"] for row in rows]
        err = None
        if all("ppl_ci" in row for row in rows):
            err = [[row["ppl"] - row["ppl_ci"][0] for row in rows], [row["ppl_ci"][1] - row["ppl"] for row in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    return _finish(fig, ax, "achieved cost (bytes read / dense step)", "perplexity (controlled tokens)",
                   title or "Perplexity against achieved cost", path, legend_size=8)


SPEED_XLABEL = "achieved executed cost (bytes read / dense bytes)"
SPEED_YLABEL = "decode time per token / base model's"


def speed_label(data: dict[str, Any]) -> str:
    """``smollm2 float32, ctx 512, batch 1, default preset, cpu`` (``, LoRA rank 16`` for a PEFT base):
    what a decode-speed run measured."""
    lora = f", LoRA rank {data['lora_rank']}" if data.get("lora_rank") else ""
    return (f"{data.get('model', '?')} {data.get('dtype', '?')}, ctx {data.get('context', '?')}, batch {data.get('batch', '?')}, "
            f"{data.get('preset', '?')} preset, {data.get('device', '?')}{lora}")


def plot_speed(data: dict[str, Any] | list[dict[str, Any]], path: str | None = None, title: str | None = None):
    """Draw decode time against executed cost: for each configuration ``data`` holds (one JSON
    document of ``benchmarks/decode_speed.py``, or a list of them), the time per token relative to
    the base model at each budget (``time_ratio_to_base``) against the cost the report counted
    there (``cost``), one line per configuration; a configuration that also timed transformers'
    compiled static-cache decode shows it as a point at cost 1.0. References: the base model (1.0),
    time equal to cost, and the 1.15x-of-cost target. Saves a PNG to ``path`` if given; returns the
    matplotlib ``Figure``. Raises ``ValueError`` for a document without measured budgets."""
    runs = [data] if isinstance(data, dict) else list(data)
    if not runs:
        raise ValueError("plot_speed needs at least one decode_speed result")
    for i, run in enumerate(runs):
        rows = run.get("budgets") if isinstance(run, dict) else None
        if not rows or not all(isinstance(r, dict) and "cost" in r and "time_ratio_to_base" in r for r in rows):
            raise ValueError(f"decode_speed result {i} has no 'budgets' rows with 'cost' and 'time_ratio_to_base' "
                             "(pass the JSON that benchmarks/decode_speed.py prints)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    low = min(min(r["cost"] for r in run["budgets"]) for run in runs)
    xs = [min(low, 0.9) - 0.05, 1.02]
    ax.axhline(1.0, color="gray", linestyle=":", linewidth=1, label="base model (dense generate)")
    ax.plot(xs, xs, color="black", linewidth=0.8, linestyle="--", label="time = cost (time follows bytes)")
    ax.plot(xs, [1.15 * x for x in xs], color="red", linewidth=0.8, linestyle=":", label="1.15 x cost (target)")
    for run in runs:
        rows = sorted(run["budgets"], key=lambda r: r["cost"])
        (line,) = ax.plot([r["cost"] for r in rows], [r["time_ratio_to_base"] for r in rows], marker="o", label=speed_label(run))
        compiled = run.get("base_static_compiled_ms_per_token")
        if compiled and run.get("base_ms_per_token"):
            ax.plot([1.0], [compiled / run["base_ms_per_token"]], marker="*", markersize=10, linestyle="none",
                    color=line.get_color(), label=f"{run.get('model', '?')}: transformers static cache, compiled (dense)")
    ax.set_xlim(*xs)
    return _finish(fig, ax, SPEED_XLABEL, SPEED_YLABEL, title or "Decode time against executed cost", path, legend_size=7)
