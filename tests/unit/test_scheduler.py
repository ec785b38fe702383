"""The scheduler driven by fake runner outputs: no model, no torch."""

from __future__ import annotations

from fulmine.engine.outputs import SchedulerOutput
from fulmine.engine.scheduler import Scheduler
from fulmine.executors.step import ModelRunnerOutput
from fulmine.kv_cache import KVCacheManager
from fulmine.request import FinishReason, Request, RequestStatus, SamplingParams

EOS = 0


def make_request(request_id: str, num_prompt: int, max_tokens: int = 4, first_token: int | None = None) -> Request:
    """A request whose prompt counts up from a token unique to its id (so no prefix is shared)."""
    params = SamplingParams(max_tokens=max_tokens)
    start = first_token if first_token is not None else 1000 * (ord(request_id[0]) - ord("a") + 1)
    return Request(request_id, list(range(start, start + num_prompt)), params, (EOS,), max_total_tokens=10**6)


def fake_run(out: SchedulerOutput, token: int = 7) -> ModelRunnerOutput:
    return ModelRunnerOutput(sampled={s.request.request_id: [token] for s in out.scheduled if s.samples})


def run_to_end(scheduler: Scheduler, request: Request) -> None:
    scheduler.add_request(request)
    while not request.is_finished:
        out = scheduler.schedule()
        scheduler.update_from_output(out, fake_run(out))


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_seqs: int = 8, budget: int = 16) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, block_size), max_seqs, budget)


def test_long_prompt_is_prefilled_in_chunks_then_decodes() -> None:
    scheduler = make_scheduler(budget=16)
    request = make_request("a", 40, max_tokens=2)
    scheduler.add_request(request)
    chunks = []
    while True:
        out = scheduler.schedule()
        chunks.append([(s.num_new_tokens, s.samples) for s in out.scheduled])
        scheduler.update_from_output(out, fake_run(out))
        if request.is_finished:
            break
    assert chunks == [[(16, False)], [(16, False)], [(8, True)], [(1, True)]]
    assert request.output_token_ids == [7, 7] and request.finish_reason is FinishReason.LENGTH
    assert scheduler.kv_cache.pool.num_free_blocks == 64


def test_decodes_run_before_new_prefills_under_the_budget() -> None:
    scheduler = make_scheduler(budget=10)
    scheduler.add_request(make_request("a", 4, max_tokens=10))
    out = scheduler.schedule()
    scheduler.update_from_output(out, fake_run(out))
    scheduler.add_request(make_request("b", 30))
    out = scheduler.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 9)]
    assert out.num_batched_tokens == 10


def test_max_num_seqs_bounds_running() -> None:
    scheduler = make_scheduler(max_seqs=2, budget=100)
    for name in "abc":
        scheduler.add_request(make_request(name, 3))
    out = scheduler.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_eos_finishes_and_frees() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 5, max_tokens=100)
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update_from_output(out, fake_run(out, token=EOS))
    assert request.is_finished and request.finish_reason is FinishReason.STOP
    assert scheduler.num_unfinished == 0 and scheduler.kv_cache.pool.num_free_blocks == 64


def test_out_of_blocks_preempts_the_newest_and_recomputes_it() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, budget=64)
    first, second = make_request("a", 7, max_tokens=20), make_request("b", 7, max_tokens=20)
    scheduler.add_request(first)
    scheduler.add_request(second)
    preempted = []
    for _ in range(6):
        out = scheduler.schedule()
        preempted.extend(out.preempted_ids)
        scheduler.update_from_output(out, fake_run(out))
    assert preempted == ["b"]
    assert second.status is RequestStatus.WAITING and second.num_computed_tokens == 0
    assert len(second.output_token_ids) == 2  # kept: recomputed with the prompt when readmitted
    assert first.status is RequestStatus.RUNNING


def test_abort_anywhere() -> None:
    scheduler = make_scheduler(max_seqs=1)
    scheduler.add_request(make_request("a", 3))
    scheduler.add_request(make_request("b", 3))
    out = scheduler.schedule()
    scheduler.update_from_output(out, fake_run(out))
    assert scheduler.finish_request("b", FinishReason.ABORT) is not None  # waiting
    aborted = scheduler.finish_request("a", FinishReason.ABORT)  # running
    assert aborted is not None and aborted.finish_reason is FinishReason.ABORT
    assert scheduler.finish_request("a", FinishReason.ABORT) is None
    assert scheduler.num_unfinished == 0 and scheduler.kv_cache.pool.num_free_blocks == 64


def test_a_shared_prefix_is_computed_once() -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=4, budget=100)
    first = make_request("a", 14, max_tokens=3, first_token=1)
    run_to_end(scheduler, first)
    second = make_request("b", 18, max_tokens=1, first_token=1)  # same first 14 tokens
    scheduler.add_request(second)
    out = scheduler.schedule()
    # blocks 0..2 (12 tokens) are full, computed and cached; the 14-token tail block is partial
    assert second.num_cached_tokens == 12 and out.scheduled[0].num_new_tokens == 6
    assert scheduler.kv_cache.hit_rate == 12 / (14 + 18)


def test_a_finished_conversation_is_reused_output_included() -> None:
    scheduler = make_scheduler(num_blocks=64, block_size=4, budget=100)
    first = make_request("a", 6, max_tokens=7, first_token=1)
    run_to_end(scheduler, first)
    # prompt 6 + 7 sampled tokens; the last sampled token was never computed: 12 computed tokens
    follow_up = Request("b", first.all_token_ids + [5, 6, 7], SamplingParams(max_tokens=1), (EOS,), 10**6)
    scheduler.add_request(follow_up)
    scheduler.schedule()
    assert follow_up.num_cached_tokens == 12


def test_with_no_stream_waiting_a_prompt_takes_the_whole_budget() -> None:
    """The prefill limit binds only while a stream waits for its next token."""
    scheduler = make_scheduler(num_blocks=256, budget=64)
    scheduler.add_request(make_request("b", 100))  # nobody decodes yet: the whole budget
    out = scheduler.schedule(prefill_limit=8)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("b", 64)]
    scheduler.update_from_output(out, fake_run(out))
    scheduler.add_request(make_request("a", 4, max_tokens=50))
    steps = []
    while not scheduler.requests["b"].output_token_ids:
        out = scheduler.schedule(prefill_limit=8)
        steps.append([(s.request.request_id, s.num_new_tokens) for s in out.scheduled])
        scheduler.update_from_output(out, fake_run(out))
    assert steps == [[("b", 36), ("a", 4)]]  # still no stream waiting: no limit


def test_a_new_prompt_beside_a_stream_is_chunked_by_the_prefill_limit() -> None:
    scheduler = make_scheduler(num_blocks=256, budget=64)
    scheduler.add_request(make_request("a", 4, max_tokens=50))
    out = scheduler.schedule(prefill_limit=8)
    scheduler.update_from_output(out, fake_run(out))
    scheduler.add_request(make_request("b", 30))
    chunks = []
    while not scheduler.requests["b"].output_token_ids:
        out = scheduler.schedule(prefill_limit=8)
        chunks.append([(s.request.request_id, s.num_new_tokens) for s in out.scheduled])
        scheduler.update_from_output(out, fake_run(out))
    assert chunks == [[("a", 1), ("b", 8)], [("a", 1), ("b", 8)], [("a", 1), ("b", 8)], [("a", 1), ("b", 6)]]
