"""One readable line per policy update, instead of the trainer's raw log dictionaries."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from transformers import TrainerCallback

__all__ = ["UpdateLines"]


class UpdateLines(TrainerCallback):
    """Prints ``update 3/20: 8.3 s, reward -2.51, cost 0.92, entropy 1.35; about 2 min left`` after
    each logged update (the remaining time from the mean update time so far)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream
        self.started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs or self.started is None:
            return
        done, total = state.global_step, state.max_steps
        elapsed = time.perf_counter() - self.started
        left = elapsed / max(done, 1) * max(total - done, 0)
        figures = [f"{float(logs['step_time']):.1f} s" if "step_time" in logs else None,
                   f"reward {float(logs['reward']):.3f}",
                   f"cost {float(logs['budget/cost']):.3f}" if "budget/cost" in logs else None,
                   f"entropy {float(logs['entropy']):.2f}" if "entropy" in logs else None]
        eta = f"about {left / 60:.0f} min left" if left >= 90 else f"about {left:.0f} s left"
        line = f"update {done}/{total}: " + ", ".join(f for f in figures if f) + (f"; {eta}" if done < total else "")
        print(line, file=self.stream or sys.stderr, flush=True)
