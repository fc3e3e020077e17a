"""Perplexity statistics over windows: point estimates, bootstrap intervals, paired comparisons.

Every window scores the same number of tokens, so corpus perplexity is ``exp(mean window NLL)``
and a bootstrap over windows (the independent unit: tokens of one window are correlated)
resamples window indices. One index matrix is shared by every schedule of an evaluation, so the
intervals of two schedules and their paired differences come from the same resamples.
"""

from __future__ import annotations

import math

import torch

__all__ = ["bootstrap_indices", "perplexity", "perplexity_interval", "paired_comparison", "gap_closed"]


def bootstrap_indices(num_windows: int, resamples: int, seed: int = 0) -> torch.Tensor:
    """(resamples, num_windows) int64 window indices drawn with replacement."""
    if num_windows < 1:
        raise ValueError("need at least one window")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(num_windows, (resamples, num_windows), generator=generator)


def perplexity(window_nll: torch.Tensor) -> float:
    """(W,) mean NLL per window (each over the same number of tokens) -> corpus perplexity."""
    return math.exp(float(window_nll.double().mean()))


def _resampled_log_ppl(window_nll: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return window_nll.double()[indices].mean(-1)


def perplexity_interval(window_nll: torch.Tensor, indices: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the corpus perplexity."""
    samples = _resampled_log_ppl(window_nll, indices)
    alpha = (1.0 - level) / 2
    low, high = torch.quantile(samples, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return math.exp(float(low)), math.exp(float(high))


def paired_comparison(candidate_nll: torch.Tensor, baseline_nll: torch.Tensor, indices: torch.Tensor, level: float = 0.95) -> dict:
    """How much lower the candidate's perplexity is than the baseline's, on the same windows.

    Returns ``ppl_difference`` (baseline - candidate; > 0 means the candidate is better), its
    bootstrap interval, and ``p_candidate_better``: the share of resamples where the candidate's
    perplexity is strictly lower.
    """
    cand = _resampled_log_ppl(candidate_nll, indices).exp()
    base = _resampled_log_ppl(baseline_nll, indices).exp()
    diff = base - cand
    alpha = (1.0 - level) / 2
    low, high = torch.quantile(diff, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return {
        "ppl_difference": perplexity(baseline_nll) - perplexity(candidate_nll),
        "ppl_difference_ci": [float(low), float(high)],
        "p_candidate_better": float((diff > 0).double().mean()),
    }


def gap_closed(candidate_ppl: float, baseline_ppl: float, dense_ppl: float) -> float | None:
    """Fraction of the baseline-to-dense perplexity gap the candidate closes (1 = as good as
    dense, 0 = no better than the baseline, < 0 = worse). ``None`` when the baseline is not
    worse than dense beyond float rounding (a baseline that ran dense actions: no gap to close)."""
    gap = baseline_ppl - dense_ppl
    if gap <= 1e-6 * abs(dense_ppl):
        return None
    return (baseline_ppl - candidate_ppl) / gap
