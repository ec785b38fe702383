"""Linear layers and the embedding table, and how checkpoint tensors are loaded into them.

`MergedLinear` holds several projections that read the same input (q/k/v, gate/up) as one weight,
so decode runs one matrix-vector product instead of three. Checkpoint tensors arrive one shard at
a time through `load_shard`; a quantized checkpoint tensor is dequantized there, which is the one
place a low-bit layer will plug in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fulmine.models.weights import WeightTensor, as_dense

# Up to this many rows, a narrow-weight linear runs in the weight's dtype. Measured on the 2-core
# AVX-512 CPU, whole decode steps of the embedded model: batch 8 decodes at 40 tok/s with the
# threshold at 4 (each step upcasts every weight) and 109 tok/s at 8; batch 16 at 71 tok/s with
# 8 and 113 tok/s with 16. Past ~16 rows (prefill) the upcast float32 GEMM wins.
NARROW_GEMV_MAX_ROWS = 16


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.dtype == x.dtype:
            return F.linear(x, weight, self.bias)
        # Weights stored narrower than activations (float16 on CPU): decode is bound by reading
        # weights, so a few rows multiply in float16 (half the bytes; float32 accumulation);
        # a prefill-sized batch upcasts the weight once and runs the float32 GEMM, which is
        # several times faster there than float16. Both round inputs and outputs to the weight
        # dtype, so a row's result hardly depends on which path its batch took.
        narrow = weight.dtype
        if x.shape[0] <= NARROW_GEMV_MAX_ROWS:
            y = F.linear(x.to(narrow), weight).to(x.dtype)
        else:
            y = F.linear(x.to(narrow).to(x.dtype), weight.to(x.dtype)).to(narrow).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def load_shard(self, tensor: WeightTensor, shard: int = 0, is_bias: bool = False) -> None:
        target = self.bias if is_bias else self.weight
        assert target is not None
        value = as_dense(tensor, target.dtype)
        if value.shape != target.shape:
            raise ValueError(f"shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
        target.data.copy_(value)


class MergedLinear(Linear):
    """Several output projections of the same input stacked along the output dimension."""

    def __init__(self, in_features: int, out_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = list(out_sizes)
        self.offsets = [sum(self.out_sizes[:i]) for i in range(len(self.out_sizes))]

    def load_shard(self, tensor: WeightTensor, shard: int = 0, is_bias: bool = False) -> None:
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


class Embedding(nn.Module):
    """Token embedding table (no random init: every value comes from the checkpoint)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)
