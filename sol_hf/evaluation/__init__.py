"""Evaluation: teacher-forced perplexity of controlled tokens at matched budget.

``evaluate_perplexity(model, windows, context_length, budgets)`` scores the dense model, the
policy, the uniform controller and random schedules matched to the policy's achieved budget,
with bootstrap intervals; ``EvaluationResult.to_json`` / ``to_markdown`` write the results and
``plot_evaluation`` draws them (with matplotlib).
"""

from .perplexity import BUDGET_TOLERANCE, EvaluationResult, GroupedController, budget_label, evaluate_perplexity
from .plot import plot_evaluation
from .report import markdown_table
from .stats import bootstrap_indices, gap_closed, paired_comparison, perplexity, perplexity_interval

__all__ = [
    "evaluate_perplexity",
    "EvaluationResult",
    "GroupedController",
    "BUDGET_TOLERANCE",
    "budget_label",
    "markdown_table",
    "plot_evaluation",
    "bootstrap_indices",
    "gap_closed",
    "paired_comparison",
    "perplexity",
    "perplexity_interval",
]
