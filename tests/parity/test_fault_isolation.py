"""A step that raises for one request ends that request alone: the others in the batch finish with
the tokens they would have had without it (seeded sampling included), and no KV block leaks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fulmine import LLM, SamplingParams
from fulmine.engine.outputs import fold_all
from fulmine.executors.model_runner import ModelRunner
from fulmine.request import FinishReason
from tests.parity.test_invariance import GREEDY, PROMPTS

SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
PARAMS = [GREEDY, GREEDY, SEEDED, GREEDY]
POISONED = "Poisoned prompt: the step fails once this request has a few tokens"


@pytest.fixture(scope="module", params=["c-sampler", "pytorch-sampler"])
def llm(tiny_llama, request: pytest.FixtureRequest) -> LLM:
    """With the C sampler (counter-based seeded draws) and the PyTorch one (per-request generators,
    rewound when a step is rerun)."""
    engine = LLM(str(tiny_llama), dtype="float32", weight_dtype="float32", progress=False)
    if request.param == "pytorch-sampler":
        engine.engine.runner.sampler.kernel = None
    return engine


@pytest.fixture(scope="module")
def alone(llm: LLM) -> list[list[int]]:
    return [llm.generate(p, params)[0].token_ids for p, params in zip(PROMPTS, PARAMS)]


@contextmanager
def failing_step(llm: LLM, after_tokens: int, after_sampling: bool = False) -> Iterator[list[int]]:
    """Every step that includes the poisoned request, once it has `after_tokens` tokens, raises: at its
    start, or once every row has drawn its token (so the step's random numbers were spent)."""
    poisoned = llm.engine.encode_prompt(POISONED)
    calls = []
    original = ModelRunner.execute

    def execute(self, batch):  # type: ignore[no-untyped-def]
        calls.append(len(batch.seqs))
        result = original(self, batch) if after_sampling else None
        for s in batch.seqs:
            if s.prompt_token_ids == poisoned and len(s.output_token_ids) >= after_tokens:
                raise RuntimeError("injected fault")
        return result if after_sampling else original(self, batch)

    ModelRunner.execute = execute  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        ModelRunner.execute = original  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("after_tokens", "after_sampling"),
    [(0, False), (5, False), (5, True)],
    ids=["in-prefill", "mid-decode", "after-sampling"],
)
def test_failing_request_ends_alone(llm: LLM, alone: list[list[int]], after_tokens: int, after_sampling: bool) -> None:
    prompts = [*PROMPTS[:2], POISONED, *PROMPTS[2:]]
    params = [*PARAMS[:2], GREEDY, *PARAMS[2:]]
    with failing_step(llm, after_tokens, after_sampling) as calls:
        outputs = llm.generate(prompts, params)
    failed = outputs.pop(2)
    assert failed.finished and failed.finish_reason is FinishReason.ERROR
    assert failed.error == "RuntimeError: injected fault"
    assert len(failed.token_ids) == after_tokens
    assert [o.token_ids for o in outputs] == alone  # the seeded one too: its generator was rewound
    assert all(o.finish_reason is FinishReason.LENGTH for o in outputs)
    assert max(calls) == 5 and 1 in calls  # the whole batch was tried, then halves down to the culprit
    assert llm.engine.kv_cache.pool.usage == 0.0 and not llm.engine.has_unfinished()
    assert not llm.engine.outputs.detokenizers and not llm.engine.runner.generators


def test_a_failing_detokenizer_ends_its_request_alone(llm: LLM, alone: list[list[int]]) -> None:
    engine = llm.engine
    ids = [engine.add_request(p, params) for p, params in zip(PROMPTS, PARAMS)]
    broken = engine.outputs.detokenizers[ids[1]]

    def add_token(token_id: int) -> bool:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    broken.add_token = add_token  # type: ignore[method-assign]
    finals, answers = {}, {}  # type: ignore[var-annotated]
    while engine.has_unfinished():
        for output in fold_all(answers, engine.step()):
            if output.finished:
                finals[output.request_id] = output
    assert finals[ids[1]].finish_reason is FinishReason.ERROR and "injected" in (finals[ids[1]].error or "")
    assert [finals[i].token_ids for i in ids if i != ids[1]] == [alone[0], *alone[2:]]
    assert engine.kv_cache.pool.usage == 0.0 and not engine.outputs.detokenizers


