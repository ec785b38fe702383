"""Gemma 3 (text): "sandwich" norms (each sub-block's output normalized before it joins the
residual stream, a norm before the MLP), a GeGLU MLP, embeddings scaled by sqrt(hidden), norms that
scale by (1 + w) (folded into w at load), its own softmax scale, and sliding-window layers with
their own RoPE base between global ones. Its config departures from Llama's, read from config.json
and from GGUF metadata (which leaves most of them to what llama.cpp assumes), live here too."""

from __future__ import annotations

from typing import Any

import torch

from fulmine.config import ConfigError, ModelConfig
from fulmine.layers.attention import AttentionMetadata
from fulmine.layers.norm import RMSNorm
from fulmine.models.decoder import Attention, CausalLM, DecoderLayer, make_mlp
from fulmine.models.gguf_file import GGUFFile
from fulmine.models.llama import GGUF_LAYER_NAMES

# llama.cpp's ffn_norm is the norm before the MLP here, and there are two more
GGUF_SANDWICH_NAMES = {
    **GGUF_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


class Gemma3DecoderLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.mlp = make_mlp(config, layer)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    @property
    def pre_mlp_norm(self) -> RMSNorm:  # type: ignore[override]
        return self.pre_feedforward_layernorm

    @property
    def attn_out_norm(self) -> RMSNorm:  # type: ignore[override]
        return self.post_attention_layernorm

    @property
    def mlp_out_norm(self) -> RMSNorm:  # type: ignore[override]
        return self.post_feedforward_layernorm

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x if residual is None else x + residual
        h = self.post_attention_layernorm(self.self_attn(self.input_layernorm(residual), kv_cache, meta))
        residual = residual + h
        h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(residual)))
        return h, residual


class Gemma3ForCausalLM(CausalLM):
    layer_class = Gemma3DecoderLayer
    gguf_layer_names = GGUF_SANDWICH_NAMES


def hf_fields(raw: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's departures from Llama, from its config.json (transformers 4.5x and 5.x spellings);
    `fields`: the config as read for Llama."""
    hidden_size, head_dim, num_layers = fields["hidden_size"], fields["head_dim"], fields["num_layers"]
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if raw.get(cap) is not None:
            raise ConfigError(f"{cap} is not supported")
    per_type = raw.get("rope_parameters") or {}
    full = dict(
        per_type.get("full_attention") or {"rope_theta": raw.get("rope_theta", 1e6), **(raw.get("rope_scaling") or {})}
    )
    local = per_type.get("sliding_attention") or {"rope_theta": raw.get("rope_local_base_freq", 10000.0)}
    if local.get("rope_type", "default") != "default":
        raise ConfigError("RoPE scaling on Gemma 3's sliding-window layers is not supported")
    theta = float(full.pop("rope_theta", 1e6))
    pattern = int(raw.get("sliding_window_pattern", 6))
    types = raw.get("layer_types") or [
        "full_attention" if (layer + 1) % pattern == 0 else "sliding_attention" for layer in range(num_layers)
    ]
    return dict(
        rope_theta=theta,
        rope_scaling=full if full.get("rope_type", full.get("type", "default")) != "default" else None,
        rope_theta_sliding=float(local["rope_theta"]),
        layer_types=tuple("sliding" if kind == "sliding_attention" else "full" for kind in types),
        norm_offset=1.0,
        embed_scale=hidden_size**0.5,
        hidden_act="gelu_tanh",
        attn_scale=float(raw.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
    )


def gguf_fields(config: ModelConfig, gguf: GGUFFile) -> dict[str, Any]:
    """Gemma 3's departures from Llama that its GGUF metadata leaves out, as llama.cpp assumes them:
    every 6th layer global (RoPE base from the file), the others sliding with base 10 000; norms
    already hold 1 + w; the 27B (62 layers) scales queries by hidden/heads instead of head_dim."""
    num_layers, hidden = config.num_layers, config.hidden_size
    query_scale = hidden // config.num_heads if num_layers == 62 else config.head_dim
    return dict(
        rope_theta_sliding=10000.0,
        layer_types=tuple("full" if (layer + 1) % 6 == 0 else "sliding" for layer in range(num_layers)),
        norm_offset=0.0,
        embed_scale=hidden**0.5,
        hidden_act="gelu_tanh",
        attn_scale=float(query_scale) ** -0.5,
    )
