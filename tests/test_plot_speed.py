"""``plot_speed``: decode time (relative to the base model) against executed cost, one line per
configuration, from hand-made ``benchmarks/decode_speed.py`` documents (the benchmark is not run)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from sol_hf.evaluation.plot import PLOTS_NEED_MATPLOTLIB, SPEED_XLABEL, SPEED_YLABEL, plot_speed

ROOT = Path(__file__).resolve().parents[1]


def speed_result(model: str, ratios: list[tuple[float, float]], compiled_ms: float | None = None) -> dict:
    """The fields of decode_speed's JSON that the plot reads: (cost, time ratio) per budget."""
    return {
        "benchmark": "decode_speed", "model": model, "dtype": "float32", "device": "cpu", "context": 512, "batch": 1,
        "preset": "default", "base_ms_per_token": 100.0, "base_static_compiled_ms_per_token": compiled_ms,
        # budgets in ladder order (1.0 first), as the benchmark writes them: the plot sorts by cost
        "budgets": [{"budget": b, "cost": c, "time_ratio_to_base": r, "ms_per_token": 100.0 * r}
                    for b, (c, r) in zip((1.0, 0.8, 0.7, 0.6, 0.5), ratios)],
    }


SMOLLM2 = speed_result("smollm2", [(1.0, 1.048), (0.796, 0.969), (0.696, 0.920), (0.598, 0.859), (0.496, 0.771)])
LLAMA = speed_result("llama-1b-shape", [(1.0, 0.981), (0.79, 1.025), (0.596, 1.031)], compiled_ms=80.0)


def test_plot_speed_draws_one_line_per_configuration(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "speed.png"
    fig = plot_speed([SMOLLM2, LLAMA], str(png))
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert ax.get_xlabel() == SPEED_XLABEL == "achieved executed cost (bytes read / dense bytes)"
    assert ax.get_ylabel() == SPEED_YLABEL == "decode time per token / base model's"
    lines = {line.get_label(): line for line in ax.get_lines()}
    smollm2 = lines["smollm2 float32, ctx 512, batch 1, default preset, cpu"]
    llama = lines["llama-1b-shape float32, ctx 512, batch 1, default preset, cpu"]
    # each configuration's line passes through its (cost, time ratio) points, in cost order
    assert smollm2.get_xydata().tolist() == sorted([r["cost"], r["time_ratio_to_base"]] for r in SMOLLM2["budgets"])
    assert llama.get_xydata().tolist() == sorted([r["cost"], r["time_ratio_to_base"]] for r in LLAMA["budgets"])
    # the compiled dense baseline, measured for one configuration only, is a point at cost 1.0
    compiled = lines["llama-1b-shape: transformers static cache, compiled (dense)"]
    assert compiled.get_xydata().tolist() == [[1.0, 0.8]]
    assert not any("smollm2: transformers" in label for label in lines)
    assert lines["base model (dense generate)"].get_ydata()[0] == 1.0
    reference = lines["1.15 x cost (target)"].get_xydata()
    assert reference[:, 1].tolist() == pytest.approx((1.15 * reference[:, 0]).tolist())
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 6  # base, time = cost, 1.15 x cost, two configurations, one compiled point


def test_one_document_is_one_line():
    pytest.importorskip("matplotlib")
    fig = plot_speed(SMOLLM2)
    configurations = [line for line in fig.axes[0].get_lines() if line.get_marker() == "o"]
    assert len(configurations) == 1 and fig.axes[0].get_title() == "Decode time against executed cost"
    # a PEFT LoRA base (decode_speed.py --lora-rank) is a configuration of its own
    lora = plot_speed([SMOLLM2, {**SMOLLM2, "lora_rank": 16}])
    labels = [line.get_label() for line in lora.axes[0].get_lines() if line.get_marker() == "o"]
    assert labels == ["smollm2 float32, ctx 512, batch 1, default preset, cpu",
                      "smollm2 float32, ctx 512, batch 1, default preset, cpu, LoRA rank 16"]


@pytest.mark.parametrize("bad", [[], {"model": "x"}, {"budgets": []}, {"budgets": [{"cost": 0.8}]}])
def test_a_document_without_measured_budgets_is_refused(bad):
    with pytest.raises(ValueError, match="decode_speed"):
        plot_speed(bad)


def test_without_matplotlib_plot_speed_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'sol-hf\[plots\]'"):
        plot_speed(SMOLLM2)
    assert "sol-hf[plots]" in PLOTS_NEED_MATPLOTLIB


def test_the_benchmark_refuses_plot_without_matplotlib_before_it_runs(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("decode_speed_benchmark", ROOT / "benchmarks" / "decode_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(bench, "load", lambda *a, **k: pytest.fail("the benchmark ran although it cannot plot"))
    monkeypatch.setattr(sys, "argv", ["decode_speed.py", "--plot", "speed.png"])
    with pytest.raises(SystemExit) as info:
        bench.main()
    assert info.value.code == 2
    assert "pip install 'sol-hf[plots]'" in capsys.readouterr().err
