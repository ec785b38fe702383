"""The C kernels against references nobody here wrote: gguf's own quantizers and dequantizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from fulmine import kernels
from fulmine.layers.quantized import QuantizedWeight, quantize

pytestmark = pytest.mark.skipif(kernels.cpu() is None, reason="C kernels not built")

TYPES = {
    kernels.Q8_0: GGMLQuantizationType.Q8_0,
    kernels.Q4_0: GGMLQuantizationType.Q4_0,
    kernels.Q4_1: GGMLQuantizationType.Q4_1,
    kernels.Q5_0: GGMLQuantizationType.Q5_0,
    kernels.Q5_1: GGMLQuantizationType.Q5_1,
    kernels.Q4_K: GGMLQuantizationType.Q4_K,
    kernels.Q5_K: GGMLQuantizationType.Q5_K,
    kernels.Q6_K: GGMLQuantizationType.Q6_K,
}
# gguf has no quantizer for the K-quants: their blocks are random bytes (every byte pattern is a valid
# block) with the float16 scales set to small positive values; offsets of those scales in a block
K_SCALES = {kernels.Q4_K: (0, 2), kernels.Q5_K: (0, 2), kernels.Q6_K: (208,)}
COLS = 512  # a multiple of every block size (256 for the K-quants)
# up to this many rows the products below run the C kernel, past it dequantize + GEMM (the CPU executor
# picks its own threshold, executors/cpu_fused.py; both paths are tested here on any CPU)
KERNEL_MAX_ROWS = 32


def quantize_activations(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Rows as the kernel's fast mode sees them: int8 per block of `block` (32; 256 for the K-quants,
    as llama.cpp's Q8_K) with scale amax / 127."""
    rows, cols = x.shape
    blocks = x.reshape(rows, cols // block, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * (amax / 127.0)).reshape(rows, cols)


def fast_reference(x: torch.Tensor, weight: torch.Tensor, block: int = 32) -> torch.Tensor:
    """The fast mode: int8 activations in the kernel (few rows), bfloat16 GEMM (many rows)."""
    if x.shape[0] <= KERNEL_MAX_ROWS:
        return quantize_activations(x, block) @ weight.T
    return (x.bfloat16() @ weight.bfloat16().T).float()


def gguf_weight(qtype: int, rows: int = 96, cols: int = COLS, seed: int = 0) -> tuple[QuantizedWeight, torch.Tensor]:
    """Blocks made by gguf's quantizer (random blocks for the K-quants), and gguf's float32 reading of them."""
    rng = np.random.default_rng(seed)
    if qtype in K_SCALES:
        block, nbytes = kernels.block_layout(qtype)
        raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
        for offset in K_SCALES[qtype]:
            scale = rng.uniform(0.002, 0.02, (rows, cols // block)).astype(np.float16)
            raw[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
        raw = raw.reshape(rows, -1)
    else:
        raw = gguf_quantize(rng.standard_normal((rows, cols)).astype(np.float32), TYPES[qtype])
    reference = torch.from_numpy(gguf_dequantize(raw, TYPES[qtype]).astype(np.float32))
    return QuantizedWeight(torch.from_numpy(raw), qtype, (rows, cols)), reference


def check_products(weight: QuantizedWeight, reference: torch.Tensor, rows: int, exact_mode: bool = True) -> None:
    """Exact mode == x @ W^T; fast mode == (x as int8 blocks) @ W^T; both within rounding
    (`exact_mode` False: the fast mode only, for types without exact kernels)."""
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows)) * 3
    exact = x @ reference.T
    tol = dict(rtol=1e-4, atol=1e-5 * float(exact.abs().max()))
    if exact_mode:
        torch.testing.assert_close(weight.matmul(x, True, KERNEL_MAX_ROWS), exact, **tol)
    fast = torch.cat(
        [
            fast_reference(x, ref, 256 if kernels.base_type(part.qtype) in K_SCALES else 32)
            for part, ref in zip(weight.parts, reference.split([p.shape[0] for p in weight.parts]))
        ],
        dim=1,
    )
    torch.testing.assert_close(weight.matmul(x, False, KERNEL_MAX_ROWS), fast, **tol)
    assert (weight.matmul(x, False, KERNEL_MAX_ROWS) - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.fixture(params=[1, 2])
def threads(request):
    kernels.set_threads(request.param)
    yield request.param
    kernels.set_threads(torch.get_num_threads())


@pytest.mark.parametrize("qtype", list(TYPES))
def test_dequantize_and_embed_match_gguf(qtype: int, threads: int) -> None:
    weight, reference = gguf_weight(qtype)
    assert torch.equal(weight.dequantize(), reference)
    ids = torch.tensor([0, 95, 7, 7])  # embedding lookups of every type
    assert torch.equal(weight.embed(ids), reference[ids])
    with pytest.raises(IndexError):
        weight.embed(torch.tensor([96]))


@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, KERNEL_MAX_ROWS, KERNEL_MAX_ROWS + 1, 70])
def test_matmul_exact_and_fast(qtype: int, rows: int, threads: int) -> None:
    check_products(*gguf_weight(qtype), rows)


def check_rows_alone(weight: QuantizedWeight, rows: int, modes: tuple[bool, ...] = (False, True)) -> None:
    """Every row of a product computes the same bits as that row alone (in each mode: exact or not):
    a decode row, a prefill row and a verified draft agree whatever else shares the step."""
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows)) * 3
    for exact in modes:
        together = weight.matmul(x, exact, KERNEL_MAX_ROWS)
        alone = torch.cat([weight.matmul(x[i : i + 1], exact, KERNEL_MAX_ROWS) for i in range(rows)])
        assert torch.equal(together, alone), (weight.qtype, rows, exact)


