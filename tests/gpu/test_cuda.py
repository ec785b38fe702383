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


@pytest.mark.xfail(
    reason="not batch-invariant in bfloat16 on CUDA yet: cuBLAS picks its kernel (and reduction order) by "
    "the number of rows, so a row's logits depend on its batch and near-ties flip (issue 10)",
    strict=False,
)
def test_bfloat16_batched_equals_alone_on_cuda(tiny_llama) -> None:
    llm = LLM(str(tiny_llama), device="cuda", progress=False)
    prompts = ["The quick brown fox", "Paris is the capital of France.", "def main(): return 42"]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    alone = [llm.generate(p, params)[0].token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone


@pytest.mark.parametrize("family", ["llama", "mistral_window", "gemma3"])
def test_cuda_graph_decode_equals_the_torch_executor(tiny_model_factory, family: str) -> None:
    """Captured decode steps (padded batch, context bucket, sliding-window masks) give the PyTorch
    executor's tokens, alone and batched; graphs really were captured and replayed."""
    path = str(tiny_model_factory(family))
    args = dict(device="cuda", dtype="float32", weight_dtype="float32", progress=False, speculative="off")
    graphs = LLM(path, executor="cuda-graph", **args)
    eager = LLM(path, executor="torch", **args)
    prompts = ["The quick brown fox", "Paris is the capital of France.", "def main(): return 42"]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [o.token_ids for o in eager.generate(prompts, params)]
    assert [o.token_ids for o in graphs.generate(prompts, params)] == expected
    assert [graphs.generate(p, params)[0].token_ids for p in prompts] == expected
    executor = graphs.engine.runner.executors[0]
    assert executor.name == "cuda-graph" and len(executor.graphs) >= 2  # batch sizes 1 and 4


def test_cuda_graph_seeded_sampling_and_logprobs(tiny_llama) -> None:
    args = dict(device="cuda", dtype="float32", weight_dtype="float32", progress=False, speculative="off")
    graphs, eager = LLM(str(tiny_llama), executor="cuda-graph", **args), LLM(str(tiny_llama), executor="torch", **args)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=24, ignore_eos=True, logprobs=2)
    a, b = graphs.generate("The quick brown fox", params)[0], eager.generate("The quick brown fox", params)[0]
    assert a.token_ids == b.token_ids
    assert a.logprobs is not None and b.logprobs is not None
    for x, y in zip(a.logprobs, b.logprobs):
        assert abs(x.logprob - y.logprob) < 1e-3
