"""Shared fixtures: tiny random HF models of every supported family, saved with a tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# every engine in the suite (servers started by it too) checks its bookkeeping after every step
os.environ.setdefault("FULMINE_CHECK_INVARIANTS", "1")


def draft_always(governor: Any) -> Any:
    """Make a speculation governor draft whatever its proposer offers, every step (the measured policy
    turns drafting off on tiny random models): verification runs in every test that uses it."""
    assert governor is not None
    governor.choose = lambda acceptance, available, batch_size, context=0: available
    return governor


CORPUS = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "Numbers: 0 1 2 3 4 5 6 7 8 9. Café, naïve, 東京, 🎉 emoji. def main(): return 42\n"
) * 4

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(cls="LlamaConfig", tie_word_embeddings=False),
    "llama_tied_llama3_rope": dict(
        cls="LlamaConfig",
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": dict(cls="MistralConfig", sliding_window=None),
    "mistral_window": dict(cls="MistralConfig", sliding_window=12),
    "qwen2": dict(cls="Qwen2Config"),
    "qwen3": dict(cls="Qwen3Config", head_dim=32),
    # alternating sliding-window (8 tokens, RoPE base 10k) and global layers (base 1M), sandwich norms
    "gemma3": dict(
        cls="Gemma3TextConfig",
        head_dim=16,
        sliding_window=8,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,
    ),
}

# mixtures of experts (tests/parity/test_moe.py): 8 experts of 32, 2 per token; Qwen3-MoE with a
# dense layer among them, OLMoE with its whole-width q/k norms and unnormalized weights
MOE_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        cls="Qwen3MoeConfig", head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, mlp_only_layers=[1], num_hidden_layers=3,
    ),
    "olmoe": dict(cls="OlmoeConfig", num_experts=8, num_experts_per_tok=2, intermediate_size=32, num_key_value_heads=4),
    "mixtral": dict(cls="MixtralConfig", num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
}  # fmt: skip

DATA = Path(__file__).parent / "data"
THINK_TOKENS = ("<think>", "</think>")  # Qwen3's and the R1 distills' tags, added tokens (not special) there too


def build_tokenizer(path: Path, added: tuple[str, ...] = (), template: str | None = None) -> Any:
    """A small byte-level BPE tokenizer with a ChatML template (or `template`), trained on CORPUS;
    `added`: tokens added whole, as reasoning models' tags are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([CORPUS], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = template or (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    if added:
        tokenizer.add_tokens(list(added))
    tokenizer.save_pretrained(path)
    return tokenizer


def build_tiny_model(family: str, path: Path, **tokenizer_args: Any) -> Path:
    import transformers

    spec = dict(FAMILIES.get(family) or MOE_FAMILIES[family])
    config_cls = getattr(transformers, spec.pop("cls"))
    tokenizer = build_tokenizer(path, **tokenizer_args)
    shape: dict[str, Any] = dict(
        num_hidden_layers=2, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256
    )
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_attention_heads=4,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **(shape | spec),
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is ~N(0, 0.02): widen it so logits are not all near-ties
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny_model(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return make


def thinking_template(kind: str) -> str:
    """Real reasoning models' chat templates: Qwen3's (the model opens <think> itself; an empty block
    when enable_thinking is false), the DeepSeek-R1 distill's from its GGUF, and that one as its later
    revision has it, opening <think> in the generation prompt (the answer starts inside the thinking)."""
    if kind == "qwen3":
        return (DATA / "qwen3_chat_template.jinja").read_text()
    r1 = (DATA / "deepseek_r1_distill_chat_template.jinja").read_text()
    if kind == "r1":
        return r1
    opened = r1.replace("{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    assert opened != r1
    return opened


@pytest.fixture(scope="session")
def tiny_thinker_factory(tmp_path_factory: pytest.TempPathFactory):
    """Tiny random Qwen3 models with <think> tags as tokens and a real reasoning template (see
    thinking_template: qwen3, r1, r1_opened)."""
    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in cache:
            path = tmp_path_factory.mktemp(f"thinker-{kind}")
            cache[kind] = build_tiny_model("qwen3", path, added=THINK_TOKENS, template=thinking_template(kind))
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")
