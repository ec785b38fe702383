"""A real fulmine server on a free loopback port, in this process (so tests can read engine state)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn

from fulmine.benchmark.servers import free_port
from fulmine.config import EngineConfig, ServerConfig
from fulmine.engine.llm_engine import LLMEngine
from fulmine.server.api import create_app
from fulmine.server.lifecycle import Server, ServerState


@dataclass
class RunningServer:
    base_url: str
    state: ServerState
    server: Server  # server.handle_exit(signal.SIGTERM, None) is what a SIGTERM does

    @property
    def engine(self) -> LLMEngine:
        assert self.state.engine is not None
        return self.state.engine.engine

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request runs or waits and every KV block is back in the pool."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            engine = self.engine
            if not engine.has_unfinished() and engine.kv_cache.pool.usage == 0.0:
                return
            time.sleep(0.02)
        raise AssertionError(f"server not idle: {self.engine.scheduler.num_unfinished} requests left")


def wait_for_first_token(stream: httpx.Response) -> Iterator[str]:
    """Read a streamed chat response until its first sampled token: the request is then running
    in the engine (the role chunk alone is sent before the request reaches the engine). Ask for
    logprobs: a token whose text is still an incomplete character then shows up as logprobs.

    Keep the returned line iterator referenced: once it is garbage, httpx closes the response,
    which the server rightly takes as a disconnect and aborts the request."""
    lines = stream.iter_lines()
    for line in lines:
        if line.startswith("data: {"):
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            if choice.get("delta", {}).get("content") or (choice.get("logprobs") or {}).get("content"):
                return lines
    raise AssertionError("the stream ended without content")


@contextmanager
def serve(
    load: Callable[[], LLMEngine],
    wait_ready: bool = True,
    on_fatal: Callable[[BaseException], None] | None = None,
    **server_args: object,
) -> Iterator[RunningServer]:
    port = free_port()
    config = ServerConfig(host="127.0.0.1", port=port, **server_args)  # type: ignore[arg-type]
    app = create_app(config, load, on_fatal)
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), app.state.fulmine)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            status = httpx.get(f"{base_url}/health", timeout=1).status_code
            if status == 200 or (not wait_ready and status == 503):
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not become ready")
        time.sleep(0.05)
    try:
        yield RunningServer(base_url, app.state.fulmine, server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def engine_loader(model: str | None, **engine_args: object) -> Callable[[], LLMEngine]:
    return lambda: LLMEngine(model, EngineConfig(**engine_args), progress=False)  # type: ignore[arg-type]
