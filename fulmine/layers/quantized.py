"""Weights kept in GGUF block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), multiplied
without dequantizing.

A `QuantizedWeight` is what a Linear or Embedding holds instead of a dense matrix: the raw
blocks, row by row. A few rows (decode, verification, short prompts) go through the C kernel's
fused dequantize-and-dot; a prefill-sized batch dequantizes the matrix once and uses the BLAS
GEMM, which is faster there: in bfloat16 by default (2.1x the float32 GEMM's throughput on the
AVX512-BF16 CPU, 256x576x1536: 395-427 vs 190-195 GFLOP/s), in float32 when exact. `quantize`
turns a dense matrix into such blocks (`--quantization int8|int4` on a float checkpoint).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from fulmine import kernels
from fulmine.layers.weights import aligned_empty

# rows of a vocabulary table timed in both layouts at load: more than a CPU's last-level cache
STREAM_PROBE_BYTES = 64 << 20


class QuantizedWeight:
    def __init__(self, raw: torch.Tensor, qtype: int, shape: tuple[int, int]) -> None:
        rows, cols = shape
        base = kernels.base_type(qtype)
        group = 16 if qtype & kernels.X16 else 8 if qtype & kernels.X8 else 1
        if base not in kernels.BLOCK_TYPES or cols % kernels.block_layout(base)[0] or rows % group:
            raise ValueError(f"GGML type {qtype} with {cols} columns is not supported by the kernels")
        block, nbytes = kernels.block_layout(base)
        expected = (rows, cols // block * nbytes)
        if raw.dtype != torch.uint8 or tuple(raw.shape) != expected:
            raise ValueError(f"raw blocks {tuple(raw.shape)} do not fit {shape} of type {qtype}")
        self.raw, self.qtype, self.shape = raw.contiguous(), qtype, shape

    @property
    def parts(self) -> list[QuantizedWeight]:
        return [self]

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def interleaved(self, group: int | None = None, in_place: bool = False) -> QuantizedWeight:
        """The same matrix with `group` rows interleaved (8 or 16; default: what this CPU's kernels
        run best; kernels/interleaved.c), or itself where the type or row count has no such layout.
        Interleaved types have int8-activation kernels only (never `exact`). `in_place`: in this
        weight's memory, which this weight must not be used after (loading: no second copy of a
        170 MB vocabulary table at the peak)."""
        module = kernels.cpu()
        group = group or kernels.interleave_rows()
        target = self.qtype | (kernels.X16 if group == 16 else kernels.X8)
        if module is None or target not in kernels.type_ids() or self.shape[0] % group:
            return self
        # new memory: page-aligned numpy's, which has huge pages (layers/weights.py)
        raw = self.raw if in_place else torch.from_numpy(aligned_empty(self.raw.numel()).reshape(self.raw.shape))
        module.interleave(self.raw.data_ptr(), self.qtype, self.shape[0], self.shape[1], raw.data_ptr(), group)
        return QuantizedWeight(raw, target, self.shape)

    def streams_faster_interleaved(self, group: int) -> bool:
        """Whether one activation row's product reads this matrix from memory faster in the layout of
        `group` interleaved rows than in this one, timed here on up to STREAM_PROBE_BYTES of its rows
        at each prefetch distance (for the vocabulary tables, which stream from memory every token:
        on the AMD Zen 4 guest, Qwen2.5-Coder-1.5B's Q6_K LM head read at 25-28 GB/s as stored and
        10-16 GB/s interleaved, while its layers' matrices ran faster interleaved)."""
        rows = min(self.shape[0], max(group, STREAM_PROBE_BYTES // self.raw.shape[1] // group * group))
        part = QuantizedWeight(self.raw[:rows], self.qtype, (rows, self.shape[1]))
        mixed = part.interleaved(group)
        if mixed is part:
            return False
        x = torch.randn(1, self.shape[1], generator=torch.Generator().manual_seed(0))

        def seconds(weight: QuantizedWeight) -> float:
            weight.matmul(x)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                weight.matmul(x)
                times.append(time.perf_counter() - started)
            return sorted(times)[1]

        try:
            plain = seconds(part)
            best_interleaved = math.inf
            for ahead in kernels.PREFETCH_CHOICES:
                kernels.set_prefetch(ahead)
                best_interleaved = min(best_interleaved, seconds(mixed))
        finally:
            kernels.set_prefetch(kernels.DEFAULT_PREFETCH)
        return best_interleaved < plain

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Rows [start, stop) as a weight of their own, in this one's memory (an interleaved layout's
        bounds on whole groups of rows)."""
        return QuantizedWeight(self.raw[start:stop], self.qtype, (stop - start, self.shape[1]))

    def matmul(self, x: torch.Tensor, exact: bool = False, max_kernel_rows: int = 1 << 30) -> torch.Tensor:
        """x [R, K] float32 -> [R, N] float32; `exact` keeps activations in float32 (see _cpu.c).

        Past `max_kernel_rows` rows the weight is dequantized for the GEMM (the CPU executor's threshold).
        """
        return _matmul(self, x, exact, max_kernel_rows)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """float32, or bfloat16 (rounded to nearest even) for the fast prefill GEMM."""
        module = kernels.cpu()
        assert module is not None and dtype in (torch.float32, torch.bfloat16)
        out = torch.empty(self.shape, dtype=dtype)
        bf16 = dtype == torch.bfloat16
        module.dequantize(self.raw.data_ptr(), self.qtype, self.shape[0], self.shape[1], out.data_ptr(), bf16)
        return out

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` as float32 [len(ids), K]."""
        module = kernels.cpu()
        assert module is not None
        ids = ids.to(torch.long).contiguous()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.shape[0]):
            raise IndexError(f"token id out of range [0, {self.shape[0]})")
        out = torch.empty(ids.numel(), self.shape[1], dtype=torch.float32)
        module.embed(self.raw.data_ptr(), self.qtype, self.shape[1], ids.data_ptr(), ids.numel(), out.data_ptr())
        return out


class QuantizedShards:
    """A merged matrix whose shards have different block types, each kept as it is (a Q4_K_M file's
    q and k in Q4_K with v in Q6_K): the shards' products fill the output's column ranges."""

    def __init__(self, parts: list[QuantizedWeight]) -> None:
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError("shards of one matrix must have the same number of columns")
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def rows(self, start: int, stop: int) -> QuantizedWeight | QuantizedShards:
        """Rows [start, stop) of the merged matrix: the parts of the shards they cover."""
        parts, first = [], 0
        for part in self.parts:
            low, high = max(start, first), min(stop, first + part.shape[0])
            if low < high:
                parts.append(part.rows(low - first, high - first))
            first += part.shape[0]
        return parts[0] if len(parts) == 1 else QuantizedShards(parts)

    def matmul(self, x: torch.Tensor, exact: bool = False, max_kernel_rows: int = 1 << 30) -> torch.Tensor:
        return _matmul(self, x, exact, max_kernel_rows)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts])

    def interleaved(self, group: int | None = None, in_place: bool = False) -> QuantizedShards:
        return QuantizedShards([p.interleaved(group, in_place) for p in self.parts])


