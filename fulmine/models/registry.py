"""The supported model families: the only place an architecture name is looked up.

A family says which model file builds it (models/llama.py, models/gemma3.py) and how its
checkpoints differ from plain Llama's. Adding one means an entry here and, if its layers differ
beyond these switches, a model file of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fulmine.config import ConfigError, ModelConfig
from fulmine.models import gemma3
from fulmine.models.decoder import CausalLM
from fulmine.models.gemma3 import Gemma3ForCausalLM
from fulmine.models.gguf_file import GGUFFile
from fulmine.models.llama import LlamaForCausalLM


@dataclass(frozen=True, kw_only=True)
class Family:
    name: str
    hf_architecture: str  # config.json "architectures"
    gguf_architecture: str  # GGUF "general.architecture"
    model: type[CausalLM]  # the model file's class
    model_type: str  # transformers' config model_type (what picks its tokenizer class)
    qkv_bias: bool | None = None  # None: read "attention_bias" from config.json
    qk_norm: bool = False
    sliding_window_key: str | None = None  # config.json switch that enables sliding_window; None: always honoured
    gguf_permuted_qk: bool = False  # llama.cpp's converter reorders q/k rows for its interleaved RoPE
    # the family's config fields beyond Llama's: from config.json (given what was read for Llama),
    # and from GGUF metadata (given the config read as Llama's)
    hf_fields: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    gguf_fields: Callable[[ModelConfig, GGUFFile], dict[str, Any]] | None = None
    # mixtures of experts: the router's chosen weights renormalized to sum to 1 where config.json does
    # not say (Mixtral always does; OLMoE never), and in GGUF files (as llama.cpp runs each family)
    norm_topk_prob: bool = True


def olmoe_hf_fields(raw: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """OLMoE's departures from Llama: q/k norms over all heads at once, q/k/v optionally clipped."""
    clip = raw.get("clip_qkv")
    return dict(qk_norm_whole=True, clip_qkv=float(clip) if clip is not None else None)


def olmoe_gguf_fields(config: ModelConfig, gguf: GGUFFile) -> dict[str, Any]:
    """The same from GGUF metadata (llama.cpp's clamp_kqv)."""
    clip = gguf.metadata.get("olmoe.attention.clamp_kqv")
    return dict(qk_norm_whole=True, clip_qkv=float(clip) if clip else None)


FAMILIES = (
    Family(
        name="llama", model_type="llama",
        hf_architecture="LlamaForCausalLM", gguf_architecture="llama", model=LlamaForCausalLM,
        gguf_permuted_qk=True,
    ),
    Family(
        name="mistral", model_type="mistral",
        hf_architecture="MistralForCausalLM", gguf_architecture="mistral", model=LlamaForCausalLM,
        gguf_permuted_qk=True,
    ),
    Family(
        name="qwen2", model_type="qwen2",
        hf_architecture="Qwen2ForCausalLM", gguf_architecture="qwen2", model=LlamaForCausalLM,
        qkv_bias=True, sliding_window_key="use_sliding_window",
    ),
    Family(
        name="qwen3", model_type="qwen3",
        hf_architecture="Qwen3ForCausalLM", gguf_architecture="qwen3", model=LlamaForCausalLM,
        qk_norm=True, sliding_window_key="use_sliding_window",
    ),
    # mixtures of experts: Llama's block with experts for the MLP (models/decoder.py make_mlp); a
    # Mixtral GGUF file is a "llama" one with experts
    Family(
        name="mixtral", model_type="mixtral",
        hf_architecture="MixtralForCausalLM", gguf_architecture="", model=LlamaForCausalLM,
        gguf_permuted_qk=True,
    ),
    Family(
        name="qwen3_moe", model_type="qwen3_moe",
        hf_architecture="Qwen3MoeForCausalLM", gguf_architecture="qwen3moe", model=LlamaForCausalLM,
        qk_norm=True, sliding_window_key="use_sliding_window",
    ),
    # OLMoE: q/k norms over all heads at once, weights of the chosen experts as the softmax gave them
    Family(
        name="olmoe", model_type="olmoe",
        hf_architecture="OlmoeForCausalLM", gguf_architecture="olmoe", model=LlamaForCausalLM,
        qk_norm=True, norm_topk_prob=False, hf_fields=olmoe_hf_fields, gguf_fields=olmoe_gguf_fields,
    ),
    # text-only Gemma 3 (its GGUF files store the norms with Gemma's +1 already added)
    Family(
        name="gemma3", model_type="gemma3_text",
        hf_architecture="Gemma3ForCausalLM", gguf_architecture="gemma3", model=Gemma3ForCausalLM,
        qk_norm=True, hf_fields=gemma3.hf_fields, gguf_fields=gemma3.gguf_fields,
    ),
)  # fmt: skip


def _unsupported(kind: str, name: str, known: list[str]) -> ConfigError:
    return ConfigError(f"unsupported {kind} {name!r}; fulmine supports: {', '.join(known)}")


def family_for_hf(architecture: str) -> Family:
    for family in FAMILIES:
        if family.hf_architecture == architecture:
            return family
    raise _unsupported("architecture", architecture, [f.hf_architecture for f in FAMILIES])


def family_for_gguf(architecture: str) -> Family:
    for family in FAMILIES:
        if family.gguf_architecture and family.gguf_architecture == architecture:
            return family
    raise _unsupported(
        "GGUF architecture", architecture, [f.gguf_architecture for f in FAMILIES if f.gguf_architecture]
    )


def model_for(config: ModelConfig) -> CausalLM:
    """The model of a config's family, its parameters allocated on the current device, unfilled."""
    return family_for_hf(config.architecture).model(config)
