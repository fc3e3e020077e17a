"""Markdown rendering of an evaluation's JSON document."""

from __future__ import annotations

from typing import Any

__all__ = ["markdown_table"]


def _fmt_ppl(row: dict[str, Any]) -> str:
    if "ppl_ci" in row:
        low, high = row["ppl_ci"]
        return f"{row['ppl']:.3f} [{low:.3f}, {high:.3f}]"
    return f"{row['ppl']:.3f} (sd {row.get('ppl_std', 0.0):.3f})"


def _axes(row: dict[str, Any]) -> str:
    return f"{row['cost']:.3f} | {row['attention_keep']:.3f} | {row['activation_keep']:.3f} | {row['bits']:.2f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def markdown_table(data: dict[str, Any]) -> str:
    """One table: the dense row, then per budget the policy and its matched baselines, with the
    paired perplexity difference to the policy (baseline - policy; > 0: the policy is better)."""
    proto = data["protocol"]
    lines = [
        f"{proto['windows']} windows x {proto['controlled_steps']} controlled tokens "
        f"({proto['scored_tokens_per_schedule']} scored tokens per schedule) after a dense {proto['context_length']}-token "
        f"prefill; {int(100 * proto['bootstrap']['level'])} % bootstrap intervals over windows.",
        "",
        "| budget | schedule | ppl [CI] | cost | attention keep | activation keep | bits | ppl(schedule) - ppl(policy) [CI] | P(policy better) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| - | dense | {_fmt_ppl(data['dense'])} | {_axes(data['dense'])} | | |",
    ]
    for entry in data["budgets"]:
        label = entry["label"]
        policy = entry["policy"]
        ok = "ok" if policy["budget"]["within_tolerance"] else "OFF TARGET"
        errors = ", ".join(f"{k} {100 * v:+.1f} %" for k, v in policy["budget"]["relative_error"].items())
        lines.append(f"| {label} | **policy** ({errors}, {ok}) | {_fmt_ppl(policy)} | {_axes(policy)} | | |")
        for key in ("uniform", "uniform_per_axis", "random_best", "random_mean"):
            if key not in entry:
                continue
            row = entry[key]
            name = key if key != "random_best" else f"random_best (seed {row['seed']})"
            if key == "random_mean":
                name = f"random_mean of {len(row['seeds'])}"
            cmp = entry["comparisons"].get(f"policy_vs_{key}")
            extra = "| |"
            if cmp is not None:
                lo, hi = cmp["ppl_difference_ci"]
                extra = f"| {cmp['ppl_difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {cmp['p_candidate_better']:.2f} |"
            lines.append(f"| {label} | {name} | {_fmt_ppl(row)} | {_axes(row)} {extra}")
    lines.append("")
    lines.append("Fraction of the baseline-to-dense perplexity gap the policy closes:")
    lines.append("")
    for entry in data["budgets"]:
        parts = ", ".join(f"{k.removeprefix('vs_')} {_pct(v)}" for k, v in entry["gap_closed"].items())
        lines.append(f"- budget {entry['label']}: {parts}")
    return "\n".join(lines) + "\n"
