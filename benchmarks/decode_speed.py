"""Decode time per token against the executed cost the report counts, per budget.

Side by side in one process, alternating the variants every repeat; every decode step of every
run is timed (the gap between two emitted tokens) and the median over all of them is reported:
  * base:       an untouched copy of the model, transformers' ``generate`` (sdpa, dynamic cache)
  * budget b:   ``SolForCausalLM.generate(compute_budget=b, controller="uniform")`` for each b of
                a ladder from 1.0 down to the lowest reachable budget at this context length
The prefill (and the first new token it yields) is excluded. For each budget it prints the ratio time(b) / time(base), the achieved executed
cost (``last_compute_report.cost``, the bytes the ops counted) and whether the ratio is within
1.15x of the cost. Prints JSON; ``--output`` also writes it, ``--plot`` a PNG of the time ratio
against the executed cost (``sol_hf.evaluation.plot_speed``; needs matplotlib, the ``plots`` extra).

    python benchmarks/decode_speed.py --model smollm2 --context 512 --batch 1 --repeats 5
    python benchmarks/decode_speed.py --model llama-1b-shape --dtype bfloat16 --context 512 --new-tokens 16
    python benchmarks/decode_speed.py --model llama-8b-shape --device cuda --dtype bfloat16 --context 8192
    python benchmarks/decode_speed.py --model smollm2 --lora-rank 16   # a PEFT LoRA model as the base
    python benchmarks/decode_speed.py --model smollm2 --cache static --calibrate  # both decode with a StaticCache;
                                                     # the CPU read factor measured on the model first

Models: ``smollm2`` (the embedded real SmolLM2-135M-Instruct, real text prompts) or random-weight
Llama shapes ``llama-1b-shape`` (Llama-3.2-1B) and ``llama-8b-shape`` (Llama-3.1-8B).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.config import PRESETS

SHAPES = {
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}


def load(name: str, dtype: torch.dtype, device: str, context: int, batch: int):
    """(model, prompt ids (batch, context)) on ``device``."""
    if name == "smollm2":
        from transformers import AutoTokenizer

        from sol_hf.assets import smollm2_path
        from sol_hf.data import EVAL_SECTIONS, python_docs_texts, text_windows

        path = smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        try:
            ids = text_windows(python_docs_texts(EVAL_SECTIONS[:1]), tokenizer, context, max_windows=batch)
        except (FileNotFoundError, ValueError):  # no Python docs installed: a repeated paragraph
            text = "Decode speed should follow the bytes each step reads. " * (context // 8 + 1)
            ids = tokenizer([text] * batch, return_tensors="pt").input_ids[:, :context]
        return model, ids.to(device)
    config = LlamaConfig(**SHAPES[name], max_position_embeddings=max(context * 2, 4096))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    return model, ids.to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _TokenClock(BaseStreamer):
    """Time stamps of every token ``generate`` emits (the first ``put`` is the prompt)."""

    def __init__(self, device: str):
        self.device = device
        self.stamps: list[float] = []

    def put(self, value) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_step_ms(generate, ids, new_tokens: int, device: str) -> list[float]:
    """Per-token decode times (ms) of one ``generate`` call: the gaps between consecutive new
    tokens, the first new token (which comes from the prefill) excluded."""
    clock = _TokenClock(device)
    generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
             attention_mask=torch.ones_like(ids), streamer=clock if ids.shape[0] == 1 else None,
             stopping_criteria=None if ids.shape[0] == 1 else [_ClockCriterion(clock)])
    gaps = [1000 * (b - a) for a, b in zip(clock.stamps[2:], clock.stamps[3:])] if ids.shape[0] == 1 else \
        [1000 * (b - a) for a, b in zip(clock.stamps[1:], clock.stamps[2:])]
    return gaps


class _ClockCriterion(StoppingCriteria):
    """Batched inputs cannot stream: a stopping criterion (called after every step) stamps instead."""

    def __init__(self, clock: _TokenClock):
        self.clock = clock

    def __call__(self, input_ids, scores, **kwargs):
        self.clock.put(None)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", *SHAPES])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budgets", type=float, nargs="*", help="default: 1.0 down to the lowest reachable in 5 steps")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="SolConfig.from_preset(...)")
    parser.add_argument("--cache", default="dynamic", choices=["dynamic", "static"],
                        help="the KV cache both base and SOL decode with: transformers' DynamicCache (grows by torch.cat, "
                             "copying every layer's K/V each step) or StaticCache (written in place; not compiled here)")
    parser.add_argument("--static-baseline", action="store_true",
                        help="also time transformers' fastest dense decode: generate(cache_implementation='static'), "
                             "which compiles the step with torch.compile (first call compiles: tens of seconds)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="> 0: wrap the model in a PEFT LoRA adapter of this rank on every linear projection of the "
                             "decoder (random weights, unmerged); base and SOL both decode the PeftModel")
    parser.add_argument("--calibrate", action="store_true",
                        help="CPU: measure the sparse read factor on the model first (model.calibrate_sparse_read_factor) "
                             "instead of using the shipped one")
    parser.add_argument("--output", help="also write the JSON here")
    parser.add_argument("--plot", metavar="PNG",
                        help="write a PNG of time per token relative to the base model against the executed cost, "
                             "one line per configuration (needs matplotlib: pip install 'sol-hf[plots]')")
    args = parser.parse_args()
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:  # say so before the benchmark runs
            parser.error("--plot needs matplotlib: pip install 'sol-hf[plots]' (or pip install matplotlib); "
                         "or drop --plot and draw the --output JSON later with sol_hf.evaluation.plot_speed")
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            parser.error(f"--plot {args.plot}: folder {folder} does not exist")
    dtype = getattr(torch, args.dtype)
    loaded, ids = load(args.model, dtype, args.device, args.context, args.batch)
    if args.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        loaded = get_peft_model(loaded, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, target_modules="all-linear",
                                                   init_lora_weights=False)).eval()
    # Both variants get a private copy, so their weights live in the same kind of memory (a model
    # fresh from from_pretrained may still read memory-mapped file pages).
    base = copy.deepcopy(loaded)
    wrapped = SolForCausalLM(copy.deepcopy(loaded), SolConfig.from_preset(args.preset))
    del loaded
    calibration = wrapped.calibrate_sparse_read_factor() if args.calibrate else None
    low = wrapped.budget_range(args.context + 1)[0]
    budgets = args.budgets or [round(1.0 - i * (1.0 - low) / 4, 3) for i in range(5)]
    budgets = [max(b, round(low + 5e-4, 3)) for b in budgets]
    cache_kwargs = {"cache_implementation": "static"} if args.cache == "static" else {}
    runs = {"base": lambda x, **k: base.generate(x, **cache_kwargs, **k)}
    if args.static_baseline:
        runs["base_static_compiled"] = lambda x, **k: base.generate(x, cache_implementation="static", **k)
    for b in budgets:
        runs[f"budget_{b}"] = lambda x, _b=b, **k: wrapped.generate(x, compute_budget=_b, controller="uniform", **cache_kwargs, **k)
    times: dict[str, list[float]] = {name: [] for name in runs}
    reports: dict[str, dict] = {}
    with torch.inference_mode():
        for run in runs.values():  # warm-up
            run(ids, max_new_tokens=2, do_sample=False, attention_mask=torch.ones_like(ids))
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].extend(decode_step_ms(run, ids, args.new_tokens, args.device))
                if name.startswith("budget_"):
                    report = wrapped.last_compute_report
                    reports[name] = {
                        "cost": 1.0 if report is None else round(float(report.cost.mean()), 4),
                        "standalone_cost": 1.0 if report is None else round(float(report.standalone_cost.mean()), 4),
                        "nominal_cost": 1.0 if report is None else round(float(report.nominal_cost.mean()), 4),
                        "activation_keep": 1.0 if report is None else round(float(report.activation_keep.mean()), 4),
                        "attention_read": 1.0 if report is None else round(float(report.attention_read.mean()), 4),
                        "bits": 16.0 if report is None else round(float(report.bits.mean()), 2),
                    }
    base_ms = statistics.median(times["base"])
    rows = []
    for b in budgets:
        name = f"budget_{b}"
        ms = statistics.median(times[name])
        ratio = ms / base_ms
        cost = reports[name]["cost"]
        rows.append({"budget": b, "ms_per_token": round(ms, 3), "time_ratio_to_base": round(ratio, 3), **reports[name],
                     "ratio_over_cost": round(ratio / cost, 3), "within_1.15x_of_cost": ratio <= 1.15 * cost})
    result = {
        "benchmark": "decode_speed",
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),  # decides what waking threads costs (see docs/benchmarks.md)
        "torch": torch.__version__,
        "context": args.context,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "preset": args.preset,
        "cache": args.cache,
        "lora_rank": args.lora_rank,
        "calibration": calibration,
        "sparse_linear_read_factor": dict(wrapped.sparse_linear_read_factor),
        "lowest_reachable_budget": round(low, 4),
        "prepared_weight_mib": round(wrapped.prepared_weight_bytes / 2**20, 1),
        "base_ms_per_token": round(base_ms, 3),
        "base_static_compiled_ms_per_token": round(statistics.median(times["base_static_compiled"]), 3)
        if args.static_baseline else None,
        "budgets": rows,
        "ms_per_token_quartiles": {k: [round(q, 3) for q in statistics.quantiles(v, n=4)] for k, v in times.items()},
        "samples_per_variant": len(times["base"]),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if args.plot:
        from sol_hf.evaluation import plot_speed

        plot_speed(result, args.plot, title=f"{args.model} {args.dtype}, ctx {args.context}, batch {args.batch}")
        print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
