"""What every benchmark's JSON starts with: the script, the date, the machine, its load and the
exact command (imported by the scripts of this folder, which run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import datetime
import os
import platform

import torch


def run_info(benchmark: str, command: str) -> dict:
    """``{"benchmark", "date", "machine", "load_average", "command"}`` for a run starting now."""
    return {
        "benchmark": benchmark,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "load_average": list(os.getloadavg()),
        "command": command,
    }
