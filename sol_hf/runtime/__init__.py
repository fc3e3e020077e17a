"""The runtime of a wrapped model, one module per concern:

* ``state.py``      what a controlled forward call carries (:class:`StepState`, :class:`Runtime`)
* ``step.py``       the controlled step: observe, decide, set actions, account (:class:`ControlledStep`)
* ``attention.py``  where attention actions execute (SOL's registered attention function)
* ``mlp.py``        where MLP actions execute (patched projections reading only kept weight rows)
* ``accounting.py`` the byte inventory of a model and the per-generate :class:`SolComputeReport`
"""

from .accounting import SolComputeReport, measure_step_bytes
from .state import HostPlan, Runtime, StepState
from .step import ControlledStep

__all__ = ["ControlledStep", "HostPlan", "Runtime", "SolComputeReport", "StepState", "measure_step_bytes"]
