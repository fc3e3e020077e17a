"""sol-hf CLI, run in-process through main([...]) on a tiny random model saved with a tiny tokenizer."""

import json
import os
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sol_hf.cli import main, parse_budget, CLIError

TEXT = (
    "The quick brown fox jumps over the lazy dog. Python is a programming language that lets you work quickly "
    "and integrate systems more effectively. A list is a mutable sequence; a tuple is an immutable one. "
) * 3


@pytest.fixture(autouse=True)
def _omp_wait_policy_as_the_run_started():
    """``main`` sets OMP_WAIT_POLICY in this process unless it is set (``setdefault``); put the
    variable back after each test, so that later test files see the environment the run began
    with (OpenMP itself read it at load and is not affected either way)."""
    before = os.environ.get("OMP_WAIT_POLICY")
    yield
    if before is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = before


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved tiny Llama (vocab 300) with a byte-level BPE tokenizer trained on TEXT."""
    path = tmp_path_factory.mktemp("tiny-base")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, bos_token_id=fast.bos_token_id,
                      eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sol_config_file(tmp_path_factory):
    """A small untrained policy (the default one is sized for real models)."""
    from sol_hf import SolConfig

    path = tmp_path_factory.mktemp("cfg") / "sol_config.json"
    SolConfig(page_size=4, sink_tokens=4, recent_tokens=4, policy_hidden_size=16, policy_heads=2,
              action_embedding_size=8).save_pretrained(path.parent)
    return path


@pytest.fixture(scope="module")
def docs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    for section in ("tutorial", "faq", "library", "howto", "whatsnew", "reference"):
        (root / section).mkdir()
        for i in range(2):
            (root / section / f"page{i}.rst.txt").write_text(TEXT + f" Section {section}, page {i}. " + TEXT)
    return root


def run_error(argv, capsys) -> str:
    """Run main(argv), expect exit code 2 and a one-line message without a traceback."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("sol-hf: error: "), err  # the message is one line ...
    assert err.rstrip().endswith(lines[0]), err  # ... and the last thing printed
    return lines[0]


def eval_args(base_dir, docs_root, *extra, config=None):
    cfg = ["--sol-config", str(config)] if config else []
    return ["eval", "--base", str(base_dir), *cfg, "--text-root", str(docs_root), "--sections", "tutorial,faq",
            "--context-length", "32", "--steps", "4", "--windows", "4", "--batch-size", "2", "--random-seeds", "2",
            "--no-progress", *extra]


def test_eval_writes_json_and_markdown(base_dir, docs_root, sol_config_file, tmp_path, capsys):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    assert main(eval_args(base_dir, docs_root, "--budgets", "0.9", "attention=0.5,activation=0.8", "--output", str(out),
                          "--markdown", str(md), config=sol_config_file)) == 0
    data = json.loads(out.read_text())
    assert data["protocol"]["windows"] == 4 and data["protocol"]["controlled_steps"] == 4
    assert [b["label"] for b in data["budgets"]] == ["0.9", "attention=0.5,activation=0.8"]
    assert data["metadata"]["sections"] == ["tutorial", "faq"]
    printed = capsys.readouterr().out
    assert "| - | dense |" in printed and md.read_text() in printed


