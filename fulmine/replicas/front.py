"""`fulmine serve --replicas N`: fulmine's own API in front of engine replicas on Ray Serve.

The front is this process: the same FastAPI app as one engine (every API, tools, structured outputs,
SSE), with a `ReplicaSet` where the in-process engine would be. It templates and tokenizes, checks
requests against the model's facts (`FrontEngine`, no weights), and sends each engine request as a
Job through a Serve handle, whose router (replicas/router.py) picks the replica by prefix cache.
Outputs come back as Deltas over the handle's stream: one Ray hop a step, with no HTTP proxy in
between (Serve's proxy is disabled: it would add a second hop a token).

Nothing is lost when a replica dies: a request it had not started is sent again, to another replica;
a stream it was running goes on on another replica from its prompt plus the tokens already sent
(LLMEngine.add_request's `generated`): the client's stream does not break, and greedy and seeded
requests continue with the tokens the dead replica would have drawn (on the CPU, whose sampler's
draws depend only on seed and position; PyTorch's generators on CUDA would draw others). Ray
restarts the replica; Serve autoscales between --replicas and --max-replicas on queue depth.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from fulmine.config import ConfigError, EngineConfig, ServerConfig
from fulmine.engine.admission import Admission
from fulmine.engine.limits import RequestLimits
from fulmine.engine.outputs import RequestOutput
from fulmine.executors.cost_model import StepCostModel
from fulmine.models.source import resolve
from fulmine.reasoning import detect as detect_reasoning
from fulmine.replicas.replica import EngineReplica, Job, ReplicaRefused
from fulmine.request import SLO, SamplingParams
from fulmine.sampling.grammar import Grammars
from fulmine.server import protocol as p
from fulmine.server.async_engine import EngineDead
from fulmine.server.engine_client import Sink
from fulmine.tokenizer import load_tokenizer, use_template

logger = logging.getLogger("fulmine.server")
APP, DEPLOYMENT = "fulmine", "engine"
_TRIES = 4  # replicas a request may outlive
_STATUS_PERIOD_S = 0.5
_STOP_S = 10.0
_SUMMED = (
    "kv_blocks",
    "kv_used",
    "weight_bytes",
    "drafted",
    "accepted",
    "constrained",
    "mask_seconds",
    "grammar_compiles",
)
ROUTERS: weakref.WeakSet[Any] = weakref.WeakSet()  # this process's replica routers, for the gauges


class FrontEngine(RequestLimits):
    """The model's facts without its weights: what the API templates, checks and reports with."""

    def __init__(self, model: str | None, config: EngineConfig, facts: dict[str, Any], capacity: int) -> None:
        self.source = resolve(model)
        self.model_config = self.source.config
        self.config = dataclasses.replace(config, max_num_seqs=config.max_num_seqs * capacity)
        self.max_model_len = int(facts["max_model_len"])
        self.eos_token_ids = tuple(facts["eos_token_ids"])
        self.tokenizer = load_tokenizer(self.source)
        if config.chat_template is not None:
            use_template(self.tokenizer, config.chat_template)
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.reasoning = detect_reasoning(self.tokenizer, self.config.reasoning_parser)
        default_slo = SLO(config.slo_ttft_ms or None, config.slo_itl_ms or None)  # its targets, for /metrics
        self.admission = Admission(StepCostModel(), config.max_num_batched_tokens, config.max_itl_ms, default_slo)
        self.ranks = None

    def admit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival_time: float) -> None:
        """Replicas admit, each by its own load (a refusal comes back as ReplicaRefused)."""


