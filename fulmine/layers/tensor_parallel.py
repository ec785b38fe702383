"""Tensor parallelism: one model split across ranks, which run every step together.

Megatron's split, on torch.distributed (gloo on the CPU): q/k/v and gate/up are column-parallel
(each rank holds its heads' rows, its share of the MLP's), o and down row-parallel (the matching
columns) with one all-reduce each; the embedding and the LM head are vocab-parallel (each rank
holds a slice of the vocabulary: a token's embedding is the sum over ranks of the one rank that
holds it, and the logits are the ranks' slices gathered). KV heads are split with the heads, so
each rank's KV cache holds num_kv_heads / world of them; with more ranks than KV heads, each rank
holds a copy of the one KV head its query heads share (as vLLM does). Checkpoint tensors are dequantized and
sliced at load: on the CPU this is a correctness path (gloo moves every activation through
sockets; see docs/BENCHMARKS.md); its speed matters with NCCL on GPUs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fulmine.config import ConfigError, ModelConfig
from fulmine.layers.weights import WeightTensor, as_dense

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # rows split
_ROW = ("o_proj", "down_proj")  # columns split; the bias added once (rank 0)
_VOCAB = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world: int

    def vocab_shard(self, vocab_size: int) -> int:
        """Rows of the vocabulary each rank holds (the last rank's padded with zero rows)."""
        return -(-vocab_size // self.world)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x)
        return x

    def gather_logits(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[n, vocab_shard] on each rank -> [n, vocab_size] on every rank."""
        if self.world == 1:
            return local[:, :vocab_size]
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=1)[:, :vocab_size]

    def embed(self, table: torch.nn.Module, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The embedding of each token: its row from the rank holding it, zeros elsewhere, summed."""
        shard = self.vocab_shard(vocab_size)
        local = input_ids - self.rank * shard
        inside = (local >= 0) & (local < shard)
        x = table(torch.where(inside, local, torch.zeros_like(local)))
        x = x * inside.unsqueeze(-1).to(x.dtype)
        return self.all_reduce(x.contiguous())


def shard_config(config: ModelConfig, tp: TensorParallel) -> ModelConfig:
    """The shape of one rank's part of the model."""
    w, kv = tp.world, config.num_kv_heads
    if config.num_experts or config.qk_norm_whole:
        raise ConfigError("tensor parallelism does not split mixture-of-experts models (nor OLMoE's q/k norms)")
    for name, value, ok in (
        ("attention heads", config.num_heads, config.num_heads % w == 0),
        ("KV heads", kv, kv % w == 0 or w % kv == 0),  # more ranks than KV heads: each holds a copy of one
        ("intermediate size", config.intermediate_size, config.intermediate_size % w == 0),
    ):
        if not ok:
            raise ConfigError(f"--tensor-parallel-size {w} does not divide the model's {value} {name}")
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // w,
        num_kv_heads=max(1, kv // w),
        intermediate_size=config.intermediate_size // w,
        vocab_size=tp.vocab_shard(config.vocab_size),
    )


def shard_tensor(name: str, tensor: WeightTensor, config: ModelConfig, tp: TensorParallel) -> torch.Tensor:
    """This rank's part of a checkpoint tensor (HF name), dense in float32."""
    value = as_dense(tensor, torch.float32)
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    is_bias = parts[-1] == "bias"
    r, w = tp.rank, tp.world
    kv = config.num_kv_heads
    if module in ("k_proj", "v_proj") and w > kv:  # the one KV head this rank's query heads share
        height = value.shape[0] // kv
        head = r * kv // w
        return value[head * height : (head + 1) * height]
    if module in _COLUMN:
        height = value.shape[0] // w
        return value[r * height : (r + 1) * height]
    if module in _ROW:
        if is_bias:
            return value if r == 0 else torch.zeros_like(value)
        width = value.shape[1] // w
        return value[:, r * width : (r + 1) * width]
    if module in _VOCAB:
        shard = tp.vocab_shard(config.vocab_size)
        part = value[r * shard : (r + 1) * shard]
        if part.shape[0] < shard:  # the last rank's padding: zero rows, whose logits are dropped
            part = torch.cat([part, part.new_zeros(shard - part.shape[0], *part.shape[1:])])
        return part
    return value  # norms, replicated