def test_eval_sweep_writes_every_schedule_json_markdown_and_plot(base_dir, docs_root, sol_config_file, tmp_path, capsys):
    out, md, png = tmp_path / "s.json", tmp_path / "s.md", tmp_path / "s.png"
    assert main(eval_args(base_dir, docs_root, "--sweep", "--budgets", "0.7", "0.9", "--validation-windows", "2",
                          "--output", str(out), "--markdown", str(md), "--plot", str(png), config=sol_config_file)) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "sweep" and [e["budget"] for e in data["budgets"]] == [0.7, 0.9]
    assert set(data["budgets"][0]["schedules"]) == {"uniform", "best_static", "surprise", "random"}  # no policy given
    assert data["metadata"]["validation_sections"] == ["library", "howto", "whatsnew"]  # never the evaluated sections
    assert md.read_text() in capsys.readouterr().out and png.stat().st_size > 0
    assert "at least two" in run_error(eval_args(base_dir, docs_root, "--sweep", "--budgets", "0.7", config=sol_config_file), capsys)
    assert "unified budgets" in run_error(eval_args(base_dir, docs_root, "--sweep", "--budgets", "0.7", "activation=0.5",
                                                    config=sol_config_file), capsys)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--budgets", "1.5"], "bad budget '1.5'"),
        (["--budgets", "abc"], "bad budget 'abc'"),
        (["--budgets", "attention=0.5,speed=2"], "unknown axes"),
        (["--budgets", "bits=40"], "bits"),
        (["--budgets", "0.01"], "below the cheapest reachable cost"),
        (["--windows", "0"], "--windows must be a positive integer"),
        (["--policy", "/nonexistent/policy"], "policy /nonexistent/policy does not exist"),
        (["--output", "/nonexistent/dir/r.json"], "folder /nonexistent/dir does not exist"),
    ],
)
def test_eval_errors_are_one_line_exit_2(base_dir, docs_root, sol_config_file, capsys, extra, needle):
    assert needle in run_error(eval_args(base_dir, docs_root, *extra, config=sol_config_file), capsys)


def test_policy_too_large_for_any_cost_budget(base_dir, docs_root, tmp_path, capsys):
    """A policy whose weights outweigh what this tiny model's cheapest action saves: say so."""
    from sol_hf import SolConfig

    SolConfig(policy_hidden_size=256, policy_heads=4, policy_layers=2).save_pretrained(tmp_path)
    err = run_error(eval_args(base_dir, docs_root, "--budgets", "0.9", config=tmp_path / "sol_config.json"), capsys)
    assert "no budget below 1.0 is reachable" in err


def test_bad_base_and_text_paths(base_dir, docs_root, tmp_path, capsys):
    assert "does not exist" in run_error(["eval", "--base", str(tmp_path / "missing")], capsys)
    assert "--sol-config" in run_error(eval_args(base_dir, docs_root, config=tmp_path / "nope.json"), capsys)
    assert "has no config.json" in run_error(["eval", "--base", str(tmp_path)], capsys)
    err = run_error(eval_args(base_dir, docs_root, "--sections", "nosuchsection"), capsys)
    assert "no *.rst.txt files" in err
    err = run_error(["eval", "--base", str(base_dir), "--text-root", str(tmp_path / "nodocs"), "--no-progress"], capsys)
    assert "not found" in err
    policy_file = tmp_path / "policy.bin"
    policy_file.write_bytes(b"x")
    assert "is a file" in run_error(eval_args(base_dir, docs_root, "--policy", str(policy_file)), capsys)
    empty_policy = tmp_path / "empty-policy"
    empty_policy.mkdir()
    assert "could not load" in run_error(eval_args(base_dir, docs_root, "--policy", str(empty_policy)), capsys)


def test_unknown_command_and_options(capsys):
    assert "invalid choice" in run_error(["frobnicate"], capsys)
    assert "unrecognized arguments" in run_error(["eval", "--bogus"], capsys)


