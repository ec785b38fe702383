"""CUDA paths: parity and invariances on a GPU. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch

from fulmine import LLM, SamplingParams
from tests.parity.test_hf_parity import PROMPT, fulmine_greedy, hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral_window"])
def test_float32_parity_on_cuda(tiny_model_factory, family: str) -> None:
    path = tiny_model_factory(family)
    llm = LLM(str(path), device="cuda", dtype="float32", weight_dtype="float32", progress=False)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    ref_tokens, ref_logits = hf_greedy(path, prompt_ids, 16)
    tokens, logits = fulmine_greedy(llm, prompt_ids, 16)
    for ours, ref in zip(logits, ref_logits):
        torch.testing.assert_close(ours.cpu(), ref, atol=1e-3, rtol=1e-3)
    assert tokens == ref_tokens


def test_bfloat16_batched_equals_alone_on_cuda(tiny_llama) -> None:
    llm = LLM(str(tiny_llama), device="cuda", progress=False)
    prompts = ["The quick brown fox", "Paris is the capital of France.", "def main(): return 42"]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    alone = [llm.generate(p, params)[0].token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone
