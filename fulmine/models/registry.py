"""The supported model families: the only place an architecture name is looked up.

A family says how its checkpoints differ from plain Llama. Adding one (Gemma 3, say) means adding
an entry here, plus a model class if its layers differ beyond these switches.
"""

from __future__ import annotations

from dataclasses import dataclass

from fulmine.config import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    hf_architecture: str  # config.json "architectures"
    gguf_architecture: str  # GGUF "general.architecture"
    qkv_bias: bool | None  # None: read "attention_bias" from config.json
    qk_norm: bool
    sliding_window_key: str | None  # config.json switch that enables sliding_window, or None: always honoured
    gguf_permuted_qk: bool  # llama.cpp's converter reorders q/k rows for its interleaved RoPE


FAMILIES = (
    Family("llama", "LlamaForCausalLM", "llama", None, False, None, True),
    Family("mistral", "MistralForCausalLM", "mistral", None, False, None, True),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", True, False, "use_sliding_window", False),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", None, True, "use_sliding_window", False),
    # text-only Gemma 3 (its GGUF files store the norms with Gemma's +1 already added)
    Family("gemma3", "Gemma3ForCausalLM", "gemma3", None, True, None, False),
)


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
