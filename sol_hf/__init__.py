"""sol_hf: Self-Optimizing Language Models for Hugging Face Transformers."""

from .actions import ActionSpace, CostModel
from .config import SolConfig
from .modeling import SolComputeReport, SolForCausalLM
from .policy import PolicyController, RandomController, ScheduleController, SolPolicy, SurpriseRuleController, UniformController

__version__ = "0.1.0"

__all__ = [
    "SolConfig",
    "SolForCausalLM",
    "SolPolicy",
    "SolComputeReport",
    "ActionSpace",
    "CostModel",
    "PolicyController",
    "UniformController",
    "RandomController",
    "ScheduleController",
    "SurpriseRuleController",
    "__version__",
]
