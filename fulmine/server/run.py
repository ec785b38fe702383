"""The engine requests behind one HTTP request, and how their outputs reach the client.

A `Run` holds the n choices of one request (each its own engine request), merges their outputs
as they come, enforces the request's deadline, and aborts every unfinished choice when the
caller stops listening: a closed stream, a disconnected client, a timeout or an error.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from fulmine.engine.outputs import RequestOutput
from fulmine.request import FinishReason, SamplingParams
from fulmine.server import bodies
from fulmine.server import protocol as p
from fulmine.server.engine_client import EngineClient
from fulmine.server.metrics import Metrics

_DISCONNECT_POLL_S = 0.1
T = TypeVar("T")


@dataclass
class Choice:
    """One choice's state as its outputs arrive."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    last: RequestOutput | None = None
    last_time: float | None = None
    first_token_s: float | None = None  # arrival to first token
    gaps: list[float] = field(default_factory=list)  # between its tokens, for its SLO's attainment
    logprobs_sent: int = 0
    text_parts: list[str] = field(default_factory=list)


# every choice's outputs, as the engine hands them over; (None, None): the deadline passed
_Merged = asyncio.Queue[tuple[Choice | None, RequestOutput | BaseException | None]]


class Run:
    """The engine requests behind one HTTP request, and their shared bookkeeping."""

    def __init__(
        self,
        engine: EngineClient,
        metrics: Metrics,
        timeout_s: float,
        model: str,
        run_id: str,
        choices: list[Choice],
        arrival: float,
        request: Request,
    ) -> None:
        self.engine, self.metrics, self.timeout_s = engine, metrics, timeout_s
        self.model, self.id, self.choices = model, run_id, choices
        self.arrival, self.request, self.created = arrival, request, bodies.now()
        self._merged: _Merged | None = None
        self._open: set[str] = set()  # choices submitted and not yet ended
        for c in choices:
            c.request_id = f"{run_id}-{c.index}"

    def _start(self) -> _Merged:
        """Every choice submitted (once); the engine puts their outputs into one queue as they come."""
        if self._merged is None:
            merged: _Merged = asyncio.Queue()
            self._merged = merged
            for c in self.choices:

                def receive(item: RequestOutput | BaseException, c: Choice = c) -> None:
                    merged.put_nowait((c, item))

                try:
                    self.engine.submit(c.request_id, c.prompt_ids, c.params, self.arrival, receive)
                    self._open.add(c.request_id)
                except Exception as error:
                    merged.put_nowait((c, error))
        return self._merged

    def _end(self) -> None:
        """Every choice still open aborted (a client that left, an error, the deadline)."""
        for request_id in self._open:
            self.engine.abort(request_id)
        self._open.clear()

    async def admitted(self) -> None:
        """Behind replicas, a request is admitted by the replica that gets it (its latency targets):
        submit now and wait for that, so a refusal is a 429 before any response starts. One engine in
        this process admits before the run is made (Completions._admit): nothing to wait for."""
        if self.engine.replicas() is None:
            return
        self._start()
        try:
            await asyncio.gather(*(self.engine.admitted(c.request_id) for c in self.choices))
        except BaseException:
            self._end()
            raise

    async def outputs(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Every choice's outputs as they come, until all finish or the deadline passes."""
        metrics = self.metrics
        merged = self._start()
        left_s = max(self.arrival + self.timeout_s - time.monotonic(), 0.0)
        deadline = asyncio.get_running_loop().call_later(left_s, merged.put_nowait, (None, None))
        remaining = len(self.choices)
        try:
            while remaining:
                c, item = await merged.get()
                if c is None:
                    raise p.RequestError(
                        f"the request exceeded the server's timeout of {self.timeout_s:g} s",
                        code="timeout",
                        status=408,
                        error_type="timeout_error",
                    )
                if isinstance(item, BaseException):
                    self._open.discard(c.request_id)
                    raise item
                assert item is not None
                now = time.monotonic()
                if c.last_time is None:
                    c.first_token_s = now - self.arrival
                    metrics.ttft.observe(c.first_token_s)
                else:
                    c.gaps.append(now - c.last_time)
                    metrics.itl.observe(c.gaps[-1])
                # the choice's answer so far: the engine's deltas folded in place
                item = c.last = item.folded() if c.last is None else c.last.folded(item)
                c.last_time = now
                c.text_parts.append(item.new_text)
                if item.finished:
                    remaining -= 1
                    self._open.discard(c.request_id)
                    self._record(item)
                    self._record_slo(c, item)
                    if item.finish_reason is FinishReason.ERROR:
                        raise p.RequestError(
                            f"the engine could not run this request ({item.error}); other requests were not "
                            f"affected (request {item.request_id} in the server log)",
                            code="engine_error",
                            status=500,
                            error_type="server_error",
                        )
                yield c, item
        finally:
            deadline.cancel()
            self._end()

    def _record(self, output: RequestOutput) -> None:
        m = self.metrics
        m.e2e.observe(time.monotonic() - self.arrival)
        if output.metrics.first_scheduled_time is not None:
            m.queue.observe(output.metrics.first_scheduled_time - output.metrics.arrival_time)
        if output.metrics.first_answer_time is not None:
            m.ttfat.observe(output.metrics.first_answer_time - output.metrics.arrival_time)
        m.prompt_tokens.inc(output.num_prompt_tokens)
        m.generation_tokens.inc(output.num_output_tokens)
        m.output_tokens += output.num_output_tokens
        m.cached_tokens.inc(output.num_cached_tokens)
        failed = output.finish_reason is FinishReason.ERROR
        m.requests.labels("error" if failed else bodies.finish_reason(output) or "abort").inc()

    def _record_slo(self, c: Choice, output: RequestOutput) -> None:
        """Whether a finished choice met its latency targets: time to first token, and the 90th
        percentile of its gaps between tokens (a stream's occasional long gap is not a miss)."""
        slo = self.engine.engine.admission.targets(c.params.slo)
        if slo is None or output.finish_reason is FinishReason.ERROR or c.first_token_s is None:
            return
        met = []
        if slo.ttft_ms is not None:
            met.append(("ttft", c.first_token_s * 1e3 <= slo.ttft_ms))
        first_answer = output.metrics.first_answer_time
        if slo.ttfat_ms is not None and first_answer is not None:
            met.append(("ttfat", (first_answer - output.metrics.arrival_time) * 1e3 <= slo.ttfat_ms))
        if slo.itl_ms is not None and c.gaps:
            gaps = sorted(c.gaps)
            met.append(("itl", gaps[min(len(gaps) - 1, int(0.9 * len(gaps)))] * 1e3 <= slo.itl_ms))
        for target, ok in met:
            self.metrics.slo.labels(target, "true" if ok else "false").inc()
        if met and all(ok for _, ok in met):
            self.metrics.goodput.inc()

    async def collect(self, consume: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `consume` (which reads this run's outputs) to the end; a client that disconnects
        meanwhile aborts everything."""
        await until_disconnected(self.request, consume())

    def usage(self) -> dict[str, Any]:
        """Prompt tokens count once per prompt, however many choices share it."""
        firsts = list({id(c.prompt_ids): c for c in reversed(self.choices)}.values())
        prompt_tokens = sum(len(c.prompt_ids) for c in firsts)
        completion = sum(len(c.last.token_ids) for c in self.choices if c.last)
        cached = sum(c.last.num_cached_tokens for c in firsts if c.last)
        reasoning = sum(c.last.num_reasoning_tokens for c in self.choices if c.last)
        return bodies.usage(prompt_tokens, completion, cached, reasoning)

    def timing(self) -> dict[str, float | None]:
        finished = [c.last for c in self.choices if c.last is not None]
        return (
            bodies.timing(finished[0])
            if len(finished) == 1
            else {
                "ttft_s": round(min((c.last_time or 0) for c in self.choices) - self.arrival, 6),
                "total_s": round(time.monotonic() - self.arrival, 6),
            }
        )

    def json_response(self, body: dict[str, Any]) -> JSONResponse:
        return JSONResponse(body, headers={"Server-Timing": bodies.server_timing_header(body["timing"])})

    def stream_response(self, chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        return StreamingResponse(
            _sse(chunks),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events; an error after the stream started becomes an error event, then [DONE]."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except p.RequestError as error:
        yield f"data: {json.dumps(p.error_body(error.message, error.error_type, error.param, error.code))}\n\n"
    except Exception as error:  # the engine failed mid-stream: say so, do not hang the client
        yield f"data: {json.dumps(p.error_body(f'internal error: {error}', 'server_error'))}\n\n"
    yield "data: [DONE]\n\n"


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (its own cleanup aborts what it
    started in the engine)."""
    task = asyncio.create_task(work)
    left = False
    while not task.done():
        await asyncio.wait([task], timeout=_DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            left = task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if left:  # nobody is listening: the app answers quietly (not a 70-line traceback as an error)
            raise ClientDisconnected from None
        raise


class ClientDisconnected(Exception):
    """The client left before its answer was ready; what it started was aborted."""
