"""Per-token symmetric activation quantization (quantize then dequantize)."""

from __future__ import annotations

import torch

from ._backend import HAS_TRITON, next_power_of_2, tl, triton, use_triton

__all__ = ["fake_quantize_naive", "fake_quantize", "fake_quantize_triton"]


def fake_quantize_naive(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Round each row of ``x`` to a symmetric ``bits``-bit grid scaled by the row's absmax.

    ``qmax = 2**(bits-1) - 1``, ``scale = absmax / qmax``, ``q = clamp(round(x / scale), -qmax, qmax)``,
    result ``q * scale``; rounding is half-to-even (``torch.round``). ``bits >= 16`` returns the
    row unchanged, an all-zero row stays zero. Arithmetic in float32.

    Args:
        x: (N, D).
        bits: (N,) int, 2..16.
    Returns:
        (N, D) in ``x.dtype``.
    """
    xf = x.float()
    qmax = (torch.pow(2.0, bits.float() - 1.0) - 1.0).unsqueeze(-1)  # (N, 1)
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    q = torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale
    out = torch.where(bits.unsqueeze(-1) >= 16, xf, q)
    return out.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _round_to_bf16(y):
        """Round fp32 to the nearest bf16 value (ties to even), kept in fp32, so the final cast is
        exact whatever the backend's fp32->bf16 conversion does (the interpreter truncates)."""
        b = y.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _fake_quantize_kernel(
        x_ptr, bits_ptr, out_ptr, d,
        stride_xn, stride_xd, stride_b, stride_on, stride_od,
        BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr,
    ):
        """One program per row: absmax reduction, then quantize + dequantize, all in fp32. The row
        is read twice (the second read mostly hits L2) when it spans several blocks."""
        n = tl.program_id(0).to(tl.int64)
        bits = tl.load(bits_ptr + n * stride_b).to(tl.int32)
        x_row = x_ptr + n * stride_xn
        o_row = out_ptr + n * stride_on
        amax = tl.zeros([BLOCK_D], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            xv = tl.load(x_row + offs * stride_xd, mask=offs < d, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(xv))
        absmax = tl.max(amax, 0)
        # qmax = 2**(bits-1) - 1, exact in fp32 (bits clamped to 16 so the shift stays defined).
        qmax = ((1 << (tl.minimum(bits, 16) - 1)) - 1).to(tl.float32)
        # IEEE-rounded division (plain `/` is approximate on GPUs) so the grid equals torch's exactly.
        scale = tl.where(absmax > 0.0, tl.math.div_rn(absmax, qmax), 1.0)
        for d0 in range(0, d, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            mask = offs < d
            xv = tl.load(x_row + offs * stride_xd, mask=mask, other=0.0).to(tl.float32)
            v = tl.math.div_rn(xv, scale + tl.zeros_like(xv))
            # round half to even, as torch.round: floor, then step up above .5 or at .5 from odd.
            r = tl.floor(v)
            frac = v - r
            odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
            r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
            q = tl.minimum(tl.maximum(r, -qmax), qmax) * scale
            y = tl.where(bits >= 16, xv, q)
            if ROUND_BF16:
                y = _round_to_bf16(y)
            tl.store(o_row + offs * stride_od, y.to(out_ptr.dtype.element_ty), mask=mask)


def fake_quantize_triton(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`fake_quantize_naive` (same arguments and bit-identical result: IEEE
    division and explicit round-half-to-even). One fused kernel, one program per row; ``bits``
    (N,) int is read on the device. Supports ``bits`` in 2..16 (>= 16 is the identity)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use fake_quantize_naive or install triton")
    n_rows, d = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n_rows == 0 or d == 0:
        return out
    block_d = min(next_power_of_2(d), 4096)
    _fake_quantize_kernel[(n_rows,)](
        x, bits, out, d, *x.stride(), bits.stride(0), *out.stride(),
        BLOCK_D=block_d, ROUND_BF16=x.dtype == torch.bfloat16, num_warps=4 if block_d <= 1024 else 8,
    )
    return out


def fake_quantize(x: torch.Tensor, bits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Dispatcher: :func:`fake_quantize_triton` on CUDA tensors when Triton imports, else
    :func:`fake_quantize_naive`; ``backend`` = "auto" | "torch" | "triton" (None: the default set
    by ``sol_hf.ops.set_backend``)."""
    if use_triton(backend, x):
        return torch.ops.sol_hf.fake_quantize(x, bits)
    return fake_quantize_naive(x, bits)
