"""Checkpoint tensors as the loader hands them to layers: dense, or still quantized.

A `QuantizedTensor` keeps a GGUF tensor's raw blocks (rows intact, so rows can be reordered
without dequantizing). Layers call `as_dense` today; a low-bit linear layer can take the blocks
as they are.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

PAGE = 4096


def aligned_empty(nbytes: int) -> np.ndarray:
    """Uninitialized bytes starting on a page boundary, in numpy's memory (which asks for huge pages
    on large arrays: decode streams every weight once per token). numpy's own start 16 bytes into
    a page, so every 64-byte load of a kernel straddled two cache lines: on the AMD Zen 4 guest,
    Qwen2.5-Coder-1.5B's interleaved Q4_K matrices streamed 3-9 % faster aligned (A/B, same run),
    its Q6_K ones within noise."""
    buffer = np.empty(nbytes + PAGE, dtype=np.uint8)
    start = -buffer.ctypes.data % PAGE
    return buffer[start : start + nbytes]


@dataclass
class QuantizedTensor:
    raw: np.ndarray  # uint8 [rows, bytes_per_row]
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # logical shape, rows first

    def take_rows(self, index: np.ndarray) -> QuantizedTensor:
        return QuantizedTensor(self.raw[index], self.qtype, self.shape)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, self.shape)


WeightTensor = torch.Tensor | QuantizedTensor


def as_dense(tensor: WeightTensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(tensor, QuantizedTensor):
        tensor = tensor.dequantize()
    return tensor.to(dtype)


def _scales(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 scale stored at byte `start` of each block, as float32 [num_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of `shape` from raw GGUF blocks. Common types in torch, the rest via gguf."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    with warnings.catch_warnings():  # the mapped file is read-only; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1)
    if qtype == GGMLQuantizationType.F32:
        return data.view(torch.float32).reshape(shape).clone()
    if qtype == GGMLQuantizationType.F16:
        return data.view(torch.float16).reshape(shape).float()
    if qtype == GGMLQuantizationType.BF16:
        return data.view(torch.bfloat16).reshape(shape).float()
    blocks = data.reshape(-1, type_size)
    if qtype == GGMLQuantizationType.Q8_0:  # d: f16, qs: int8[32]
        values = blocks[:, 2:].view(torch.int8).float() * _scales(blocks, 0)
    elif qtype in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
        # Q4_0: d, qs[16]; value = d * (q - 8).  Q4_1: d, m, qs[16]; value = d * q + m.
        # Low nibbles are elements 0..15 of the block, high nibbles 16..31. Written in place:
        # this runs over every weight at load time.
        is_q4_1 = qtype == GGMLQuantizationType.Q4_1
        qs = blocks[:, 4 if is_q4_1 else 2 :]
        values = torch.empty(blocks.shape[0], 32)
        values[:, :16] = qs & 0x0F
        values[:, 16:] = qs >> 4
        if is_q4_1:
            values.mul_(_scales(blocks, 0)).add_(_scales(blocks, 2))
        else:
            values.sub_(8.0).mul_(_scales(blocks, 0))
    else:
        values = torch.from_numpy(gguf_dequantize(np.ascontiguousarray(raw), qtype).astype(np.float32))
    assert values.numel() == int(np.prod(shape)) and block_size > 0
    return values.reshape(shape)
