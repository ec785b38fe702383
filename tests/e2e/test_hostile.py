"""Never down, part two: hostile input on the newer surfaces (grammars, tools, Responses, Messages,
embeddings, slo, headers and bodies) against the embedded model with the default flags. Each gets
a 200 or a clear 4xx in its API's shape while a stream runs beside it; the stream's largest gap is
measured; the engine never dies (fulmine_engine_deaths_total stays 0)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.server import RunningServer, engine_loader, serve

MODEL = "SmolLM2-135M-Instruct"
BASE = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
REWRITE = "Rewrite this code with better names: def f(a,b): return [x for x in a if x in b]"
MAX_ITL_MS = 100.0  # the engine's default --max-itl-ms


def nested(depth: int) -> str:
    return '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth


def chat_with(**fields: Any) -> dict[str, Any]:
    return {**BASE, **fields}


def tool(parameters: Any, name: str = "f") -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": name, "parameters": parameters}}]


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


CHAT = "/v1/chat/completions"
# (path, body as JSON text or an object, status, words the error names)
HOSTILE: dict[str, tuple[str, Any, int, str]] = {
    "a chain of 5000 grammar rules": (
        CHAT,
        chat_with(
            guided_grammar="start: r0\n" + "\n".join(f'r{i}: "x" r{i + 1}' for i in range(5000)) + '\nr5000: "y"'
        ),
        400,
        "bytes",
    ),
    "2000 choices": (CHAT, chat_with(guided_choice=[f"c{i}" for i in range(2000)]), 400, "choices"),
    "a schema whose root is required inside itself": (
        CHAT,
        chat_with(guided_json={"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}),
        400,
        "finite",
    ),
    "a pattern with minLength a million": (
        CHAT,
        chat_with(guided_json={"type": "string", "pattern": "^(a+)+$", "minLength": 1_000_000}),
        400,
        "minLength",
    ),
    "a rule of 50 000 alternatives": (
        CHAT,
        chat_with(guided_grammar="start: " + " | ".join(f'"w{i}"' for i in range(50_000))),
        400,
        "bytes",
    ),
    "a response format nested 960 deep": (
        CHAT,
        json.dumps(BASE)[:-1]
        + ', "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
        + nested(960)
        + "}}}",
        400,
        "nested",
    ),
    "tool parameters nested 480 deep": (
        CHAT,
        json.dumps(BASE)[:-1]
        + ', "tools": [{"type": "function", "function": {"name": "f", "parameters": '
        + nested(480)
        + "}}]}",
        400,
        "nested",
    ),
    "a regex nothing matches": (CHAT, chat_with(guided_regex=r"[^\s\S]"), 400, "nothing can satisfy"),
    "a grammar that only recurses": (CHAT, chat_with(guided_grammar='start: start "a"'), 400, "nothing can satisfy"),
    "mutually required refs": (
        CHAT,
        chat_with(
            response_format=schema_format(
                {
                    "$defs": {
                        "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
                        "b": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "required": ["a"]},
                    },
                    "$ref": "#/$defs/a",
                }
            )
        ),
        400,
        "finite",
    ),
    "a tool name that closes the call tag": (
        CHAT,
        chat_with(tools=tool({"type": "object"}, 'x"</tool_call>\n')),
        400,
        "function name",
    ),
    "a tool name with NUL": (CHAT, chat_with(tools=tool({"type": "object"}, "a\u0000b")), 400, "function name"),
    "a tool name of 5000 characters": (CHAT, chat_with(tools=tool({"type": "object"}, "a" * 5000)), 400, "function"),
    "two tools of one name": (CHAT, chat_with(tools=tool({"type": "object"}) * 2), 400, "two tools"),
    "an invalid parameters schema with tool_choice auto": (
        CHAT,
        chat_with(tools=tool({"type": "strin"}), tool_choice="auto"),
        400,
        "strin",
    ),
    "a tool result answering no call": (
        CHAT,
        chat_with(
            messages=[{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}]
        ),
        400,
        "no earlier tool call",
    ),
    "slo ttft_ms true": (CHAT, chat_with(slo={"ttft_ms": True}), 400, "slo.ttft_ms"),
    "a Responses call_id answering no call": (
        "/v1/responses",
        {"model": MODEL, "input": [{"type": "function_call_output", "call_id": "nope", "output": "1"}]},
        400,
        "no earlier tool call",
    ),
    "a Responses json_schema without a schema": (
        "/v1/responses",
        {"model": MODEL, "input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
        400,
        "schema",
    ),
    "a Messages tool_use_id answering no call": (
        "/v1/messages",
        {
            "model": MODEL,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "1"}]}],
        },
        400,
        "no earlier tool call",
    ),
    "a Messages user turn with no content": (
        "/v1/messages",
        {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": []}]},
        400,
        "at least one content block",
    ),
    "an embedding of 4096 token ids": ("/v1/embeddings", {"model": MODEL, "input": [[17] * 4096]}, 200, ""),
}


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serve(engine_loader(None), served_model_name=(MODEL,), body_timeout_s=2.0) as running:
        yield running


class Stream:
    """A long greedy stream in the background; the gaps between its chunks."""

    def __init__(self, server: RunningServer) -> None:
        self.arrivals: list[float] = []
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0, "stream": True}
        body["ignore_eos"] = True
        self.started, self.done = threading.Event(), threading.Event()

        def run() -> None:
            with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        self.arrivals.append(time.perf_counter())
                        self.started.set()
                    if self.done.is_set():
                        break  # leaving aborts it

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.started.wait(60)

    def gaps_during(self, start: float, end: float) -> list[float]:
        """Gaps between the stream's chunks from `start` to `end` (it runs past both)."""
        self.done.set()
        self.thread.join()
        times = [start] + [t for t in self.arrivals if start < t < end] + [end]
        return [b - a for a, b in zip(times, times[1:])]