@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("rows", [2, 5, 8, 9, 16, KERNEL_MAX_ROWS])
def test_rows_compute_the_same_bits_alone_and_together(qtype: int, rows: int, threads: int) -> None:
    check_rows_alone(gguf_weight(qtype)[0], rows)


@pytest.mark.parametrize(("variable", "isa"), [("FULMINE_KERNELS_SCALAR", "scalar"), ("FULMINE_KERNELS_AVX2", "avx2")])
def test_every_type_on_every_isa_path(variable: str, isa: str) -> None:
    """The portable C path (CPUs without AVX2) and the AVX2 path (without VNNI) give the same products
    for every type, each row the same bits alone as together (the default path, VNNI where the CPU has
    it, is the parametrized tests above)."""
    import subprocess
    import sys

    code = (
        "from fulmine import kernels; from tests.unit.test_kernels import *;"
        f"assert kernels.cpu().info()['isa'] == {isa!r}, kernels.cpu().info()['isa'];"
        "[check_products(*gguf_weight(t), rows) for t in TYPES for rows in (1, 3, 4, 6, 9)];"
        "[check_rows_alone(gguf_weight(t)[0], rows) for t in TYPES for rows in (5, 8, 11)]"
    )
    env = {**__import__("os").environ, variable: "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if isa == "avx2" and "avx2" not in (kernels.describe()):
        pytest.skip("this CPU has no AVX2")
    assert result.returncode == 0, result.stderr


def test_shards_of_different_types_multiply_as_one_matrix(threads: int) -> None:
    """A merged q/k/v kept as Q4_K, Q4_K, Q6_K shards equals the stacked dequantized matrix."""
    from fulmine.layers.quantized import QuantizedShards

    parts = [
        gguf_weight(t, rows=r, seed=i)
        for i, (t, r) in enumerate([(kernels.Q4_K, 64), (kernels.Q5_0, 32), (kernels.Q6_K, 32)])
    ]
    shards = QuantizedShards([w for w, _ in parts])
    reference = torch.cat([ref for _, ref in parts])
    assert shards.shape == (128, COLS) and torch.equal(shards.dequantize(), reference)
    for rows in (1, 5, KERNEL_MAX_ROWS + 1):
        check_products(shards, reference, rows)  # type: ignore[arg-type]


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
    weight, reference = gguf_weight(qtype, rows=40, cols=256)
    assert torch.equal(weight.dequantize(torch.bfloat16), reference.bfloat16())


def test_bfloat16_ties_round_to_even(threads: int) -> None:
    """A Q8_0 block with scale 1 + 2^-8: d * 1 and d * 2 lie exactly halfway between two bfloat16 numbers."""
    scale = torch.tensor([1.0 + 2**-8], dtype=torch.float16).view(torch.uint8)
    q = torch.tensor([1, -1, 2, -2, 3, 127, -128, 0] * 4, dtype=torch.int8).view(torch.uint8)
    weight = QuantizedWeight(torch.cat([scale, q]).reshape(1, 34), kernels.Q8_0, (1, 32))
    values = weight.dequantize()
    assert values[0, 0] == 1.0 + 2**-8
    assert torch.equal(weight.dequantize(torch.bfloat16), values.bfloat16())


@pytest.mark.parametrize("position", [-1, 16, 2**31 - 1])
def test_the_decoder_refuses_a_position_outside_the_block_table(position: int) -> None:
    """A position the block table does not cover would write keys and values outside the cache (a
    negative one corrupted the heap once): refused before anything runs."""
    module = kernels.cpu()
    if module is None:
        pytest.skip("the C kernels are not built")
    pos = torch.tensor([position], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside its block table"):
        dims = (64, 1, 1, 64, 64, 16, 0, 0, 0, 0, 0)  # no experts
        module.decoder_forward(0, 1, 0, 0, 0, pos.data_ptr(), 0, 0, 1, dims, 1e-6, 1.0, False)
