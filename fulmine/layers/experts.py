"""A mixture-of-experts MLP: a router scores every expert for each token, the token runs through the
k it scores highest (each a gated MLP), and their outputs are summed weighted by the router's
softmax (renormalized over the chosen k where the family does).

The experts' matrices are stacked, expert after expert, in two merged layers: `gate_up_proj` holds
expert e's gate rows then its up rows (shards 2e and 2e+1), `down_proj` its down rows (shard e),
so each is loaded, kept in GGUF blocks and interleaved like any merged matrix, and an expert's
product reads only its own rows. A step groups its tokens by expert: each chosen expert's rows are
read once for all the tokens that chose it. A token's outputs are added in the order of its
experts' ids, whatever else the step holds, so a row computes the same alone or batched.
"""

from __future__ import annotations

import torch
from torch import nn

from fulmine.config import ModelConfig
from fulmine.layers.activation import gelu_tanh_and_mul, silu_and_mul
from fulmine.layers.linear import Linear, MergedLinear


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2 * num_experts)
        self.down_proj = MergedLinear(intermediate_size, [hidden_size] * num_experts)
        self.act_and_mul = gelu_tanh_and_mul if hidden_act == "gelu_tanh" else silu_and_mul

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, hidden]; expert_ids, weights [T, k]: each token's experts and their weights."""
        out = torch.zeros_like(x)
        size, hidden = self.intermediate_size, self.hidden_size
        for expert in torch.unique(expert_ids).tolist():  # ascending: every token adds in expert order
            tokens, slots = (expert_ids == expert).nonzero(as_tuple=True)
            h = self.gate_up_proj.rows(x[tokens], 2 * expert * size, 2 * (expert + 1) * size)
            h = self.down_proj.rows(self.act_and_mul(h), expert * hidden, (expert + 1) * hidden)
            out.index_add_(0, tokens, h * weights[tokens, slots, None].to(h.dtype))
        return out


class Router(Linear):
    """The router's matrix [num_experts, hidden], kept in the checkpoint's precision: never narrowed or
    quantized (its scores pick the experts; llama.cpp keeps it in float32 too)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.full_precision = True


class SparseMoE(nn.Module):
    """The router (`gate`, as HF names it) and the experts; a drop-in for a layer's MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Router(config.hidden_size, config.num_experts)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size, config.hidden_act)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's k experts [T, k] (best first) and their weights [T, k] in float32."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return expert_ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert_ids, weights = self.route(x)
        return self.experts(x, expert_ids, weights)
