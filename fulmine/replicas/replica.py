"""One fulmine engine as a Ray Serve replica, and the plain data that crosses to and from it.

The replica is the engine of `fulmine serve` (LLMEngine on its own thread, server/async_engine.py)
without the HTTP side: the front (replicas/front.py) templates, tokenizes and checks requests,
sends each one as a `Job`, and gets the engine's outputs back as they are, deltas (engine/outputs.py:
the new tokens, text and logprobs of a step, never the whole sequence again, nor the prompt), so a
long answer costs the same per token as a short one.

It tells the router (replicas/router.py) what it holds every routing-stats period: the prefix
cache's block keys (their first 8 bytes: a hint for routing, the engine checks whole keys), its
load, and the gauges /metrics sums over replicas. Serve calls `check_health`; a replica whose engine
died fails it and is replaced.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fulmine.config import EngineConfig
from fulmine.engine.admission import Refused
from fulmine.engine.outputs import RequestOutput
from fulmine.request import SamplingParams

KEY_BYTES = 8  # of a block key, in routing stats


@dataclass
class Job:
    """A request for a replica. `generated`: tokens it already produced on a replica that died."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    age_s: float  # since it reached the front (replicas' clocks are their own)
    generated: list[int] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.generated


class ReplicaRefused(Exception):
    """admission.Refused as it crosses processes (its arguments pickle with it)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s)
        self.message, self.retry_after_s = message, retry_after_s


class EngineReplica:
    """The Serve deployment's class: one engine per replica (see the module docstring)."""

    def __init__(self, model: str | None, config: EngineConfig) -> None:
        from fulmine.engine.llm_engine import LLMEngine
        from fulmine.server.async_engine import AsyncEngine

        self.pid = os.getpid()
        self.died: BaseException | None = None
        self.engine = AsyncEngine(LLMEngine(model, config, progress=False), on_death=self._on_death)
        # A Ray worker's heap (Ray, Serve, gRPC, pydantic...) is large: a full collection over it
        # stalled every stream on the replica for 0.1-0.35 s. What is loaded by now lives as long
        # as the replica: out of the collector's sight.
        gc.collect()
        gc.freeze()

    def _on_death(self, error: BaseException) -> None:
        self.died = error  # check_health fails from now on: Serve replaces this replica

    async def generate(self, job: Job) -> AsyncIterator[RequestOutput | None]:
        """The request's deltas, after None: admitted (by its latency targets; or ReplicaRefused)."""
        engine = self.engine.engine
        arrival = time.monotonic() - job.age_s
        if not job.generated:  # a resumed stream was admitted where it started
            try:
                engine.admit(job.request_id, job.token_ids, job.params, arrival)
            except Refused as refused:
                raise ReplicaRefused(str(refused), refused.retry_after_s) from None
        yield None
        async for output in self.engine.generate(job.request_id, job.prompt_ids, job.params, arrival, job.generated):
            output.prompt_token_ids = []  # the front has them: a delta carries only what the step added
            yield output

    async def embed(self, prompt_ids: list[int], pooling: str, normalize: bool) -> list[float]:
        return await self.engine.embed(prompt_ids, pooling, normalize)

    def facts(self) -> dict[str, Any]:
        """What the front needs of the model beyond its config file."""
        engine = self.engine.engine
        return {
            "max_model_len": engine.max_model_len,
            "eos_token_ids": list(engine.eos_token_ids),
        }

    def check_health(self) -> None:
        error = self.died or self.engine.error
        if error is not None:
            raise RuntimeError(f"the engine died: {error}")

    def record_routing_stats(self) -> dict[str, Any]:
        engine = self.engine.engine
        return {
            "pid": self.pid,
            "block_size": engine.config.block_size,
            "keys": [key[:KEY_BYTES] for key in engine.kv_cache.pool.cached_keys()],
            "load": self.engine.num_running + self.engine.num_waiting,
            "gauges": self.engine.gauges(),
            "cpu_seconds": time.process_time(),  # this replica's, for the front's energy estimate
        }