class ReplicaSet:
    """What server/async_engine.AsyncEngine is to one engine, for replicas (see the module docstring)."""

    def __init__(self, handle: Any, engine: FrontEngine, owns_cluster: bool) -> None:
        self.handle, self.engine, self._owns_cluster = handle, engine, owns_cluster
        self._streaming = handle.options(stream=True)
        self.error: BaseException | None = None
        self._closed: BaseException | None = None
        self._in_flight: dict[str, Any] = {}  # request id -> its stream from a replica (None between two)
        self._readers: dict[str, asyncio.Task[None]] = {}  # request id -> the task reading its outputs
        self._admissions: dict[str, asyncio.Future[None]] = {}  # request id -> admitted by its replica
        self._status = (0, 0)  # replicas (running, target)
        self._read_status()
        self._stopped = threading.Event()
        threading.Thread(target=self._watch_status, name="fulmine-replica-status", daemon=True).start()
        self.on_resume: Callable[[], None] | None = None  # a stream went on on another replica
        self._cpu_seconds: dict[str, float] = {}  # per replica ever seen: its last reported CPU seconds

    # -- read by the HTTP side ------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return min(len(self._in_flight), self.engine.config.max_num_seqs)

    @property
    def num_waiting(self) -> int:
        return len(self._in_flight) - self.num_running

    def replicas(self) -> tuple[int, int]:
        """(running, target) replicas, as Serve's controller last said (read on a thread of its own
        every half second: /health and /metrics never wait for the controller)."""
        return self._status

    def _watch_status(self) -> None:
        while not self._stopped.wait(_STATUS_PERIOD_S):
            self._read_status()

    def _read_status(self) -> None:
        from ray import serve

        try:
            deployment = serve.status().applications[APP].deployments[DEPLOYMENT]
            states = {str(k).rsplit(".", 1)[-1]: v for k, v in deployment.replica_states.items()}
            self._status = (states.get("RUNNING", 0), sum(states.values()))
        except Exception as error:  # noqa: BLE001 (the controller unreachable: nothing is known up)
            logger.warning("replica status unavailable: %s", error)
            self._status = (0, self._status[1])

    def gauges(self) -> dict[str, float]:
        """The replicas' engine gauges summed (KV usage: over all their blocks), from routing stats."""
        reports = [gauges for stats in _routing_stats() if (gauges := stats.get("gauges"))]
        total = {name: float(sum(g.get(name, 0) for g in reports)) for name in _SUMMED}
        blocks = total["kv_blocks"]
        total["kv_usage"] = sum(g["kv_usage"] * g["kv_blocks"] for g in reports) / blocks if blocks else 0.0
        total["hit_rate"] = sum(g["hit_rate"] for g in reports) / len(reports) if reports else 0.0
        total["running"], total["waiting"] = self.num_running, self.num_waiting
        return total

    def cpu_seconds(self) -> float:
        """CPU seconds the replicas used, dead ones' included (as last reported)."""
        for stats in _routing_stats():
            if stats.get("cpu_seconds") is not None:
                self._cpu_seconds[stats["replica"]] = float(stats["cpu_seconds"])
        return sum(self._cpu_seconds.values())

    def stop(self) -> None:
        """Take the replicas down (the whole local cluster when this process started it), within
        `_STOP_S`: a cluster already gone (a SIGTERM to the process group reaches Ray's own
        processes too) must not hang the exit."""
        import ray
        from ray import serve

        self._stopped.set()

        def take_down() -> None:
            with contextlib.suppress(Exception):
                serve.shutdown() if self._owns_cluster else serve.delete(APP)

        worker = threading.Thread(target=take_down, name="fulmine-replicas-stop", daemon=True)
        worker.start()
        worker.join(_STOP_S)
        ray.shutdown()

    def abort_all(self, error: BaseException) -> None:
        """End every request in flight with `error` (a drain that ran out), as AsyncEngine does."""
        self._closed = error
        for stream in list(self._in_flight.values()):
            if stream is not None:
                stream.cancel()

    # -- requests -------------------------------------------------------------------------------
    async def admitted(self, request_id: str) -> None:
        """Until the replica that got the request admitted it (by its latency targets; a refusal
        raises the 429 here) or the request failed before that (its error)."""
        try:
            await self._admission(request_id)
        finally:
            self._admissions.pop(request_id, None)

    def _admission(self, request_id: str) -> asyncio.Future[None]:
        return self._admissions.setdefault(request_id, asyncio.get_running_loop().create_future())

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        on_output: Sink,
        generated: list[int] | None = None,
    ) -> None:
        """The request's outputs from whichever replica runs it to `on_output` (EngineClient.submit):
        a task per request reads the replica's stream (a network hop already)."""
        if self._closed is not None:
            raise self._closed

        async def read() -> None:
            try:
                async for output in self.generate(request_id, prompt_ids, params, arrival_time, generated):
                    on_output(output)
            except Exception as error:
                on_output(error)
            finally:
                self._readers.pop(request_id, None)

        self._readers[request_id] = asyncio.get_running_loop().create_task(read())

    def abort(self, request_id: str) -> None:
        reader = self._readers.pop(request_id, None)
        if reader is not None:
            reader.cancel()  # generate's cleanup cancels the replica's stream

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        generated: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """One request's outputs, as AsyncEngine.generate gives them, from whichever replica runs it."""
        admission = self._admission(request_id)
        try:
            if self._closed is not None:
                raise self._closed
            self._in_flight[request_id] = None
            async for output in self._outputs(request_id, prompt_ids, params, arrival_time, generated, admission):
                yield output
        except BaseException as error:
            if not admission.done():
                admission.set_exception(error if isinstance(error, Exception) else EngineDead("cancelled"))
            raise
        finally:
            self._in_flight.pop(request_id, None)
            if not admission.done():
                admission.set_result(None)

    async def _outputs(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        generated: list[int] | None,
        admission: asyncio.Future[None],
    ) -> AsyncIterator[RequestOutput]:
        tokens = list(generated or [])  # what the request has produced so far, wherever it ran
        for attempt in range(_TRIES):
            job = Job(request_id, prompt_ids, params, time.monotonic() - arrival_time, list(tokens))
            stream = self._in_flight[request_id] = self._streaming.generate.remote(job)
            try:
                async for delta in stream:
                    if delta is None:  # the replica admitted it
                        if not admission.done():
                            admission.set_result(None)
                        continue
                    delta.prompt_token_ids = prompt_ids
                    tokens.extend(delta.new_token_ids)
                    yield delta
                    if delta.finished:
                        return
                return
            except ReplicaRefused as refused:
                raise p.RequestError(
                    refused.message, "slo", "slo_unattainable", 429, "rate_limit_error", refused.retry_after_s
                ) from None
            except ConfigError:
                raise
            except (asyncio.CancelledError, GeneratorExit):
                stream.cancel()
                raise
            except Exception as error:  # the replica died (or its engine did): go on elsewhere
                if self._closed is not None:
                    raise self._closed from None
                if not _replica_lost(error) or attempt == _TRIES - 1:
                    raise EngineDead(f"replica failure: {error}") from error
                if tokens and self.on_resume is not None:
                    self.on_resume()
                logger.warning(
                    "%s: its replica failed (%s); going on on another after %d tokens",
                    request_id, type(error).__name__, len(tokens),
                )  # fmt: skip
                await asyncio.sleep(0.05 * (attempt + 1))

    async def embed(self, prompt_ids: list[int], pooling: str, normalize: bool) -> list[float]:
        for attempt in range(_TRIES):
            try:
                return list(await self.handle.embed.remote(prompt_ids, pooling, normalize))
            except Exception as error:
                if not _replica_lost(error) or attempt == _TRIES - 1:
                    raise
        raise AssertionError("unreachable")