def test_generate_prints_text_and_compute_report(base_dir, sol_config_file, capsys):
    assert main(["generate", "--base", str(base_dir), "--sol-config", str(sol_config_file), "--prompt", "The quick brown fox", "--budget", "0.9",
                 "--controller", "uniform", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The quick brown fox")
    assert "SolComputeReport(uniform, " in out and "cost " in out
    assert main(["generate", "--base", str(base_dir), "--prompt", "A list", "--max-new-tokens", "3"]) == 0
    assert "dense" in capsys.readouterr().out


def test_generate_unreachable_budget(base_dir, capsys):
    err = run_error(["generate", "--base", str(base_dir), "--prompt", "hi", "--budget", "0.05", "--controller", "uniform"], capsys)
    assert "below the cheapest reachable cost" in err


def test_parse_budget():
    assert parse_budget("0.85") == 0.85
    assert parse_budget("attention=0.5, activation=0.8,bits=8") == {"attention": 0.5, "activation": 0.8, "bits": 8.0}
    for bad in ("0", "-1", "nan", "attention", "attention=x", "=0.5"):
        with pytest.raises(CLIError):
            parse_budget(bad)


def tiny_training_args(docs_root):
    return ["--text-root", str(docs_root), "--steps", "1", "--context-length", "16", "--rollout-steps", "3",
            "--windows-per-step", "1", "--num-generations", "2", "--budget-mode", "per_axis", "--no-progress", "--threads", "1"]


def test_train_writes_a_policy_that_eval_loads(base_dir, docs_root, tmp_path, capsys):
    pytest.importorskip("trl")
    out = tmp_path / "policy"
    assert main(["train", "--base", str(base_dir), "--output-dir", str(out), *tiny_training_args(docs_root)]) == 0
    assert (out / "sol_config.json").is_file() and (out / "policy.safetensors").is_file()
    assert "1 updates in" in capsys.readouterr().out
    assert main(["eval", "--base", str(base_dir), "--policy", str(out), "--text-root", str(docs_root), "--context-length", "16",
                 "--steps", "3", "--windows", "2", "--random-seeds", "1", "--budgets", "attention=0.5", "--no-progress"]) == 0


def test_train_errors(base_dir, docs_root, tmp_path, capsys):
    err = run_error(["train", "--base", str(base_dir), "--output-dir", str(tmp_path / "p"), "--text-root", str(tmp_path / "none")], capsys)
    assert "not found" in err
    assert "--output-dir" in run_error(["train", "--base", str(base_dir)], capsys)
    assert "LOW,HIGH" in run_error(["train", "--output-dir", str(tmp_path), "--cost-budget-range", "0.5"], capsys)


def test_demo_runs_end_to_end_on_a_tiny_model(base_dir, docs_root, tmp_path, capsys):
    pytest.importorskip("trl")
    run = tmp_path / "demo"
    training = [a for a in tiny_training_args(docs_root) if a != "--no-progress"]  # the progress lines are checked
    args = ["demo", "--base", str(base_dir), *training, "--eval-windows", "2", "--random-seeds", "1", "--output-dir", str(run)]
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "| - | dense |" in printed and "**policy**" in printed and "demo:" in printed
    assert "In this short run, at budget " in printed  # one sentence says what won
    # readable progress: one line per update, no raw log dictionaries
    assert "update 1/" in captured.err and "{'loss'" not in captured.err and "{'loss'" not in printed
    data = json.loads((run / "demo.json").read_text())
    assert len(data["budgets"]) == 2 and data["run"]["train_wall_s"] > 0
    assert (run / "demo.md").read_text().startswith(printed.split("| budget |")[0].strip().splitlines()[-1][:20])
    assert (run / "policy" / "policy.safetensors").is_file()
    if __import__("importlib").util.find_spec("matplotlib"):
        assert (run / "demo.png").stat().st_size > 10_000
    for sentence in (str(run / "demo.json"), str(run / "demo.md")):
        assert sentence in printed


def test_help_does_not_import_torch():
    """``sol-hf --help`` answers at once: building the parser and printing help loads neither
    torch nor transformers (they took about 10 s before the package's names loaded lazily)."""
    import subprocess

    code = (
        "import sys\n"
        "from sol_hf.cli import main\n"
        "for argv in ([], ['eval', '--help'], ['train', '--help'], ['generate', '--help'], ['demo', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "HEAVY []" in out, out[-500:]
    import sol_hf

    assert sol_hf.SolConfig().num_actions == 16  # the lazy names still resolve
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        sol_hf.Nope  # noqa: B018


@pytest.mark.parametrize("given, spin_count", [(None, "0"), ("ACTIVE", "30000000000")])
def test_sol_hf_makes_openmp_threads_wait_passively_unless_told_otherwise(base_dir, sol_config_file, given, spin_count):
    """``main`` sets OMP_WAIT_POLICY=PASSIVE before a command imports torch, so the OpenMP runtime
    torch loads does not spin (libgomp reports its spin count with OMP_DISPLAY_ENV=VERBOSE: 0 for
    PASSIVE, 300000 when unset); a value the user set is kept."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **({"OMP_WAIT_POLICY": given} if given else {}))
    code = ("import os, sys\n"
            "assert 'torch' not in sys.modules\n"
            "from sol_hf.cli import main\n"
            f"main(['range', '--base', {str(base_dir)!r}, '--sol-config', {str(sol_config_file)!r}, '--context-lengths', '64'])\n"
            "print('POLICY', os.environ['OMP_WAIT_POLICY'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"POLICY {given or 'PASSIVE'}" in done.stdout
    assert "| 64 |" in done.stdout  # the command ran (and imported torch after main set the policy)
    if "GOMP_SPINCOUNT" not in done.stderr:
        pytest.skip("torch's OpenMP runtime is not libgomp: its wait settings cannot be read back")
    assert f"GOMP_SPINCOUNT = '{spin_count}'" in done.stderr, done.stderr[-2000:]


def test_the_embedded_model_cache_follows_the_hf_conventions(monkeypatch, tmp_path):
    from sol_hf.assets import default_model_cache

    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_cache() == str(tmp_path / "xdg" / "huggingface" / "sol_hf" / "smollm2-135m")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_model_cache() == str(tmp_path / "hf" / "sol_hf" / "smollm2-135m")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_cache() == str(tmp_path / "home" / ".cache" / "huggingface" / "sol_hf" / "smollm2-135m")


def test_range_prints_what_budget_range_answers(base_dir, sol_config_file, capsys):
    from sol_hf import SolConfig, SolForCausalLM
    from transformers import AutoModelForCausalLM

    assert main(["range", "--base", str(base_dir), "--sol-config", str(sol_config_file), "--context-lengths", "16", "64"]) == 0
    out = capsys.readouterr().out
    model = SolForCausalLM(AutoModelForCausalLM.from_pretrained(base_dir), SolConfig.from_json_file(sol_config_file))
    for length in (16, 64):
        uniform, policy = (model.budget_range(length, c)[0] for c in ("uniform", "policy"))
        show = lambda low: "none below 1.0" if low >= 1.0 else f"{low:.3f}"  # noqa: E731
        assert f"| {length} | {show(uniform)} | {show(policy)} |" in out


def test_range_with_calibrate_uses_the_measured_read_factor(base_dir, sol_config_file, capsys, monkeypatch):
    """--calibrate measures the factor first; the printed range is what budget_range answers with it."""
    from sol_hf import SolConfig, SolForCausalLM
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(SolForCausalLM, "calibrate_sparse_read_factor", _fixed_calibration)
    assert main(["range", "--base", str(base_dir), "--sol-config", str(sol_config_file), "--context-lengths", "64",
                 "--calibrate"]) == 0
    captured = capsys.readouterr()
    assert "sparse read factor 4.00" in captured.err
    model = SolForCausalLM(AutoModelForCausalLM.from_pretrained(base_dir), SolConfig.from_json_file(sol_config_file))
    shipped = model.budget_range(64, "uniform")[0]
    _fixed_calibration(model)
    calibrated = model.budget_range(64, "uniform")[0]
    assert shipped < 1.0 <= calibrated  # a kept-row op this slow never pays: nothing below 1.0 is reachable
    assert "| 64 | none below 1.0 |" in captured.out


def _fixed_calibration(model):
    """What calibrate_sparse_read_factor does, with a measured factor of 4.0 (no timing): no keep of the grid pays."""
    key = f"cpu:{model.cost_model.bytes.weight_dtype}"
    model.sparse_linear_read_factor[key] = 4.0
    return {"key": key, "factor": 4.0, "dense_ms": 1.0, "repeats": 1,
            "levels": {k: {"ms": 1.0, "time_ratio": 4.0 * k, "byte_fraction": k, "factor": 4.0}
                       for k in model.space.activation_keep if k < 1.0}}


def test_generate_without_a_policy_says_what_the_policy_controller_would_do(base_dir, sol_config_file, capsys):
    assert main(["generate", "--base", str(base_dir), "--sol-config", str(sol_config_file), "--prompt", "The quick brown fox",
                 "--budget", "0.9", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "untrained (random) policy; pass --policy, or use --controller uniform" in err
    assert "baselines" not in err


def test_eval_reads_text_files_and_saved_datasets_alike(base_dir, sol_config_file, tmp_path, capsys):
    """The same documents as plain files and as a saved ``datasets`` dataset give the same windows,
    so the same dense perplexity."""
    from datasets import Dataset, DatasetDict

    docs = [TEXT + f" Document {i}. " + TEXT for i in range(3)]
    files = []
    for i, doc in enumerate(docs):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(doc, encoding="utf-8")
    DatasetDict({"train": Dataset.from_dict({"body": ["unused"]}), "test": Dataset.from_dict({"body": docs})}).save_to_disk(
        str(tmp_path / "ds"))
    common = ["eval", "--base", str(base_dir), "--sol-config", str(sol_config_file), "--context-length", "32", "--steps", "4",
              "--windows", "4", "--batch-size", "2", "--random-seeds", "1", "--budgets", "0.9", "--no-progress"]
    results = []
    for source in (["--text-files", *map(str, files)], ["--dataset", str(tmp_path / "ds"), "--dataset-column", "body"]):
        out = tmp_path / f"r{len(results)}.json"
        assert main([*common, *source, "--output", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    capsys.readouterr()
    assert results[0]["dense"]["window_nll"] == results[1]["dense"]["window_nll"]
    assert results[1]["metadata"]["dataset_column"] == "body"
    err = run_error([*common, "--dataset", str(tmp_path / "ds")], capsys)
    assert "no column 'text'" in err and "--dataset-column" in err
    assert "does not combine" in run_error([*common, "--text-files", str(files[0]), "--sections", "faq"], capsys)
    assert "is not a file" in run_error([*common, "--text-files", str(tmp_path / "missing.txt")], capsys)


def test_eval_plot_has_the_right_axes_and_one_line_per_schedule(base_dir, docs_root, sol_config_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from sol_hf.evaluation import plot_evaluation

    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(eval_args(base_dir, docs_root, "--budgets", "0.9", "0.8", "--output", str(out), "--plot", str(png),
                          config=sol_config_file)) == 0
    assert f"plot: {png}" in capsys.readouterr().out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.read_text())
    fig = plot_evaluation(data)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "achieved cost (bytes read / dense step)"
    assert ax.get_ylabel() == "perplexity (controlled tokens)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["dense", "policy", "uniform (cost-matched)", "uniform (per-axis matched)", "random (best seed)",
                      "random (mean of seeds)"]
    # each schedule's line passes through its (cost, ppl) at both budgets
    uniform = sorted((b["uniform"]["cost"], b["uniform"]["ppl"]) for b in data["budgets"])
    line = next(c for c in ax.containers if c.get_label() == "uniform (cost-matched)").lines[0]
    torch.testing.assert_close(torch.tensor(line.get_xydata(), dtype=torch.float64), torch.tensor(uniform, dtype=torch.float64))


def test_eval_plot_without_matplotlib_says_how_to_get_it(base_dir, docs_root, sol_config_file, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    err = run_error(eval_args(base_dir, docs_root, "--plot", str(tmp_path / "r.png"), config=sol_config_file), capsys)
    assert "pip install 'sol-hf[plots]'" in err


def test_sol_config_takes_a_preset_name(base_dir, capsys):
    from sol_hf import SolConfig, SolForCausalLM
    from transformers import AutoModelForCausalLM

    assert main(["range", "--base", str(base_dir), "--sol-config", "int8-weights", "--context-lengths", "64"]) == 0
    out = capsys.readouterr().out
    model = SolForCausalLM(AutoModelForCausalLM.from_pretrained(base_dir), SolConfig.from_preset("int8-weights"))
    assert f"| 64 | {model.budget_range(64, 'uniform')[0]:.3f} |" in out
    assert "a preset: default, int8-weights, paper" in run_error(["range", "--base", str(base_dir), "--sol-config", "int4"], capsys)
