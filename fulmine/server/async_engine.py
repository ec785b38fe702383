"""The engine on its own thread, driven from asyncio.

Why a thread, not a process: the step's heavy work runs inside torch kernels that release the
GIL, so the event loop keeps serving HTTP while the model runs, and outputs reach the handlers
without serialization or IPC (a process would add a pickle + pipe hop per token). The engine is
not thread-safe, so every call into it (add, abort) is queued as a command and run by the
engine thread between steps; an abort therefore lands within one step. Outputs go the other way
without a queue of their own: after each step the engine thread hands every output to its
request's receiver (`submit`'s `on_output`) in one call onto each caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable

from fulmine.engine.llm_engine import LLMEngine
from fulmine.engine.outputs import RequestOutput
from fulmine.request import SamplingParams
from fulmine.server.engine_client import Sink

logger = logging.getLogger("fulmine.server")


class EngineDead(RuntimeError):
    """The engine thread failed; requests in flight cannot complete."""


class AsyncEngine:
    """`on_death(error)` is called on the engine thread if a step fails in a way the engine could not
    pin on some requests (they are ended alone inside `LLMEngine.step`); the server restarts it."""

    def __init__(self, engine: LLMEngine, on_death: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self._on_death = on_death
        self.on_resume: Callable[[], None] | None = None  # (streams are resumed only behind replicas)
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, Sink]] = {}  # request id -> its caller
        self._num_pending = 0  # submitted, not yet in the scheduler
        self._pending_lock = threading.Lock()  # also orders registering a stream against the engine's death
        self._stopped = False
        self._closed: BaseException | None = None  # set by abort_all: what new requests get
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fulmine-engine", daemon=True)
        self._thread.start()

    # -- read by the HTTP side (plain reads of ints and lengths are safe across threads) --------
    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._num_pending

    def gauges(self) -> dict[str, float]:
        """What /metrics shows of the engine, read at scrape time (a replica reports the same)."""
        engine, governor = self.engine, self.engine.governor
        pool = engine.kv_cache.pool
        return {
            "running": self.num_running,
            "waiting": self.num_waiting,
            "kv_blocks": pool.num_blocks,
            "kv_usage": engine.kv_cache.usage,
            "kv_used": pool.num_blocks - pool.num_free_blocks,
            "hit_rate": engine.kv_cache.hit_rate,
            "weight_bytes": engine.weight_bytes,
            "drafted": governor.num_drafted if governor else 0,
            "accepted": governor.num_accepted if governor else 0,
            "constrained": engine.outputs.num_constrained,
            "mask_seconds": engine.mask_seconds,
            "grammar_compiles": engine.grammars.compiles,
        }

    def replicas(self) -> tuple[int, int] | None:
        return None  # one engine, in this process

    def cpu_seconds(self) -> float | None:
        return None  # this process's own CPU time is the meter's to read

    async def admitted(self, request_id: str) -> None:
        """Nothing to wait for: the server admits before it submits (LLMEngine.admit)."""

    def stop(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=5)

    def abort_all(self, error: BaseException) -> None:
        """End every request in flight: each is aborted in the engine and its caller gets `error`; so
        does any request submitted from now on (one admitted just before a drain ran out, say)."""
        with self._pending_lock:
            self._closed = error
        self._submit(lambda: self._abort_all(error))

    # -- the HTTP side ---------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        on_output: Sink,
        generated: list[int] | None = None,
    ) -> None:
        """Start a request its caller checked (LLMEngine.check_request) and admitted. `on_output` is
        called on the caller's event loop with each of its outputs, or with the exception that ended
        it; the last is a finished output or an exception. Every output of a step reaches a loop in
        one call. `generated`: tokens it already produced elsewhere (see LLMEngine.add_request)."""
        with self._pending_lock:
            if self.error is not None:
                raise EngineDead(str(self.error))
            if self._closed is not None:
                raise self._closed
            self._streams[request_id] = (asyncio.get_running_loop(), on_output)
            self._num_pending += 1
        self._submit(lambda: self._add(request_id, prompt_ids, params, arrival_time, generated))

    def abort(self, request_id: str) -> None:
        """Stop a request: nothing more reaches its `on_output`; the engine drops it within a step."""
        if self._streams.pop(request_id, None) is not None:
            self._submit(lambda: self._abort(request_id))

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        generated: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """`submit` as an iterator: outputs of one request, one per step that produced a token.
        Leaving early aborts it."""
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.submit(request_id, prompt_ids, params, arrival_time, outputs.put_nowait, generated)
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    async def embed(self, prompt_ids: list[int], pooling: str, normalize: bool) -> list[float]:
        """An embedding computed on the engine thread a chunk per step beside the streams (see
        LLMEngine.add_embedding). A caller that stops waiting (a client that left) drops it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[float]] = loop.create_future()
        job_id = f"embed-{uuid.uuid4().hex}"

        def settle(result: list[float] | None, error: BaseException | None) -> None:
            if done.cancelled():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result or [])

        def on_done(result: list[float] | None, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(settle, result, error)

        def command() -> None:
            try:
                self.engine.add_embedding(prompt_ids, pooling, normalize, on_done, job_id)
            except Exception as error:  # a bad input: this call's error, not the engine's
                on_done(None, error)

        with self._pending_lock:
            if self.error is not None:
                raise EngineDead(str(self.error))
            if self._closed is not None:
                raise self._closed
        self._submit(command)
        try:
            return await done
        finally:
            if not done.done() or done.cancelled():
                self._submit(lambda: self.engine.abort_embedding(job_id))

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # -- the engine thread -----------------------------------------------------------------
    def _add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        generated: list[int] | None,
    ) -> None:
        with self._pending_lock:
            self._num_pending -= 1
        if request_id not in self._streams:
            self.engine.admission.forget(request_id)
            return  # the client left before the request reached the engine
        try:
            self.engine.add_checked(prompt_ids, params, request_id, arrival_time, generated)
        except Exception as error:  # checked before submission; anything left is reported, not fatal
            self._deliver([(request_id, error)])

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def _abort_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self.engine.abort(request_id)
        self._deliver([(request_id, error) for request_id in list(self._streams)])
        self._end_embeddings(error)

    def _end_embeddings(self, error: BaseException) -> None:
        for job in list(self.engine.embeddings.jobs):
            self.engine.abort_embedding(job.job_id)
            job.on_done(None, error)

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand each item to its request's caller: one call onto each caller's loop for all of them.
        A request's last item (finished, or an exception) ends its stream here."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sink, RequestOutput | BaseException]]] = {}
        for request_id, item in items:
            last = not isinstance(item, RequestOutput) or item.finished
            stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, handed in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a loop that closed: nobody is listening there
                loop.call_soon_threadsafe(_hand_out, handed)

    def _run(self) -> None:
        while not self._stopped:
            try:
                while True:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    command()
                if not self.engine.has_unfinished():
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                outputs = self.engine.step()
            except Exception as error:  # not pinned on any request (see LLMEngine.step): the engine is dead
                self._die(error)
                return
            if outputs:
                self._deliver([(output.request_id, output) for output in outputs])

    def _die(self, error: BaseException) -> None:
        logger.error("the engine failed; ending every request in flight", exc_info=error)
        with self._pending_lock:
            self.error = error
        self._deliver([(request_id, EngineDead(f"engine failure: {error}")) for request_id in list(self._streams)])
        self._end_embeddings(EngineDead(f"engine failure: {error}"))
        if self._on_death is not None:
            self._on_death(error)


def _hand_out(items: list[tuple[Sink, RequestOutput | BaseException]]) -> None:
    """On a caller's loop: each item to its sink; one sink that fails disturbs no other."""
    for sink, item in items:
        try:
            sink(item)
        except Exception:
            logger.exception("a stream's receiver failed")
