"""Backend selection shared by the ops: Triton when available and the tensors are on CUDA, the
torch path elsewhere. Triton is optional: without it every op uses its torch path.

Tests force Triton on CPU with ``TRITON_INTERPRET=1`` (set before importing ``sol_hf.ops``) and
``set_backend("triton")`` or ``backend="triton"`` on a single call.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton is an optional dependency.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "torch", "triton")
_default_backend = "auto"


def set_backend(backend: str) -> None:
    """Set the process-wide default backend of the ops: ``"auto"`` (Triton on CUDA tensors when
    Triton imports, torch otherwise), ``"torch"`` (always the reference) or ``"triton"`` (always
    the kernels; on CPU this needs ``TRITON_INTERPRET=1`` set before ``sol_hf.ops`` is imported)."""
    global _default_backend
    _check_name(backend)
    _default_backend = backend


def get_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def use_backend(backend: str):
    """Context manager form of :func:`set_backend`."""
    previous = _default_backend
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# Read once, as Triton itself does when it decorates the kernels at import time.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether the kernels were defined for Triton's CPU interpreter."""
    return _INTERPRETING


def use_triton(backend: str | None, *tensors: torch.Tensor) -> bool:
    """Whether to run the Triton kernel for tensors ``tensors`` under ``backend`` (``None`` = the
    process-wide default)."""
    backend = _default_backend if backend is None else backend
    _check_name(backend)
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' was requested but triton is not installed; pip install triton or use backend='torch'")
        if not all(t.is_cuda for t in tensors) and not interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                "importing sol_hf.ops, or use backend='torch'"
            )
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def target_programs(device: torch.device) -> int:
    """About how many programs fill the device: twice the SM count on CUDA, a few on CPU (the
    interpreter runs programs one after another, so more only costs test time)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
