"""Paged attention in plain PyTorch: write the step's keys/values into the cache, then attend.

The cache of one layer is two tensors shaped [num_slots, num_kv_heads, head_dim] (float16 on the CPU
by default: written rounded, read back widened), where a slot is
`block_id * block_size + offset`. `AttentionMetadata` is built once per step by the PyTorch
executor (executors/torch_eager.py) and shared by every layer; it picks one of three layouts:
- fresh: one sequence with no cached context, so keys/values are the step's own (causal SDPA);
- one sequence whose context occupies a contiguous run of slots: a view of the cache, no copy;
- otherwise: gather each sequence's context by slot, pad queries to [num_seqs, max_query_len].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    cos: torch.Tensor  # [num_tokens, 1, head_dim / 2]
    sin: torch.Tensor
    is_fresh: bool = False  # one sequence, no cached context, causal mask is enough
    kv_range: tuple[int, int] | None = None  # one sequence, context in slots [start, end)
    kv_slots: torch.Tensor | None = None  # [num_seqs, max_context_len] slots to gather
    query_index: torch.Tensor | None = None  # [num_seqs, max_query_len] into the flat tokens
    output_index: torch.Tensor | None = None  # [num_tokens] into the padded [num_seqs * max_query_len]
    attn_mask: torch.Tensor | None = None  # [num_seqs, 1, max_query_len, max_context_len], True = attend


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,  # softmax scale; None: 1 / sqrt(head_dim)
) -> torch.Tensor:
    """Returns [num_tokens, num_heads * head_dim]."""
    num_tokens = q.shape[0]
    k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    if k_cache.dtype != q.dtype:  # a narrower cache: attend over the values as it holds them, so a prompt
        k, v = k.to(k_cache.dtype).to(q.dtype), v.to(v_cache.dtype).to(q.dtype)  # whole == in chunks

    if meta.is_fresh:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True, scale=scale
        )  # [num_heads, num_tokens, head_dim]
        return out.transpose(0, 1).reshape(num_tokens, -1)

    if meta.kv_range is not None:
        start, end = meta.kv_range
        keys = k_cache[start:end].transpose(0, 1).unsqueeze(0)  # [1, num_kv_heads, context, head_dim]
        values = v_cache[start:end].transpose(0, 1).unsqueeze(0)
    else:
        assert meta.kv_slots is not None
        keys = k_cache[meta.kv_slots].transpose(1, 2)  # [num_seqs, num_kv_heads, context, head_dim]
        values = v_cache[meta.kv_slots].transpose(1, 2)
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # (no copy when the cache has q's type)

    if meta.query_index is None:  # one sequence: no padding
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys, values, attn_mask=meta.attn_mask, enable_gqa=True, scale=scale
        )  # [1, num_heads, num_tokens, head_dim]
        return out[0].transpose(0, 1).reshape(num_tokens, -1)

    assert meta.output_index is not None
    queries = q[meta.query_index].transpose(1, 2)  # [num_seqs, num_heads, max_query_len, head_dim]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.attn_mask, enable_gqa=True, scale=scale)
    num_seqs, num_heads, max_query_len, head_dim = out.shape
    out = out.transpose(1, 2).reshape(num_seqs * max_query_len, num_heads * head_dim)
    return out[meta.output_index]
