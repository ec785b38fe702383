"""The servers most end-to-end tests talk to: the embedded SmolLM2 behind a real server on loopback,
served as "m", and the official openai client pointed at it. A module that needs another server
(a tiny random model, API keys) defines its own `server` fixture, which takes precedence."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.server import RunningServer, engine_loader, serve

EMBEDDED_NAME = "m"


@pytest.fixture(scope="module")
def server() -> RunningServer:
    with serve(engine_loader(None), served_model_name=(EMBEDDED_NAME,)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
