"""Batch invariance in the default mode (quantized weights, int8 activations, float16 KV cache), on the
embedded model and two real Q4_K_M files:
the same greedy request gives the same token ids alone, batched beside other requests' prefills,
prefilled in chunks of any size, served again from the prefix cache, and with speculation on or off.

Every step runs the fused C decoder (executors/cpu_fused.py), whose row kernels and attention
compute a row's bits whatever else shares the step; the last prompt (~1100 tokens) is chunked past
the 512th position and, on Gemma 3, past its sliding window.
"""

from __future__ import annotations

import pytest

from fulmine import LLM, SamplingParams
from fulmine.models.source import default_model_path

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": "Write a haiku about lightning."}],
    [{"role": "user", "content": "Explain recursion to a child. " * 12}],  # ~100 tokens: a multi-row prefill
    [{"role": "user", "content": "List the planets of the solar system, one per line."}],
    [{"role": "user", "content": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# Explain it."}],
    [{"role": "user", "content": "Translate 'good morning' into French, Spanish and German."}],
    [{"role": "user", "content": "Tell me a story about a fox. " * 30}],  # ~250 tokens
    [{"role": "user", "content": "Summarize: " + "The team discussed the release, the bugs and the benchmarks. " * 90}],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def make(**engine_args) -> LLM:
    return LLM(str(default_model_path()), progress=False, **engine_args)


@pytest.fixture(scope="module")
def alone() -> list[list[int]]:
    llm = make(speculative="off", enable_prefix_caching=False)
    return [llm.chat(chat, GREEDY).token_ids for chat in CHATS]


@pytest.mark.parametrize(
    "engine_args",
    [
        {"speculative": "off"},  # all eight in one batch: prefills beside prefills and decodes
        {"speculative": "off", "max_num_batched_tokens": 37},  # prompts in chunks of 37 beside decodes
        {"speculative": "off", "max_num_seqs": 3},  # a queue: prefills join running decodes
        {},  # the default: n-gram speculation (drafts verified as extra rows)
    ],
    ids=["batched", "chunked", "queued", "speculative"],
)
def test_same_tokens_alone_and_together(alone, engine_args) -> None:
    llm = make(**engine_args)
    outputs = llm.generate(CHATS, GREEDY)
    assert [o.token_ids for o in outputs] == alone


def test_same_tokens_from_the_prefix_cache(alone) -> None:
    llm = make(speculative="off")
    first = [llm.chat(chat, GREEDY).token_ids for chat in CHATS]
    again = llm.generate(CHATS, GREEDY)  # every prompt's blocks cached: only the tail is computed
    assert first == alone and [o.token_ids for o in again] == alone
    assert all(o.num_cached_tokens > 0 for o in again)


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_real_models_same_tokens_alone_batched_chunked_and_cached(name: str) -> None:
    """The same on real Q4_K_M files (Q4_K, Q5_0, Q6_K, Q8_0 matrices, interleaved; Gemma 3's block)."""
    from tests.parity.test_real_models import fetch

    path = str(fetch(name))
    prompts = [chat[-1]["content"] for chat in CHATS[:3] + CHATS[5:6] + CHATS[7:]]  # Gemma 3 270M: no template
    plain = LLM(path, progress=False, speculative="off", enable_prefix_caching=False)
    alone = [plain.generate(prompt, GREEDY)[0].token_ids for prompt in prompts]
    for engine_args in ({"speculative": "off"}, {"speculative": "off", "max_num_batched_tokens": 37}, {}):
        llm = LLM(path, progress=False, **engine_args)
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == alone, engine_args
    again = llm.generate(prompts, GREEDY)  # the last engine: every prompt now from its prefix cache
    assert [o.token_ids for o in again] == alone and again[-1].num_cached_tokens > 0  # the long prompt


def test_the_same_bits_on_the_avx2_and_512_bit_paths() -> None:
    """The fused decoder with its kernels forced to AVX2 (8-row layouts, attention one head at a time)
    gives the logprobs of the default path (16-row layouts, four heads at a time on AVX-512 CPUs), bit
    for bit, for a prompt past the 512th position and its decode steps. (The embedded model's Q4_1 and
    Q8_0 have 8-row layouts; K-quants stay in their own layout on AVX2, with their own numerics.)"""
    import json
    import os
    import subprocess
    import sys

    from fulmine import kernels

    if kernels.cpu() is None or "avx2" not in kernels.describe():
        pytest.skip("this CPU has no AVX2 kernels")
    path = str(default_model_path())
    code = (
        "import json, sys; from fulmine import LLM, SamplingParams;"
        "llm = LLM(sys.argv[1], progress=False, speculative='off');"
        f"prompt = {CHATS[-1][0]['content']!r};"
        "out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True))[0];"
        "print(json.dumps([out.token_ids, [lp.top for lp in out.logprobs]]))"
    )
    results = []
    for env in ({}, {"FULMINE_KERNELS_AVX2": "1"}):
        done = subprocess.run(
            [sys.executable, "-c", code, path], env={**os.environ, **env}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert results[0] == results[1]
