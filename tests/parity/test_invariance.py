"""Invariances: batched == alone, chunked == whole, preempted == not, stream == final, seeds.

Every test runs once per executor (executors/): the CPU-fused decoder, the PyTorch executor, and
the CUDA-graph executor's fixed-shape decode steps run uncaptured (graph-eager), which checks its
padding and masking without a GPU (tests/gpu runs it captured)."""

from __future__ import annotations

import pytest

from fulmine import LLM, SamplingParams

PROMPTS = [
    "The quick brown fox",
    "Paris is the capital of France. Numbers: 0 1 2 3",
    "def main(): return 42",
    "Café, naïve, 東京, 🎉 emoji. The lazy dog",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# 20 blocks of 4 tokens (the tiny llama's KV cache takes 512 bytes a token): room for one full
# 64-token context, not for all four requests at once
SMALL_KV = {"kv_cache_memory_gb": 20 * 4 * 512 / 2**30, "max_model_len": 64, "block_size": 4}


@pytest.fixture(scope="module", params=["cpu-fused", "torch", "graph-eager", "cpu-fused/float16", "torch/float16"])
def make_llm(tiny_llama, request):
    """Per executor, with the float32 KV cache these float32 tests default to; the CPU executors
    also with the float16 cache the CPU serves with by default."""
    executor, _, kv = request.param.partition("/")

    def make(**engine_args) -> LLM:
        args = dict(dtype="float32", weight_dtype="float32", progress=False, executor=executor) | engine_args
        if kv:
            args["kv_cache_dtype"] = kv
            if "kv_cache_memory_gb" in args:  # the same number of blocks at half the bytes a token
                args["kv_cache_memory_gb"] /= 2
        return LLM(str(tiny_llama), **args)

    return make


def test_each_executor_runs_the_decode_steps(make_llm) -> None:
    llm = make_llm()
    executors = [e.name for e in llm.engine.runner.executors]
    llm.generate(PROMPTS[0], GREEDY)
    assert llm.engine.runner.last_executor == executors[0]  # the last step was a decode: the specialized one


@pytest.fixture(scope="module")
def alone(make_llm) -> list[list[int]]:
    llm = make_llm()
    return [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


@pytest.mark.parametrize(
    "engine_args",
    [
        {},  # all four in one batch, prefills mixed with decodes
        {"max_num_batched_tokens": 7},  # chunked prefills interleaved with running decodes
        {"max_num_seqs": 2},  # a waiting queue
        SMALL_KV,  # a KV cache too small for all: preemption and recompute
    ],
    ids=["batched", "chunked", "queued", "preempted"],
)
def test_batched_equals_alone(make_llm, alone, engine_args) -> None:
    llm = make_llm(**engine_args)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == alone


def test_preemption_really_happens(make_llm) -> None:
    engine = make_llm(**SMALL_KV).engine
    assert engine.kv_cache.pool.num_blocks == 20
    for prompt in PROMPTS:
        engine.add_request(prompt, GREEDY)
    requests = list(engine.scheduler.requests.values())
    while engine.has_unfinished():
        engine.step()
    assert sum(r.num_preemptions for r in requests) > 0
    assert engine.kv_cache.pool.num_free_blocks == engine.kv_cache.pool.num_blocks


def test_stream_equals_final_text(make_llm) -> None:
    llm = make_llm()
    for prompt in PROMPTS:
        pieces, final = [], None
        for output in llm.stream(prompt, SamplingParams(temperature=0.8, seed=7, max_tokens=40)):
            pieces.append(output.new_text)
            final = output
        assert final is not None and final.finished
        assert "".join(pieces) == final.text
        assert final.text == llm.tokenizer.decode(final.token_ids, skip_special_tokens=True)


def test_same_seed_same_tokens_alone_or_batched(make_llm) -> None:
    llm = make_llm()
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], seeded)[0].token_ids
    again = llm.generate(PROMPTS[0], seeded)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    batched = llm.generate(PROMPTS, [seeded, others, others, others])[0].token_ids
    other_seed = llm.generate(
        PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24, ignore_eos=True)
    )[0].token_ids
    assert alone == again == batched
    assert other_seed != alone


def test_narrow_weights_agree_with_float32(make_llm, tiny_llama) -> None:
    """The default float16 weight storage picks the float32 path's token, or one of its top 3."""
    reference = make_llm()
    fast = LLM(str(tiny_llama), progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)
    for prompt in PROMPTS:
        ref = reference.generate(prompt, params)[0]
        ours = fast.generate(prompt, params)[0]
        for step, (a, b) in enumerate(zip(ref.token_ids, ours.token_ids)):
            if a != b:
                assert ref.logprobs is not None
                assert b in [t for t, _ in ref.logprobs[step].top], f"step {step}: {b} not in the top 3"
                break


def test_prefix_cache_hit_equals_miss(make_llm, alone) -> None:
    """Same outputs whether the prompt's KV comes from the cache or is computed (block_size 4)."""
    llm = make_llm(block_size=4)
    warm = llm.generate(PROMPTS, GREEDY)  # fills the cache, outputs included
    again = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in warm] == [o.token_ids for o in again] == alone
    assert llm.engine.kv_cache.num_hit_tokens > 0
    # a follow-up that extends the first conversation, against an engine without the cache
    follow_up = warm[0].prompt_token_ids + warm[0].token_ids + llm.tokenizer.encode(" and then")
    cold = make_llm(block_size=4, enable_prefix_caching=False)
    assert llm.generate([follow_up], GREEDY)[0].token_ids == cold.generate([follow_up], GREEDY)[0].token_ids


def test_seeded_sampling_is_the_same_beside_speculating_neighbours(make_llm) -> None:
    """Greedy neighbours draft n-gram tokens, so their steps verify; the seeded request's own
    generator must advance only by its own draws (it once drew for the neighbours' verification)."""
    llm = make_llm()
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate(PROMPTS[2], seeded)[0].token_ids
    for neighbours in ([0, 3], [0, 1, 3], [1]):
        prompts = [PROMPTS[i] for i in neighbours] + [PROMPTS[2]]
        outputs = llm.generate(prompts, [GREEDY] * len(neighbours) + [seeded])
        assert outputs[-1].token_ids == alone, neighbours
