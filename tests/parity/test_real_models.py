"""Real GGUF files people download (Qwen2.5-Coder-0.5B-Instruct and Gemma 3 270M, Q4_K_M, fetched by
scripts/fetch_models.py): fulmine's logits and greedy tokens vs transformers' own GGUF loading
(dequantized, float32)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fulmine import LLM, SamplingParams

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch_models.py"
PROMPTS = [
    "def fibonacci(n):",
    "The three laws of thermodynamics are",
]


def fetch(name: str) -> Path:
    spec = importlib.util.spec_from_file_location("fetch_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return Path(module.fetch(module.MODELS[name], module.default_dir()))


MODELS = ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"]


@pytest.fixture(scope="module", params=MODELS)
def reference(request):
    """(GGUF path, transformers' tokenizer, transformers' model loaded from the same file in float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch(request.param)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    yield path, tokenizer, model
    del model


def test_the_tokenizer_is_transformers_own(reference) -> None:
    """fulmine's tokenizer (built from the file on first use, then read from its cache) equals
    transformers' reading of the GGUF file."""
    from fulmine.models.source import resolve
    from fulmine.tokenizer import _from_gguf, load_tokenizer
    from tests.unit.test_chat_template import assert_same_prompts
    from tests.unit.test_detokenizer import assert_same_tokenizer
    from tests.unit.test_gguf_tokenizer import assert_built_as_transformers_converts

    path, tokenizer, _ = reference
    assert_same_tokenizer(_from_gguf(resolve(str(path))), tokenizer)  # the fallback for other kinds
    load_tokenizer(resolve(str(path)))  # builds once, into the cache
    assert_same_tokenizer(load_tokenizer(resolve(str(path))), tokenizer)
    assert_same_prompts(load_tokenizer(resolve(str(path))), tokenizer)  # with tools, reasoning, tool calls
    assert_built_as_transformers_converts(path)  # the first use's build, without transformers


def test_logits_and_greedy_tokens_match_transformers(reference) -> None:
    """With exact kernels and float32 activations (every block type kept as the file has it, multiplied
    in C): 32 greedy tokens equal, the first step's top 5 too, their logprobs within 2e-3."""
    path, tokenizer, model = reference
    llm = LLM(str(path), dtype="float32", weight_dtype="float32", exact_kernels=True, speculative="off", progress=False)
    for prompt in PROMPTS:
        ids = list(tokenizer.encode(prompt))
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
            hf_logits = model(torch.tensor([ids])).logits[0, -1]
        ours = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5))[0]
        assert ours.token_ids[: len(expected)] == expected, (prompt, ours.token_ids, expected)
        assert ours.logprobs is not None
        hf_logprobs = hf_logits.log_softmax(-1)
        top = ours.logprobs[0].top
        assert [t for t, _ in top] == hf_logprobs.topk(5).indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), hf_logprobs.topk(5).values, atol=2e-3, rtol=0)


def test_fast_kernels_diverge_only_to_a_top_5_token(reference) -> None:
    """With the defaults (int8 activations in the kernels, as llama.cpp computes): wherever the greedy
    tokens first differ from transformers', ours is in transformers' top 5 at that step."""
    path, tokenizer, model = reference
    llm = LLM(str(path), speculative="off", progress=False)
    for prompt in PROMPTS:
        ids = list(tokenizer.encode(prompt))
        ours = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))[0].token_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids + ours])).logits[0, len(ids) - 1 : -1]  # the step before each token
        expected = logits.argmax(-1).tolist()
        step = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), None)
        if step is not None:
            assert ours[step] in logits[step].topk(5).indices.tolist(), (prompt, step, ours[step], expected[step])