def _routing_stats() -> list[dict[str, Any]]:
    """What each live replica last reported to this process's routers (replica.py), with its id."""
    return [
        {**replica.routing_stats, "replica": replica.replica_id.unique_id}
        for router in ROUTERS
        for replica in router.curr_replicas.values()
    ]


def _replica_lost(error: BaseException) -> bool:
    """A failure of the replica, not of the request: a dead or unreachable actor, a dead engine."""
    from ray import exceptions

    # (ActorDiedError is a RayActorError; a replica's EngineDead arrives as RayTaskError(EngineDead), an EngineDead)
    return isinstance(error, (exceptions.RayActorError, exceptions.ActorUnavailableError, EngineDead))


def connect(server: ServerConfig) -> None:
    """Join the Ray cluster at --ray-address, or start a local one. Call it on the main thread: Ray's
    processes (GCS, raylet) end with the thread that started them (their parent-death signal)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("replicas and the ray backend need Ray: pip install 'fulmine[distributed]'") from None
    ray.init(
        address=server.ray_address or None, include_dashboard=False, logging_level=logging.WARNING,
        log_to_driver=False, configure_logging=False,
    )  # fmt: skip


def start(model: str | None, config: EngineConfig, server: ServerConfig) -> ReplicaSet:
    """Deploy the replicas (on a local Ray cluster unless --ray-address names one) and connect."""
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from fulmine.replicas.router import PrefixRouter

    most = max(server.max_replicas, server.replicas)
    threads = config.num_threads or max(1, (os.cpu_count() or 1) // most)
    config = dataclasses.replace(config, num_threads=threads)
    if not ray.is_initialized():
        connect(server)
    serve.start(proxy_location="Disabled")
    scale: dict[str, Any] = {"num_replicas": server.replicas}
    if server.max_replicas > server.replicas:
        target = max(1, config.max_num_seqs // 2)  # a replica past half a batch of requests: one more
        scale = {"autoscaling_config": {
            "min_replicas": server.replicas, "max_replicas": server.max_replicas, "target_ongoing_requests": target,
            "upscale_delay_s": 5.0, "downscale_delay_s": 120.0,  # a replica loads in seconds; keep it a while
        }}  # fmt: skip
    deployment = serve.deployment(
        EngineReplica, name=DEPLOYMENT, ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=2 * config.max_num_seqs, health_check_period_s=2.0, health_check_timeout_s=60.0,
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixRouter, request_routing_stats_period_s=0.5,  # type: ignore[arg-type]
            request_router_kwargs={"policy": server.routing},
        ),
        **scale,
    )  # fmt: skip
    handle = serve.run(deployment.bind(model, config), name=APP, route_prefix=None)  # type: ignore[attr-defined]
    facts = handle.facts.remote().result()
    return ReplicaSet(handle, FrontEngine(model, config, facts, most), owns_cluster=not server.ray_address)
