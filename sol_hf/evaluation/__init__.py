"""Evaluation: teacher-forced perplexity of controlled tokens at matched budget.

``evaluate_perplexity(model, windows, context_length, budgets)`` scores the dense model, the
policy, the uniform controller and random schedules matched to the policy's achieved budget,
with bootstrap intervals; ``EvaluationResult.to_json`` / ``to_markdown`` write the results and
``plot_evaluation`` draws them (with matplotlib; ``plot_speed`` draws ``benchmarks/decode_speed.py``'s
time against cost). ``search_best_static`` (validation text) and
``evaluate_sweep`` (held-out text) score every schedule at its own target across a budget range.
"""

from .perplexity import BUDGET_TOLERANCE, EvaluationResult, GroupedController, budget_label, evaluate_perplexity
from .plot import plot_evaluation, plot_speed
from .report import markdown_table
from .stats import bootstrap_indices, gap_closed, paired_comparison, perplexity, perplexity_interval
from .sweep import StaticMixtureController, StaticSchedule, evaluate_sweep, search_best_static, sweep_markdown

__all__ = [
    "evaluate_perplexity",
    "EvaluationResult",
    "GroupedController",
    "BUDGET_TOLERANCE",
    "budget_label",
    "markdown_table",
    "plot_evaluation",
    "plot_speed",
    "bootstrap_indices",
    "gap_closed",
    "paired_comparison",
    "perplexity",
    "perplexity_interval",
    "StaticMixtureController",
    "StaticSchedule",
    "search_best_static",
    "evaluate_sweep",
    "sweep_markdown",
]