def test_every_request_failing_ends_each_with_its_error(llm: LLM) -> None:
    """A fault that is not any one request's (every forward raises) ends them all, one by one."""
    original = ModelRunner.execute

    def execute(self, batch):  # type: ignore[no-untyped-def]
        raise MemoryError("injected: out of memory")

    ModelRunner.execute = execute  # type: ignore[method-assign]
    try:
        outputs = llm.generate(PROMPTS, GREEDY)
    finally:
        ModelRunner.execute = original  # type: ignore[method-assign]
    assert all(o.finish_reason is FinishReason.ERROR and "out of memory" in (o.error or "") for o in outputs)
    assert llm.engine.kv_cache.pool.usage == 0.0
    assert llm.generate(PROMPTS[0], GREEDY)[0].finish_reason is FinishReason.LENGTH  # and it serves again


def test_streaming_a_failing_request_raises_and_frees_it(llm: LLM) -> None:
    with failing_step(llm, after_tokens=3), pytest.raises(RuntimeError, match="injected fault"):
        list(llm.stream_text(POISONED, GREEDY))
    assert llm.engine.kv_cache.pool.usage == 0.0 and not llm.engine.has_unfinished()


@pytest.mark.parametrize("where", ["cache_full_blocks", "propose", "stop_reason"])
def test_a_failure_after_the_forward_ends_its_request_alone(llm: LLM, alone: list[list[int]], where: str) -> None:
    """Registering blocks, proposing drafts, reading stop conditions: whatever fails for one request
    after the forward ends that request alone, frees its blocks and registers nothing half-way (the
    engine's invariants hold after every step: FULMINE_CHECK_INVARIANTS is on in the suite)."""
    engine = llm.engine
    ids = [engine.add_request(p, params) for p, params in zip(PROMPTS, PARAMS)]
    victim = ids[1]

    def poisoned(request_id: str) -> None:
        if request_id == victim and len(engine.scheduler.requests[victim].output_token_ids) >= 3:
            raise RuntimeError(f"injected fault in {where}")

    restore = []
    if where == "cache_full_blocks":
        original_cache = engine.kv_cache.cache_full_blocks

        def cache_full_blocks(request):  # type: ignore[no-untyped-def]
            poisoned(request.request_id)
            original_cache(request)

        engine.kv_cache.cache_full_blocks = cache_full_blocks  # type: ignore[method-assign]
        restore.append(lambda: setattr(engine.kv_cache, "cache_full_blocks", original_cache))
    elif where == "propose":
        assert engine.governor is not None
        governor, original_drafts = engine.governor, engine.governor.drafts

        def drafts(request, *args):  # type: ignore[no-untyped-def]
            poisoned(request.request_id)
            return original_drafts(request, *args)

        governor.drafts = drafts  # type: ignore[method-assign]
        restore.append(lambda: setattr(governor, "drafts", original_drafts))
    else:
        request_type = type(engine.scheduler.requests[victim])
        original_stop = request_type.stop_reason

        def stop_reason(self, num_output):  # type: ignore[no-untyped-def]
            poisoned(self.request_id)
            return original_stop(self, num_output)

        request_type.stop_reason = stop_reason  # type: ignore[method-assign]
        restore.append(lambda: setattr(request_type, "stop_reason", original_stop))
    finals, answers = {}, {}  # type: ignore[var-annotated]
    try:
        while engine.has_unfinished():
            for output in fold_all(answers, engine.step()):
                if output.finished:
                    finals[output.request_id] = output
    finally:
        for undo in restore:
            undo()
    assert finals[victim].finish_reason is FinishReason.ERROR and where in (finals[victim].error or "")
    assert [finals[i].token_ids for i in ids if i != victim] == [alone[0], *alone[2:]]
    assert engine.kv_cache.pool.usage == 0.0 and not engine.outputs.detokenizers and not engine.has_unfinished()
