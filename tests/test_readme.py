"""The README's "Use" example runs as written (the Hub id replaced by the offline SmolLM2 copy)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_the_readme_use_example_runs_as_written(smollm2_path, capsys):
    section = README.read_text().split("\n## Use\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "compute_budget=0.4" in code
    code = code.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(smollm2_path)))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    # SolConfig(): 0.4 is refused with the reachable range; int8 weights reach it and meet it
    assert "budget 0.4 is below the cheapest reachable cost" in out and "int8-weights" in out, out
    report = namespace["model"].last_compute_report
    assert report.cost.item() == pytest.approx(0.4, abs=0.01) and report.bits.item() < 16
