"""The embedded SmolLM2-135M-Instruct GGUF: fulmine's greedy chat answers equal transformers'."""

from __future__ import annotations

import pytest
import torch

from fulmine import LLM, SamplingParams
from fulmine.models.source import default_model_path

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."},
    ],
    [{"role": "user", "content": "Write a haiku about lightning."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count from one to five."},
    ],
]
NUM_TOKENS = 24


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF loader (dequantized to float32) and its converted tokenizer."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model


@pytest.fixture(scope="module")
def exact() -> LLM:
    return LLM(dtype="float32", weight_dtype="float32", exact_kernels=True, progress=False)


def hf_greedy(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=num_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_greedy_chat_matches_transformers(reference, exact: LLM, chat: int) -> None:
    prompt_ids = exact.engine.encode_prompt(CHATS[chat])
    ours = exact.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True))[0]
    assert ours.token_ids == hf_greedy(reference, prompt_ids, NUM_TOKENS)


def test_default_fast_path_stays_close(exact: LLM) -> None:
    """float16 weight storage: same greedy tokens, or where they first differ, a top-3 choice of float32's."""
    fast = LLM(progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=3)
    for chat in CHATS:
        ref, ours = exact.chat(chat, params), fast.chat(chat, params)
        for step, (a, b) in enumerate(zip(ref.token_ids, ours.token_ids)):
            if a != b:
                assert ref.logprobs is not None
                assert b in [t for t, _ in ref.logprobs[step].top]
                break


def test_tokenizer_matches_transformers_gguf_conversion(exact: LLM) -> None:
    from transformers import AutoTokenizer

    path = default_model_path()
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "Héllo wörld! 東京 🎉 code: `x = 1`\n"
    assert exact.tokenizer.encode(text) == theirs.encode(text)