def _matmul(
    weight: QuantizedWeight | QuantizedShards, x: torch.Tensor, exact: bool, max_kernel_rows: int
) -> torch.Tensor:
    module = kernels.cpu()
    assert module is not None, "quantized weights are only kept when the kernels are built"
    x = x.contiguous()
    rows = x.shape[0]
    if rows > max_kernel_rows:
        if exact:
            return F.linear(x, weight.dequantize())
        return F.linear(x.to(torch.bfloat16), weight.dequantize(torch.bfloat16)).float()
    n, k = weight.shape
    y = torch.empty(rows, n, dtype=torch.float32)
    column = 0
    for part in weight.parts:  # each shard's product fills its columns of y (rows n floats apart)
        out = y.data_ptr() + column * y.element_size()
        module.matmul(x.data_ptr(), rows, k, part.raw.data_ptr(), part.qtype, part.shape[0], out, exact, n)
        column += part.shape[0]
    return y


def quantize(weight: torch.Tensor, qtype: int) -> QuantizedWeight:
    """Dense [N, K] -> blocks of 32 along K: Q8_0 (int8, one scale) or Q4_1 (4-bit, scale and minimum)."""
    rows, cols = weight.shape
    blocks = weight.float().reshape(rows, cols // 32, 32)
    if qtype == kernels.Q8_0:
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        d = (amax / 127).to(torch.float16)
        inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(amax))
        q = (blocks * inv).round().clamp(-127, 127).to(torch.int8)
        raw = torch.cat([d.view(torch.uint8), q.view(torch.uint8)], dim=-1)
    elif qtype == kernels.Q4_1:
        lo, hi = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
        d = ((hi - lo) / 15).to(torch.float16)
        m = lo.to(torch.float16)
        inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(lo))
        q = ((blocks - m.float()) * inv).round().clamp(0, 15).to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        raw = torch.cat([d.view(torch.uint8), m.view(torch.uint8), packed], dim=-1)
    else:
        raise ValueError(f"cannot quantize to GGML type {qtype}")
    return QuantizedWeight(raw.reshape(rows, -1), qtype, (rows, cols))