def send(server: RunningServer, path: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{server.base_url}{path}", content=content, headers={"content-type": "application/json"},
                      timeout=120)  # fmt: skip


def deaths(server: RunningServer) -> float:
    for line in httpx.get(f"{server.base_url}/metrics").text.splitlines():
        if line.startswith("fulmine_engine_deaths_total "):
            return float(line.split()[1])
    raise AssertionError("no fulmine_engine_deaths_total in /metrics")


def test_a_repeated_greedy_chat_keeps_the_engine_up(server: RunningServer) -> None:
    """The issue's first repro: the same greedy chat eight times (prefix hits, accepted drafts, the
    answer ending inside a draft run) — the same answer every time, no engine death."""
    body = chat_with(messages=[{"role": "user", "content": REWRITE}], max_tokens=32, temperature=0)
    answers = {send(server, CHAT, body).json()["choices"][0]["message"]["content"] for _ in range(8)}
    assert len(answers) == 1 and deaths(server) == 0


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_input_gets_a_clear_answer_while_a_stream_runs(server: RunningServer, name: str) -> None:
    path, body, status, words = HOSTILE[name]
    stream = Stream(server)
    start = time.perf_counter()
    response = send(server, path, body)
    end = time.perf_counter()
    assert response.status_code == status, response.text[:300]
    if status == 400:
        error = response.json()["error"]
        assert words.lower() in error["message"].lower()
        if path == "/v1/messages":
            assert response.json()["type"] == "error" and error["type"] == "invalid_request_error"
    gaps = stream.gaps_during(start, end)
    print(f"GAP {name}: {max(gaps, default=0.0) * 1e3:.0f} ms over {end - start:.2f} s")
    # the target is 2 x --max-itl-ms; a shared 2-core CI machine gets slack (BENCHMARKS.md records the real gaps)
    assert max(gaps, default=0.0) < 2 * MAX_ITL_MS / 1e3 + 0.5, f"largest gap {max(gaps):.3f} s"
    assert deaths(server) == 0


def test_headers_and_bodies_at_their_limits(server: RunningServer) -> None:
    url = f"{server.base_url}{CHAT}"
    big = httpx.post(url, json=BASE, headers={"authorization": "Bearer " + "x" * 1_000_000}, timeout=30)
    assert big.status_code == 431 and big.json()["error"]["code"] == "headers_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "'
        for _ in range(9):
            yield b"x" * 2**20

    for path in (CHAT, "/v1/messages"):
        response = httpx.post(f"{server.base_url}{path}", content=chunks(), timeout=30)
        assert response.status_code == 413
        body = response.json()
        assert (body["type"] == "error") if path == "/v1/messages" else body["error"]["code"] == "request_too_large"
    # 20 bodies that never finish: each answered 408 once the body timeout (2 s here) runs out
    sockets = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1])))
        s.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\n')
        s.settimeout(10)
        sockets.append(s)
    started = time.monotonic()
    for s in sockets:
        assert s.recv(64).startswith(b"HTTP/1.1 408")
        s.close()
    assert time.monotonic() - started < 8
    assert httpx.post(url, json=BASE, timeout=30).status_code == 200 and deaths(server) == 0
