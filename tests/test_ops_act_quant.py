"""Per-token fake quantization: fused Triton kernel vs torch reference (bit-identical), reference
vs a brute-force per-element definition."""

import os

import pytest
import torch

from sol_hf.ops import HAS_TRITON
from sol_hf.ops.act_quant import fake_quantize, fake_quantize_naive, fake_quantize_triton

requires_triton = pytest.mark.skipif(
    not (HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="needs triton, and on CPU TRITON_INTERPRET=1 set before sol_hf.ops is imported",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def brute_force(x, bits):
    out = torch.empty_like(x, dtype=torch.float32)
    for n in range(x.shape[0]):
        row, b = x[n].float(), int(bits[n])
        if b >= 16:
            out[n] = row
            continue
        qmax = 2 ** (b - 1) - 1
        absmax = row.abs().max().item()
        scale = absmax / qmax if absmax > 0 else 1.0
        scale = torch.tensor(scale, dtype=torch.float32)
        for d in range(row.shape[0]):
            v = (row[d] / scale).item()
            r = round(v)  # Python rounds half to even
            out[n, d] = torch.tensor(float(min(max(r, -qmax), qmax)), dtype=torch.float32) * scale
    return out.to(x.dtype)


def ties_rows():
    """Rows where x / scale lands exactly on .5 (absmax 7 and bits 4 -> scale 1)."""
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 7.0], [4.5, -4.5, 5.5, 6.5, -7.0, 0.0, 0.25, 0.75]])
    return x, torch.tensor([4, 4])


def test_naive_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 23, generator=g) * 4
    x[3] = 0
    bits = torch.tensor([2, 3, 8, 4, 16])
    assert torch.equal(fake_quantize_naive(x, bits), brute_force(x, bits))
    x, bits = ties_rows()
    assert torch.equal(fake_quantize_naive(x, bits), brute_force(x, bits))


# (dtype, n_rows, dim, bits)
CASES = [
    (torch.float32, 1, 64, [8]),
    (torch.float32, 6, 77, [2, 3, 4, 8, 15, 16]),
    (torch.float32, 4, 5000, [4, 8, 2, 16]),  # several blocks per row
    (torch.float16, 3, 128, [2, 8, 16]),
    (torch.float16, 5, 1000, [3, 4, 5, 6, 7]),
    (torch.bfloat16, 4, 96, [2, 4, 8, 16]),
    (torch.bfloat16, 2, 4096, [8, 3]),
    (torch.float32, 8, 33, [9, 10, 11, 12, 13, 14, 15, 16]),
]


@requires_triton
@pytest.mark.parametrize("dtype,n_rows,dim,bits", CASES)
def test_fake_quantize_triton_is_bit_identical(dtype, n_rows, dim, bits):
    g = torch.Generator().manual_seed(dim)
    x = (torch.randn(n_rows, dim, generator=g) * 3).to(dtype).to(DEVICE)
    if n_rows > 2:
        x[1] = 0  # an all-zero row stays zero
    bits = torch.tensor(bits, device=DEVICE)
    out = fake_quantize_triton(x, bits)
    assert out.dtype == dtype
    assert torch.equal(out, fake_quantize_naive(x, bits))


@requires_triton
def test_fake_quantize_triton_ties_round_half_to_even():
    x, bits = ties_rows()
    out = fake_quantize_triton(x.to(DEVICE), bits.to(DEVICE)).cpu()
    assert torch.equal(out, fake_quantize_naive(x, bits))
    assert out[0, :3].tolist() == [0.0, 2.0, 2.0] and out[1, :4].tolist() == [4.0, -4.0, 6.0, 6.0]


@requires_triton
def test_fake_quantize_triton_strided_input_and_dispatcher():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g).to(DEVICE).t()  # (6, 40) non-contiguous
    bits = torch.tensor([2, 4, 6, 8, 12, 16], device=DEVICE)
    ref = fake_quantize_naive(x, bits)
    assert torch.equal(fake_quantize_triton(x, bits), ref)
    assert torch.equal(fake_quantize(x, bits, backend="triton"), ref)
    assert torch.equal(fake_quantize(x, bits, backend="torch"), ref)
