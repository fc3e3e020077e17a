"""Per-token decode time of SmolLM2-135M through SolForCausalLM vs the bare base model (CPU).

Measures, side by side in one process, the decode time per token (time for N new tokens minus
time for 1 new token, divided by N - 1) of:
  * base:        the unwrapped model's ``generate``
  * sol_dense:   the wrapper at ``compute_budget=1.0`` (must cost at most 1.15x base)
  * sol_uniform: the wrapper at a controlled budget with the torch reference ops (for
                 information only: the reference path is for correctness, not speed)
Runs alternate to spread machine noise; medians are reported. Prints JSON.

    python benchmarks/cpu_overhead.py --context 512 --new-tokens 64 --repeats 3
"""

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.assets import smollm2_path
from sol_hf.data import EVAL_SECTIONS, python_docs_texts, text_windows


def decode_ms_per_token(generate, ids, new_tokens):
    start = time.perf_counter()
    generate(ids, max_new_tokens=1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    generate(ids, max_new_tokens=new_tokens)
    full = time.perf_counter() - start
    return 1000 * (full - one) / (new_tokens - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.8)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = smollm2_path()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = text_windows(python_docs_texts(EVAL_SECTIONS[:1]), tokenizer, args.context, max_windows=1)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    wrapped = SolForCausalLM(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), SolConfig())
    common = dict(do_sample=False, attention_mask=torch.ones_like(ids))

    def fixed_length(k):  # never stop early: every run decodes exactly max_new_tokens
        return {**common, **k, "min_new_tokens": k["max_new_tokens"]}

    runs = {
        "base": lambda x, **k: base.generate(x, **fixed_length(k)),
        "sol_dense": lambda x, **k: wrapped.generate(x, compute_budget=1.0, **fixed_length(k)),
        "sol_uniform": lambda x, **k: wrapped.generate(x, compute_budget=args.budget, controller="uniform", **fixed_length(k)),
    }
    with torch.inference_mode():
        for run in runs.values():  # warm-up
            run(ids, max_new_tokens=2)
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(decode_ms_per_token(run, ids, args.new_tokens))
    medians = {name: statistics.median(v) for name, v in times.items()}
    print(json.dumps({
        "benchmark": "cpu_overhead",
        "model": "SmolLM2-135M-Instruct (fp32)",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, no GPU",
        "torch": torch.__version__,
        "context": args.context,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "ms_per_token_median": {k: round(v, 2) for k, v in medians.items()},
        "ms_per_token_all": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "ratio_sol_dense_to_base": round(medians["sol_dense"] / medians["base"], 3),
        "ratio_sol_uniform_to_base": round(medians["sol_uniform"] / medians["base"], 3),
        "uniform_budget": args.budget,
        "uniform_achieved_cost": float(wrapped.last_compute_report.cost[0]) if wrapped.last_compute_report else None,
    }, indent=2))


if __name__ == "__main__":
    main()
