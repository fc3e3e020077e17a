"""A PNG of an evaluation: perplexity against achieved cost, one line per schedule.

Plotting is optional: it needs matplotlib (``pip install 'sol-hf[plots]'``); without it
:func:`plot_evaluation` raises an ``ImportError`` that says so.
"""

from __future__ import annotations

from typing import Any

__all__ = ["plot_evaluation", "SCHEDULES", "SWEEP_SCHEDULES"]

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


def plot_evaluation(data: dict[str, Any], path: str | None = None, title: str | None = None):
    """Draw ``data`` (an :class:`~sol_hf.evaluation.EvaluationResult`'s JSON document, from
    ``evaluate_perplexity`` or ``evaluate_sweep``): for each schedule, its perplexity at each
    budget against the cost it achieved there (95 % intervals where the evaluation has them), and
    the dense model at cost 1.0. Saves a PNG to ``path`` if given; returns the matplotlib ``Figure``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'sol-hf[plots]' (or pip install matplotlib)") from None
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
    ax.set_xlabel("achieved cost (bytes read / dense step)")
    ax.set_ylabel("perplexity (controlled tokens)")
    ax.set_title(title or "Perplexity against achieved cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
