"""Interleaved layouts (kernels/interleaved.c): 8 or 16 weight rows side by side, built at load.

The layout holds the same blocks (dequantization and embedding lookups read the base type's values),
the products equal gguf's reading of the blocks times int8 activations, and a row computes the same
bits whatever the number of activation rows, the group size and the ISA path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fulmine import kernels
from fulmine.layers.quantized import QuantizedShards, QuantizedWeight
from tests.unit.test_kernels import KERNEL_MAX_ROWS, check_products, check_rows_alone, gguf_weight, threads  # noqa: F401 (the fixture)

pytestmark = pytest.mark.skipif(kernels.cpu() is None, reason="C kernels not built")

BASES = [kernels.Q4_0, kernels.Q4_1, kernels.Q8_0]
# (type, rows interleaved): Q4_0, Q4_1, Q8_0 in both group sizes; Q5_0 and the K-quants (interleaved_k.c) in 16
LAYOUTS = [(t, g) for t in BASES for g in (8, 16)] + [(kernels.Q5_0, 16), (kernels.Q4_K, 16), (kernels.Q6_K, 16)]


@pytest.mark.parametrize(("qtype", "group"), LAYOUTS)
@pytest.mark.usefixtures("threads")  # 1 and 2 threads (test_kernels.py)
def test_same_values_as_the_base_layout(qtype: int, group: int) -> None:
    weight, reference = gguf_weight(qtype)
    mixed = weight.interleaved(group)
    assert mixed.qtype == qtype | (kernels.X16 if group == 16 else kernels.X8)
    assert mixed.raw.shape == weight.raw.shape and not torch.equal(mixed.raw, weight.raw)
    assert torch.equal(mixed.dequantize(), reference)
    assert torch.equal(mixed.dequantize(torch.bfloat16), weight.dequantize(torch.bfloat16))
    ids = torch.tensor([0, 95, 7, 8, 15, 16, 7])
    assert torch.equal(mixed.embed(ids), reference[ids])


@pytest.mark.parametrize(("qtype", "group"), LAYOUTS)
@pytest.mark.parametrize("num_rows", [16, 48, 160])  # one group, a few, more groups than chunks
@pytest.mark.usefixtures("threads")  # 1 and 2 threads (test_kernels.py)
def test_in_place_equals_a_copy(qtype: int, group: int, num_rows: int) -> None:
    """Loading interleaves in the weight's own memory (no second vocabulary table at the peak):
    the same bytes as interleaving into new memory, in the same memory."""
    weight, _ = gguf_weight(qtype, rows=num_rows)
    copy = weight.interleaved(group)
    pointer = weight.raw.data_ptr()
    in_place = weight.interleaved(group, in_place=True)
    assert in_place.raw.data_ptr() == pointer and in_place.qtype == copy.qtype
    assert torch.equal(in_place.raw, copy.raw)


@pytest.mark.parametrize(("qtype", "group"), LAYOUTS)
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 17, KERNEL_MAX_ROWS + 1])
@pytest.mark.usefixtures("threads")  # 1 and 2 threads (test_kernels.py)
def test_products_and_rows_alone(qtype: int, group: int, rows: int) -> None:
    weight, reference = gguf_weight(qtype)
    mixed = weight.interleaved(group)
    check_products(mixed, reference, rows, exact_mode=False)  # interleaved types: no exact kernels
    if rows <= KERNEL_MAX_ROWS:  # past the threshold, the GEMM of the dequantized matrix
        check_rows_alone(mixed, rows, modes=(False,))
        if qtype in BASES:  # the other group size: the same bits
            x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows))
            other = weight.interleaved(24 - group).matmul(x, False, KERNEL_MAX_ROWS)
            assert torch.equal(mixed.matmul(x, False, KERNEL_MAX_ROWS), other)


def test_exact_mode_and_odd_row_counts_are_refused() -> None:
    weight, _ = gguf_weight(kernels.Q4_1)
    mixed = weight.interleaved(8)
    with pytest.raises(ValueError, match="no exact kernel"):
        mixed.matmul(torch.randn(2, weight.shape[1]), True, KERNEL_MAX_ROWS)
    odd, _ = gguf_weight(kernels.Q4_1, rows=12)
    assert odd.interleaved(8) is odd and odd.interleaved(16) is odd  # 12 rows: kept as they are
    assert gguf_weight(kernels.Q4_K)[0].interleaved(8).qtype == kernels.Q4_K  # K-quants: 16 rows only
    assert gguf_weight(kernels.Q5_K)[0].interleaved(16).qtype == kernels.Q5_K  # no interleaved layout


@pytest.mark.usefixtures("threads")  # 1 and 2 threads (test_kernels.py)
def test_interleaved_shards_multiply_as_one_matrix() -> None:
    """A q/k/v of shards, some interleaved, equals the stacked matrix (row ranges split across threads
    fall on whole groups)."""
    parts = [
        gguf_weight(t, rows=r, seed=i)
        for i, (t, r) in enumerate([(kernels.Q4_1, 64), (kernels.Q8_0, 48), (kernels.Q5_K, 32)])
    ]
    shards = QuantizedShards([w for w, _ in parts]).interleaved(16)
    assert [p.qtype for p in shards.parts] == [kernels.Q4_1 | kernels.X16, kernels.Q8_0 | kernels.X16, kernels.Q5_K]
    plain = QuantizedShards([w for w, _ in parts])
    x = torch.randn(5, shards.shape[1])
    torch.testing.assert_close(
        shards.matmul(x, False, KERNEL_MAX_ROWS), plain.matmul(x, False, KERNEL_MAX_ROWS), rtol=1e-4, atol=1e-3
    )
    assert torch.equal(shards.dequantize(), plain.dequantize())


@pytest.mark.parametrize("variable", ["FULMINE_KERNELS_SCALAR", "FULMINE_KERNELS_AVX2"])
def test_every_isa_path_computes_the_same_bits(variable: str) -> None:
    """The portable C kernel and the AVX2 one give the bits of the default path (512-bit on CPUs
    that have it) for both group sizes."""
    if variable == "FULMINE_KERNELS_AVX2" and "avx2" not in kernels.describe():
        pytest.skip("this CPU has no AVX2")
    code = (
        "import sys, torch; from tests.unit.test_interleaved import *;"
        "x = torch.randn(11, 512, generator=torch.Generator().manual_seed(0));"
        "out = [gguf_weight(t)[0].interleaved(g).matmul(x, False, 32) for t, g in LAYOUTS];"
        "torch.save(out, sys.argv[1])"
    )
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fulmine-interleaved-{os.getpid()}.pt")
    results = []
    for env in ({}, {variable: "1"}):
        done = subprocess.run(
            [sys.executable, "-c", code, path], env={**os.environ, **env}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        results.append(torch.load(path))
    os.unlink(path)
    for default, forced in zip(*results):
        assert torch.equal(default, forced)


def test_a_table_is_interleaved_only_where_that_reads_faster(monkeypatch) -> None:
    """The LM head's layout is chosen by timing both on this machine: whichever is kept, the products
    are the same values; a type without an interleaved layout is never timed as one."""
    from fulmine.layers import quantized
    from fulmine.layers.linear import Linear

    monkeypatch.setattr(quantized, "STREAM_PROBE_BYTES", 1 << 16)  # a small probe: this is not a benchmark
    weight, reference = gguf_weight(kernels.Q8_0, rows=256)
    assert isinstance(weight.streams_faster_interleaved(16), bool)
    assert not gguf_weight(kernels.Q5_K)[0].streams_faster_interleaved(16)
    x = torch.randn(3, weight.shape[1])
    expected = weight.matmul(x, False, KERNEL_MAX_ROWS)
    for faster in (True, False):
        monkeypatch.setattr(quantized.QuantizedWeight, "streams_faster_interleaved", lambda self, group, f=faster: f)
        layer = Linear(weight.shape[1], weight.shape[0])
        layer.set_quantized(QuantizedWeight(weight.raw.clone(), weight.qtype, weight.shape))
        layer.interleave(if_faster=True)
        assert (layer.quant.qtype != kernels.Q8_0) == faster
        torch.testing.assert_close(layer.quant.matmul(x, False, KERNEL_MAX_ROWS), expected, rtol=1e-5, atol=1e-4)
