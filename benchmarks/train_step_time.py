"""Wall and CPU time of one SolGRPOTrainer update at the issue's CPU-scaled setting (SmolLM2).

The work per update matches the authors' reference run that took 18.3 s on 2 CPU cores:
context 256, 4 windows x 8 counterfactual schedules x 16 controlled steps, the 3x3x3 grid
(attention keep {0.1, 0.6, 1.0}, MLP keep {0.4, 0.8, 1.0}, bits {5, 7, 16}). Runs ``--steps``
updates on Python-docs training text and reports each update's time from a Trainer callback,
dropping the first (warm-up). Prints JSON.

    python benchmarks/train_step_time.py --steps 5 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback

REFERENCE_SECONDS = 18.3  # the authors' code, same work, 2 CPU cores (issue 4)


class UpdateTimer(TrainerCallback):
    """Wall and process-CPU seconds of every optimizer update (rollout, loss, backward, step)."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.process_time() - self._cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-windows", type=int, default=200, help="training windows to tokenize (enough for the steps)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sol_hf.training import train_policy

    timer = UpdateTimer()
    with tempfile.TemporaryDirectory() as out:
        train_policy(
            None, f"{out}/policy", steps=args.steps, seed=0, context_length=256, rollout_steps=16,
            windows_per_step=4, num_generations=8, max_windows=args.max_windows, progress=False,
            grid={"attention_keep": (0.1, 0.6, 1.0), "activation_keep": (0.4, 0.8, 1.0), "bits": (5, 7, 16)},
            callbacks=[timer],
        )
    wall, cpu = timer.wall[1:], timer.cpu[1:]
    print(json.dumps({
        "benchmark": "train_step_time",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, torch threads {args.threads}, GPU: none",
        "command": f"python benchmarks/train_step_time.py --steps {args.steps} --threads {args.threads}",
        "work_per_update": "SmolLM2-135M fp32, context 256, 4 windows x 8 schedules x 16 steps, 3x3x3 grid",
        "updates_timed": len(wall),
        "wall_s_per_update_median": round(statistics.median(wall), 3),
        "cpu_s_per_update_median": round(statistics.median(cpu), 3),
        "wall_s_all": [round(x, 3) for x in timer.wall],
        "speedup_vs_reference_18_3_s": round(REFERENCE_SECONDS / statistics.median(wall), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
