"""Linear layers and the embedding table, and how checkpoint tensors are loaded into them.

`MergedLinear` holds several projections that read the same input (q/k/v, gate/up) as one weight,
so decode runs one matrix-vector product instead of three. Checkpoint tensors arrive one shard at
a time through `load_shard`. With `keep_blocks` set (GGUF files, when the C kernels are built),
quantized shards are kept as they are and become a `QuantizedWeight` in `finish_loading` when
every shard of the layer has the same block type; otherwise they are dequantized into the dense
weight. `quantize` turns a dense layer into blocks (`--quantization int8|int4`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from fulmine import kernels
from fulmine.layers.quantized import QuantizedShards, QuantizedWeight, quantize
from fulmine.layers.weights import QuantizedTensor, WeightTensor, aligned_empty, as_dense

_FLOATS = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)  # loaded dense: no loss


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.out_sizes = [out_features]  # rows of each shard (MergedLinear: q/k/v, gate/up)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.quant: QuantizedWeight | QuantizedShards | None = None
        self.exact = False  # quantized products with float32 activations (see kernels/_cpu.c)
        # Row thresholds of the device's executor (executors/cpu_fused.py tunes them for the CPU):
        self.max_kernel_rows = 1 << 30  # more rows: dequantize and GEMM (layers/quantized.py)
        self.max_exact_kernel_rows = 1 << 30  # the same, for the exact kernels
        self.narrow_gemv_max_rows = 0  # up to this many rows, a narrow weight multiplies in its own dtype
        self.keep_blocks = False
        self.full_precision = False  # never narrowed or quantized (a router: its scores pick the experts)
        self.unread_types: set[str] = set()  # GGUF block types of this layer loaded dense (the loader reports them)
        self._blocks: dict[int, QuantizedTensor] = {}

    @property
    def num_shards(self) -> int:
        return len(self.out_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, self.quant, self.weight, self.bias)

    def rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """x times rows [start, stop) of the matrix only (one expert's of a stacked experts' matrix)."""
        quant = None if self.quant is None else self.quant.rows(start, stop)
        bias = None if self.bias is None else self.bias[start:stop]
        return self._product(x, quant, self.weight[start:stop] if quant is None else self.weight, bias)

    def _product(
        self,
        x: torch.Tensor,
        quant: QuantizedWeight | QuantizedShards | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        if quant is not None:
            limit = self.max_exact_kernel_rows if self.exact else self.max_kernel_rows
            y = quant.matmul(x.float(), self.exact, limit).to(x.dtype)
            return y if bias is None else y + bias
        if weight.dtype == x.dtype:
            return F.linear(x, weight, bias)
        # Weights stored narrower than activations (float16 on CPU): decode is bound by reading
        # weights, so a few rows multiply in float16 (half the bytes; float32 accumulation);
        # a prefill-sized batch upcasts the weight once and runs the float32 GEMM, which is
        # several times faster there than float16. Both round inputs and outputs to the weight
        # dtype, so a row's result hardly depends on which path its batch took.
        narrow = weight.dtype
        if x.shape[0] <= self.narrow_gemv_max_rows:
            y = F.linear(x.to(narrow), weight).to(x.dtype)
        else:
            y = F.linear(x.to(narrow).to(x.dtype), weight.to(x.dtype)).to(narrow).to(x.dtype)
        return y if bias is None else y + bias

    def load_shard(self, tensor: WeightTensor, shard: int = 0, is_bias: bool = False) -> None:
        if self._keeps(tensor, is_bias):
            assert isinstance(tensor, QuantizedTensor)
            self._blocks[shard] = tensor
        else:
            if self.keep_blocks and not is_bias and isinstance(tensor, QuantizedTensor) and tensor.qtype not in _FLOATS:
                self.unread_types.add(tensor.qtype.name)  # blocks the kernels cannot read: dense
            self._load_dense(tensor, shard, is_bias)

    def _keeps(self, tensor: WeightTensor, is_bias: bool) -> bool:
        if not self.keep_blocks or is_bias or not isinstance(tensor, QuantizedTensor):
            return False
        qtype = int(tensor.qtype)
        return qtype in kernels.BLOCK_TYPES and tensor.shape[-1] % kernels.block_layout(qtype)[0] == 0

    def _load_dense(self, tensor: WeightTensor, shard: int, is_bias: bool) -> None:
        target = self.bias if is_bias else self.weight
        assert target is not None
        value = as_dense(tensor, target.dtype)
        if value.shape != target.shape:
            raise ValueError(f"shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
        target.data.copy_(value)

    def finish_loading(self) -> None:
        """Kept blocks become the layer's quantized weight: one QuantizedWeight (a merged layer's shards
        stacked when they have one type), else QuantizedShards (one part per shard, each in its own
        type). A shard that was not kept (a type the kernels do not read) makes the layer dense."""
        blocks, self._blocks = self._blocks, {}
        if not blocks:
            return
        if len(blocks) != self.num_shards:
            for shard, tensor in blocks.items():
                self.unread_types.add(tensor.qtype.name)
                self._load_dense(tensor, shard, False)
            return
        shards = [blocks[i] for i in range(self.num_shards)]
        types = {int(t.qtype) for t in shards}
        if len(types) == 1:
            raw = _resident([t.raw for t in shards])
            self.set_quantized(QuantizedWeight(raw, types.pop(), (self.out_features, self.in_features)))
        else:
            parts = [
                QuantizedWeight(_resident([t.raw]), int(t.qtype), (size, self.in_features))
                for t, size in zip(shards, self.out_sizes)
            ]
            self.set_quantized(QuantizedShards(parts))

    def set_quantized(self, weight: QuantizedWeight | QuantizedShards) -> None:
        self.quant = weight
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)  # the dense matrix is not kept

    def interleave(self, if_faster: bool = False) -> None:
        """Interleave the quantized matrix's rows for the kernels (layers/quantized.py), where every
        shard of a merged matrix starts on a whole group of rows; `if_faster`: only where that layout
        reads it from memory faster on this machine (the vocabulary tables; timed on part of it)."""
        if self.quant is None or kernels.cpu() is None:
            return
        group = kernels.interleave_rows()
        if if_faster and isinstance(self.quant, QuantizedWeight) and not self.quant.streams_faster_interleaved(group):
            return
        if isinstance(self.quant, QuantizedShards) or all(size % group == 0 for size in self.out_sizes):
            self.quant = self.quant.interleaved(group, in_place=True)  # the layer's own blocks

    def quantize(self, qtype: int) -> None:
        if self.quant is None and self.in_features % 32 == 0 and not self.full_precision:
            self.set_quantized(quantize(self.weight.data, qtype))


def _resident(raws: list[np.ndarray]) -> torch.Tensor:
    """Blocks as one tensor: a single array as it is (the GGUF reader's own memory), shards stacked."""
    if len(raws) == 1 and raws[0].flags.c_contiguous:
        return torch.from_numpy(raws[0])
    stacked = aligned_empty(sum(raw.nbytes for raw in raws)).reshape(-1, raws[0].shape[-1])
    np.concatenate([np.ascontiguousarray(raw) for raw in raws], out=stacked)
    return torch.from_numpy(stacked)


class MergedLinear(Linear):
    """Several output projections of the same input stacked along the output dimension."""

    def __init__(self, in_features: int, out_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = list(out_sizes)
        self.offsets = [sum(self.out_sizes[:i]) for i in range(len(self.out_sizes))]

    def _load_dense(self, tensor: WeightTensor, shard: int, is_bias: bool) -> None:
        target = self.bias if is_bias else self.weight
        assert target is not None
        start, size = self.offsets[shard], self.out_sizes[shard]
        value = as_dense(tensor, target.dtype)
        expected = (size, *target.shape[1:])
        if tuple(value.shape) != expected:
            raise ValueError(f"shard {shard}: shape {tuple(value.shape)} does not fit {expected}")
        target.data[start : start + size].copy_(value)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y.split(self.out_sizes, dim=-1))


class Embedding(Linear):
    """Token embedding table (no random init: every value comes from the checkpoint).

    A Linear from hidden size to vocabulary, so the table is stored, kept quantized and loaded the
    same way; its forward looks rows up. A tied lm_head shares it.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__(embedding_dim, num_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.quant, QuantizedWeight):
            return self.quant.embed(input_ids)
        return F.embedding(input_ids, self.weight)
