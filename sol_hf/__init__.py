"""sol_hf: Self-Optimizing Language Models for Hugging Face Transformers.

The public names load on first use (as transformers does), so ``sol-hf --help`` and other light
imports do not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "SolConfig": "config",
    "SolForCausalLM": "modeling",
    "SolComputeReport": "modeling",
    "SolPolicy": "policy",
    "ActionSpace": "actions",
    "CostModel": "actions",
    "PolicyController": "policy",
    "UniformController": "policy",
    "RandomController": "policy",
    "ScheduleController": "policy",
    "SurpriseRuleController": "policy",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .actions import ActionSpace, CostModel
    from .config import SolConfig
    from .modeling import SolComputeReport, SolForCausalLM
    from .policy import PolicyController, RandomController, ScheduleController, SolPolicy, SurpriseRuleController, UniformController


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'sol_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
