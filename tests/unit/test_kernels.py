"""The C kernels against references nobody here wrote: gguf's own quantizers and dequantizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from fulmine import kernels
from fulmine.executors.cpu_fused import KERNEL_MAX_ROWS
from fulmine.layers.quantized import QuantizedWeight, quantize

pytestmark = pytest.mark.skipif(kernels.cpu() is None, reason="C kernels not built")

TYPES = {
    kernels.Q8_0: GGMLQuantizationType.Q8_0,
    kernels.Q4_0: GGMLQuantizationType.Q4_0,
    kernels.Q4_1: GGMLQuantizationType.Q4_1,
}


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Rows as the kernel's fast mode sees them: int8 per block of 32 with scale amax / 127."""
    rows, cols = x.shape
    blocks = x.reshape(rows, cols // 32, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * (amax / 127.0)).reshape(rows, cols)


def fast_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The fast mode: int8 activations in the kernel (few rows), bfloat16 GEMM (many rows)."""
    if x.shape[0] <= KERNEL_MAX_ROWS:
        return quantize_activations(x) @ weight.T
    return (x.bfloat16() @ weight.bfloat16().T).float()


def gguf_weight(qtype: int, rows: int = 96, cols: int = 192, seed: int = 0) -> tuple[QuantizedWeight, torch.Tensor]:
    """Blocks made by gguf's quantizer, and gguf's float32 reading of them."""
    dense = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = gguf_quantize(dense, TYPES[qtype])
    reference = torch.from_numpy(gguf_dequantize(raw, TYPES[qtype]).astype(np.float32))
    return QuantizedWeight(torch.from_numpy(raw), qtype, (rows, cols)), reference


@pytest.fixture(params=[1, 2])
def threads(request):
    kernels.set_threads(request.param)
    yield request.param
    kernels.set_threads(torch.get_num_threads())


@pytest.mark.parametrize("qtype", list(TYPES))
def test_dequantize_and_embed_match_gguf(qtype: int, threads: int) -> None:
    weight, reference = gguf_weight(qtype)
    assert torch.equal(weight.dequantize(), reference)
    ids = torch.tensor([0, 95, 7, 7])
    assert torch.equal(weight.embed(ids), reference[ids])
    with pytest.raises(IndexError):
        weight.embed(torch.tensor([96]))


@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 70])
def test_matmul_exact_and_fast(qtype: int, rows: int, threads: int) -> None:
    weight, reference = gguf_weight(qtype)
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows)) * 3
    exact = x @ reference.T
    torch.testing.assert_close(weight.matmul(x, True, KERNEL_MAX_ROWS), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        weight.matmul(x, False, KERNEL_MAX_ROWS), fast_reference(x, reference), rtol=1e-5, atol=1e-4
    )
    assert (weight.matmul(x, False, KERNEL_MAX_ROWS) - exact).abs().max() < 0.05 * exact.abs().max()


def test_scalar_path_matches(tmp_path) -> None:
    """The portable C path (CPUs without AVX2) gives the same products."""
    import subprocess
    import sys

    code = (
        "import torch; from fulmine import kernels; from tests.unit.test_kernels import gguf_weight;"
        "assert kernels.cpu().info()['isa'] == 'scalar';"
        "w, ref = gguf_weight(kernels.Q4_1); x = torch.randn(3, 192);"
        "torch.testing.assert_close(w.matmul(x, exact=True), x @ ref.T, rtol=1e-5, atol=1e-4);"
        "from tests.unit.test_kernels import quantize_activations as q;"
        "torch.testing.assert_close(w.matmul(x), q(x) @ ref.T, rtol=1e-5, atol=1e-4)"
    )
    env = {**__import__("os").environ, "FULMINE_KERNELS_SCALAR": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("qtype", [kernels.Q8_0, kernels.Q4_1])
def test_quantize_round_trips_through_gguf(qtype: int) -> None:
    dense = torch.randn(64, 128)
    ours = quantize(dense, qtype)
    theirs = torch.from_numpy(gguf_dequantize(ours.raw.numpy(), TYPES[qtype]).astype(np.float32))
    assert torch.equal(ours.dequantize(), theirs)
    step = (dense.reshape(64, 4, 32).amax(-1) - dense.reshape(64, 4, 32).amin(-1)).max()
    bound = dense.abs().max() / 127 if qtype == kernels.Q8_0 else step / 15
    assert (theirs - dense).abs().max() <= bound * 0.51 + 1e-3


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        QuantizedWeight(torch.zeros(4, 33, dtype=torch.uint8), kernels.Q8_0, (4, 32))
    with pytest.raises(ValueError):
        QuantizedWeight(torch.zeros(4, 34, dtype=torch.uint8), kernels.Q8_0, (4, 31))


@pytest.mark.parametrize("qtype", list(TYPES))
def test_bfloat16_dequantization_rounds_like_torch(qtype: int, threads: int) -> None:
    weight, reference = gguf_weight(qtype, rows=40, cols=96)
    assert torch.equal(weight.dequantize(torch.bfloat16), reference.bfloat16())


def test_bfloat16_ties_round_to_even(threads: int) -> None:
    """A Q8_0 block with scale 1 + 2^-8: d * 1 and d * 2 lie exactly halfway between two bfloat16 numbers."""
    scale = torch.tensor([1.0 + 2**-8], dtype=torch.float16).view(torch.uint8)
    q = torch.tensor([1, -1, 2, -2, 3, 127, -128, 0] * 4, dtype=torch.int8).view(torch.uint8)
    weight = QuantizedWeight(torch.cat([scale, q]).reshape(1, 34), kernels.Q8_0, (1, 32))
    values = weight.dequantize()
    assert values[0, 0] == 1.0 + 2**-8
    assert torch.equal(weight.dequantize(torch.bfloat16), values.bfloat16())
