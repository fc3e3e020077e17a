"""How much OpenMP's spinning waits cost on shared cores: the same short decode, each repeat in a
fresh process with ``OMP_WAIT_POLICY`` unset (libgomp spins about 300,000 times before sleeping)
and with ``OMP_WAIT_POLICY=PASSIVE`` (what ``sol-hf`` sets), alternating, with the load average
before each run. Prints JSON; the ratio is unset / PASSIVE wall time per repeat.

    HF_HUB_OFFLINE=1 python benchmarks/omp_wait_policy.py --repeats 3 --threads 2

The timed part: ``SolForCausalLM.generate`` on the embedded SmolLM2-135M (fp32, default
``SolConfig``), a 256-token prompt, ``--new-tokens`` tokens at budget 0.8 with the uniform
controller, after a 2-token warm-up. Model loading is not timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
from transformers import AutoModelForCausalLM
from sol_hf import SolConfig, SolForCausalLM
from sol_hf.assets import smollm2_path
model = SolForCausalLM(AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval(), SolConfig())
ids = torch.randint(100, 40000, (1, 256), generator=torch.Generator().manual_seed(0))
kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), compute_budget=0.8, controller="uniform")
with torch.inference_mode():
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
    wall, cpu = time.perf_counter(), time.process_time()
    n = int(sys.argv[2])
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
print("RESULT " + json.dumps({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}))
"""


def run_once(policy: str | None, threads: int, new_tokens: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    load = os.getloadavg()
    done = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(new_tokens)], env=env, capture_output=True,
                          text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return {"policy": policy or "unset", "load_before": [round(x, 2) for x in load], **json.loads(line[len("RESULT "):])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs, alternating unset / PASSIVE (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each run (default 2)")
    parser.add_argument("--new-tokens", type=int, default=24, help="timed decode tokens per run (default 24)")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        for policy in (None, "PASSIVE"):
            runs.append(run_once(policy, args.threads, args.new_tokens))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    unset = [r["wall_s"] for r in runs if r["policy"] == "unset"]
    passive = [r["wall_s"] for r in runs if r["policy"] == "PASSIVE"]
    ratios = [u / p for u, p in zip(unset, passive)]
    print(json.dumps({
        "benchmark": "omp_wait_policy",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads, "new_tokens": args.new_tokens, "runs": runs,
        "wall_s_unset": [round(x, 2) for x in unset], "wall_s_passive": [round(x, 2) for x in passive],
        "ratio_unset_over_passive": [round(x, 2) for x in ratios], "median_ratio": round(statistics.median(ratios), 2),
    }, indent=1))


if __name__ == "__main__":
    main()
