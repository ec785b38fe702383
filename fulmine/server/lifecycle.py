"""The engine's life behind the API: load, serve, restart after a death, drain on shutdown.

States, as `/health` reports them (200 only when "ready"):
- loading: the model loads on a thread after the server starts listening; API routes answer 503.
- ready: serving.
- restarting: the engine thread died (a failure no request could be blamed for; failures that
  can be pinned on requests end those requests alone, inside the engine). Requests in flight get
  an error; the engine is reloaded while new requests get 503 with Retry-After. After
  `max_engine_restarts` deaths within ten minutes the server gives up and exits non-zero, so a
  supervisor restarts the process instead.
- draining: SIGTERM (or Ctrl-C) arrived. New requests get 503 with Retry-After; requests in flight
  finish, up to `drain_timeout_s`, then the rest are ended with a `server_shutting_down` error.
- failed: the model could not be loaded, or the engine died too often.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

import torch
import uvicorn

from fulmine.config import ServerConfig
from fulmine.energy import EnergyMeter
from fulmine.engine.llm_engine import LLMEngine
from fulmine.server import bodies
from fulmine.server import protocol as p
from fulmine.server.async_engine import AsyncEngine
from fulmine.server.completions import Completions
from fulmine.server.engine_client import EngineClient, ModelFacts
from fulmine.server.metrics import Metrics

logger = logging.getLogger("fulmine.server")
_RESTART_WINDOW_S = 600.0
_UNAVAILABLE = {
    "loading": ("the model is still loading; retry when /health answers 200", "model_not_ready"),
    "restarting": ("the engine failed and is restarting; retry shortly", "engine_restarting"),
    "draining": ("the server is shutting down; retry on another replica or shortly", "server_shutting_down"),
    "failed": ("the model failed to load or the engine failed; the server cannot serve", "model_not_ready"),
}


@dataclass
class ServerState:
    config: ServerConfig
    load_engine: Callable[[], LLMEngine | EngineClient]
    on_fatal: Callable[[BaseException], None] | None = None  # the server cannot serve: the process should exit
    metrics: Metrics = field(default_factory=Metrics)
    status: str = "loading"
    engine: EngineClient | None = None
    completions: Completions | None = None
    model_names: list[str] = field(default_factory=list)
    load_error: BaseException | None = None
    created: int = field(default_factory=bodies.now)
    in_flight: int = 0  # API requests admitted and not yet fully answered (streams included)
    deaths: deque[float] = field(default_factory=deque)  # when the engine died, within the restart window

    def ready(self) -> Completions:
        """The completions to serve a request with, or a 503 that says why not (Retry-After is set)."""
        if self.status == "ready" and self.completions is not None:
            return self.completions
        message, code = _UNAVAILABLE[self.status]
        raise p.RequestError(message, code=code, status=503, error_type="service_unavailable")

    # -- loading and restarting (on threads of their own) -------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._load, name="fulmine-loader", daemon=True).start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            engine = self.load_engine()
        except BaseException as error:
            self.load_error = error
            logger.error("loading the model failed: %s", error)
            self._give_up(error)
            return
        replicas_cpu: Callable[[], float] | None = None
        if isinstance(engine, LLMEngine):
            async_engine: EngineClient = AsyncEngine(engine, on_death=self._on_engine_death)
            device = engine.runner.device
        else:  # engines behind a client of their own (replicas on Ray Serve): restarted there, not here
            client = engine
            async_engine, device = client, torch.device("cpu")
            replicas_cpu = lambda: client.cpu_seconds() or 0.0  # noqa: E731
            self.metrics.watch_replicas(engine)
        self.metrics.watch(async_engine)
        if self.metrics.energy is None:  # one meter for the server's life, restarts included
            cuda = (device.index or 0) if device.type == "cuda" else None
            self.metrics.meter(EnergyMeter(self.config.cpu_watts_per_core, cuda, replicas_cpu))
        self.model_names = list(self.config.served_model_name) or [_default_name(async_engine.engine)]
        self.engine = async_engine
        self.completions = Completions(async_engine, self.metrics, self.config, self.model_names)
        if self.status != "draining":  # a restart that ends during a drain does not reopen the doors
            self.status = "ready"
        logger.info("serving %s (%.1f s to load)", ", ".join(self.model_names), time.perf_counter() - started)
        # the grammar tokenizer (0.4-1.5 s), built now so the first structured request does not wait for it
        threading.Thread(
            target=self._warm_grammars, args=(async_engine.engine,), name="fulmine-grammars", daemon=True
        ).start()

    @staticmethod
    def _warm_grammars(engine: ModelFacts) -> None:
        try:
            _ = engine.grammars.tokenizer
        except Exception as error:  # noqa: BLE001 (structured requests will get the reason as a 400)
            logger.warning("structured outputs unavailable: %s", error)

    def _on_engine_death(self, error: BaseException) -> None:
        """Called on the dead engine's thread, after every request in flight got its error."""
        self.metrics.engine_deaths.inc()
        now = time.monotonic()
        while self.deaths and now - self.deaths[0] > _RESTART_WINDOW_S:
            self.deaths.popleft()
        self.deaths.append(now)
        if self.status == "draining":
            return
        if len(self.deaths) > self.config.max_engine_restarts:
            logger.error("the engine died %d times in %.0f s: giving up", len(self.deaths), _RESTART_WINDOW_S)
            self._give_up(error)
            return
        self.status = "restarting"
        # drop the dead engine (weights, KV cache, its tensor-parallel ranks) before loading its
        # replacement: never two at once
        if isinstance(self.engine, AsyncEngine) and self.engine.engine.ranks is not None:
            self.engine.engine.ranks.close()
        self.completions, self.engine = None, None
        self.metrics.unwatch()
        gc.collect()
        logger.error("the engine died (%s); reloading it", error)
        self.start()

    def _give_up(self, error: BaseException) -> None:
        self.status = "failed"
        if self.on_fatal is not None:
            self.on_fatal(error)

    # -- draining (on the event loop) ----------------------------------------------------------------
    async def drain(self, timeout_s: float) -> None:
        """Stop admitting; let requests in flight finish for up to `timeout_s`; end the rest."""
        if self.status == "ready":
            self.status = "draining"
        elif self.status != "draining":
            return  # nothing serves: nothing to drain
        logger.info("draining: %d request(s) in flight, up to %g s", self.in_flight, timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight and self.engine is not None:
            logger.warning("drain timeout: ending %d request(s) in flight", self.in_flight)
            message, code = _UNAVAILABLE["draining"]
            self.engine.abort_all(p.RequestError(message, code=code, status=503, error_type="service_unavailable"))
            deadline = time.monotonic() + 5.0  # their error events go out, then the connections close
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)


class Server(uvicorn.Server):
    """uvicorn, except that the first SIGTERM or Ctrl-C drains (see the module docstring) before
    uvicorn's own shutdown; a second one shuts down at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None  # referenced, so it is not collected mid-drain

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._draining or self.state.status != "ready":
            super().handle_exit(sig, frame)  # nothing to drain, or asked twice: uvicorn's shutdown now
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain_then_exit() -> None:
            await self.state.drain(self.state.config.drain_timeout_s)
            self.should_exit = True

        self._drain_task = asyncio.ensure_future(drain_then_exit())


def _default_name(engine: ModelFacts) -> str:
    name = engine.source.name
    return name.split(".Q")[0] if engine.source.gguf is not None else name  # "SmolLM2-135M-Instruct"
