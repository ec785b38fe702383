"""Llama and the families that are its block with other switches: Mistral (sliding window),
Qwen2 (q/k/v biases, a window behind a switch), Qwen3 (q/k norms), and with a mixture of experts for
the MLP (layers/experts.py): Mixtral, Qwen3-MoE, OLMoE (q/k norms over all heads at once). Pre-norm
layers: RMSNorm -> attention -> RMSNorm -> SwiGLU MLP (or experts), each added to the residual stream
(the norm fused with the add)."""

from __future__ import annotations

import torch

from fulmine.config import ModelConfig
from fulmine.layers.attention import AttentionMetadata
from fulmine.layers.norm import RMSNorm
from fulmine.models.decoder import Attention, CausalLM, DecoderLayer, make_mlp

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # a mixture of experts' router; its experts: loader.py
}


class LlamaDecoderLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = make_mlp(config, layer)

    @property
    def pre_mlp_norm(self) -> RMSNorm:  # type: ignore[override]
        return self.post_attention_layernorm

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm.add_and_norm(x, residual)
        x = self.self_attn(x, kv_cache, meta)
        x, residual = self.post_attention_layernorm.add_and_norm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(CausalLM):
    layer_class = LlamaDecoderLayer
    gguf_layer_names = GGUF_LAYER_NAMES
