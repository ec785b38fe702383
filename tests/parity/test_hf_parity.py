"""Logits and greedy tokens against Hugging Face transformers on tiny random models of each family."""

from __future__ import annotations

import pytest
import torch

from fulmine import LLM, SamplingParams
from tests.conftest import FAMILIES

NUM_STEPS = 32
PROMPT = "The quick brown fox jumps over the lazy dog. Paris is"


def hf_greedy(path, prompt_ids: list[int], num_steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits each was chosen from, by full recomputation (no HF cache)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = list(prompt_ids)
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(num_steps):
            step_logits = model(torch.tensor([ids])).logits[0, -1].float()
            token = int(step_logits.argmax())
            tokens.append(token)
            logits.append(step_logits)
            ids.append(token)
    return tokens, logits


def fulmine_greedy(llm: LLM, prompt_ids: list[int], num_steps: int) -> tuple[list[int], list[torch.Tensor]]:
    captured: list[torch.Tensor] = []
    model = llm.engine.runner.model
    original = model.compute_logits

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        out = original(hidden)
        captured.append(out[0].clone())
        return out

    model.compute_logits = capture  # type: ignore[method-assign]
    try:
        params = SamplingParams(temperature=0.0, max_tokens=num_steps, ignore_eos=True)
        output = llm.generate([prompt_ids], params)[0]
    finally:
        del model.compute_logits
    return output.token_ids, captured


def parity_llm(path, chunked: bool) -> LLM:
    """float32 throughout; the prompt whole or in chunks of 5 tokens."""
    return LLM(
        str(path),
        dtype="float32",
        weight_dtype="float32",
        progress=False,
        max_num_batched_tokens=5 if chunked else 512,
        speculative="off",  # logits are captured one step per token (speculation: test_speculation_parity.py)
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_logits_and_greedy_match_transformers(tiny_model_factory, family: str, chunked: bool) -> None:
    path = tiny_model_factory(family)
    llm = parity_llm(path, chunked)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    assert len(prompt_ids) > 10
    ref_tokens, ref_logits = hf_greedy(path, prompt_ids, NUM_STEPS)
    tokens, logits = fulmine_greedy(llm, prompt_ids, NUM_STEPS)
    assert len(logits) == NUM_STEPS
    for step, (ours, ref) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")
    assert tokens == ref_tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers_with_a_float16_cache(tiny_model_factory, family: str) -> None:
    """The CPU's default float16 KV cache: keys and values rounded to float16 move the tiny models'
    logits (of order 1) by at most 0.02 (measured: up to 0.0096), with float32 weights and
    activations and a chunked prefill."""
    path = tiny_model_factory(family)
    llm = LLM(
        str(path),
        dtype="float32",
        weight_dtype="float32",
        kv_cache_dtype="float16",
        progress=False,
        max_num_batched_tokens=5,
        speculative="off",
    )
    prompt_ids = llm.tokenizer.encode(PROMPT)
    _, ref_logits = hf_greedy(path, prompt_ids, NUM_STEPS)
    _, logits = fulmine_greedy(llm, prompt_ids, NUM_STEPS)
    for step, (ours, ref) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(ours, ref, atol=2e-2, rtol=2e-2, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_prompt_logprobs_match_transformers(tiny_llama, chunked: bool) -> None:
    from transformers import AutoModelForCausalLM

    llm = LLM(
        str(tiny_llama),
        dtype="float32",
        weight_dtype="float32",
        progress=False,
        block_size=4,
        max_num_batched_tokens=5 if chunked else 512,
    )
    prompt_ids = llm.tokenizer.encode(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([prompt_ids])).logits[0].log_softmax(dim=-1)  # [num_prompt, vocab]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2)
    for _ in range(2):  # the second time the prompt is in the prefix cache, which must not skip it
        out = llm.generate([prompt_ids], params)[0]
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt_ids) - 1
        for p, entry in enumerate(out.prompt_logprobs):
            assert entry.logprob == pytest.approx(float(reference[p, prompt_ids[p + 1]]), abs=2e-4)
            top = reference[p].topk(2)
            assert [t for t, _ in entry.top] == top.indices.tolist()
