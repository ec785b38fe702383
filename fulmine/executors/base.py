"""What every executor shares and promises.

`ModelState` is the device state a step runs against: the model, one paged KV cache per layer,
the rotary tables. An executor turns a `StepBatch` into the final hidden states of its tokens,
[num_tokens, hidden_size], writing the tokens' keys and values into the cache on the way; the
runner samples from them. Each executor module has `unsupported_reason(state)` (None: it can run
this model on this device) and an executor class whose `accepts(batch)` says whether it takes a
step of that shape (the PyTorch executor takes every step, so it is always the last resort).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from fulmine.executors.step import StepBatch
from fulmine.layers.rotary import RotaryEmbedding
from fulmine.models.decoder import CausalLM


@dataclass
class ModelState:
    model: CausalLM
    # per layer (keys, values), each [num_slots + 2, num_kv_heads, head_dim]; slot = block * block_size + offset
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    block_size: int
    max_model_len: int
    rotary: RotaryEmbedding
    rotary_sliding: RotaryEmbedding  # Gemma 3's local layers have their own base; else the same table
    layer_is_sliding: list[bool]
    device: torch.device
    dtype: torch.dtype
    exact_kernels: bool
    # Two slots past the blocks: the null slot stays zero and is what padded context positions
    # read; padded rows of a fixed-shape step write their keys to the scratch slot.
    null_slot: int
    scratch_slot: int


class Executor(Protocol):
    name: str

    def accepts(self, batch: StepBatch) -> bool: ...

    def forward(self, batch: StepBatch) -> torch.Tensor: ...


def allocate_model_state(
    model: CausalLM,
    num_blocks: int,
    block_size: int,
    max_model_len: int,
    device: torch.device,
    dtype: torch.dtype,
    exact_kernels: bool,
    kv_dtype: torch.dtype | None = None,
) -> ModelState:
    config = model.config
    null_slot = num_blocks * block_size
    shape = (null_slot + 2, config.num_kv_heads, config.head_dim)
    kv_caches = []
    for _ in range(config.num_layers):
        # uninitialized: on the CPU pages become resident only as blocks are used
        k_cache, v_cache = (
            torch.empty(shape, dtype=kv_dtype or dtype, device=device),
            torch.empty(shape, dtype=kv_dtype or dtype, device=device),
        )
        k_cache[null_slot:].zero_()
        v_cache[null_slot:].zero_()
        kv_caches.append((k_cache, v_cache))
    rotary = RotaryEmbedding(config.head_dim, max_model_len, config.rope_theta, config.rope_scaling, device, dtype)
    rotary_sliding = rotary
    if config.rope_theta_sliding is not None:
        rotary_sliding = RotaryEmbedding(config.head_dim, max_model_len, config.rope_theta_sliding, None, device, dtype)
    return ModelState(
        model,
        kv_caches,
        block_size,
        max_model_len,
        rotary,
        rotary_sliding,
        [config.is_sliding(layer) for layer in range(config.num_layers)],
        device,
        dtype,
        exact_kernels,
        null_slot,
        null_slot + 1,
    )
