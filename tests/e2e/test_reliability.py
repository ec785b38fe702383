"""Never down: values at the edges of every type get a 400 naming the parameter (never a 5xx), a
request that makes the engine fail ends alone, a dead engine is restarted, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fulmine.executors.model_runner import ModelRunner
from fulmine.request import INT64_MAX, INT64_MIN, SamplingParams
from fulmine.server import protocol as p
from tests.e2e.openai_schemas import validate
from tests.e2e.server import RunningServer, engine_loader, serve
from tests.e2e.test_server import greedy_stream

MODEL = "tiny"
CHAT = [{"role": "user", "content": "hi"}]
BASE = {"model": MODEL, "messages": CHAT, "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tiny_llama) -> Iterator[RunningServer]:
    with serve(engine_loader(str(tiny_llama), max_model_len=128), served_model_name=(MODEL,)) as running:
        yield running


def post(server: RunningServer, path: str, body: Any) -> httpx.Response:
    """Send the body as a client might: NaN and Infinity literals, lone surrogates as \\ud800 escapes."""
    content = json.dumps(body, allow_nan=True)
    headers = {"content-type": "application/json"}
    return httpx.post(f"{server.base_url}{path}", content=content, headers=headers, timeout=60)


def sse_events(response: httpx.Response) -> list[Any]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in response.text.splitlines() if line]


def assert_serving(server: RunningServer) -> None:
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    assert post(server, "/v1/chat/completions", BASE).status_code == 200
    server.wait_idle()


# -- validation at the edge ------------------------------------------------------------------------
def _message(content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}]}


REJECTED = [  # (fields over BASE, the param the 400 names)
    ({"seed": 2**63}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 18446744073709551616}, "seed"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": math.inf}, "top_p"),
    ({"presence_penalty": -1e308}, "presence_penalty"),
    ({"min_p": math.nan}, "min_p"),
    ({"logit_bias": {"5": math.nan}}, "logit_bias.5"),
    ({"logit_bias": {"²": 1}}, "logit_bias"),
    ({"top_k": 2**64}, "top_k"),
    ({"max_tokens": 2**64}, "max_tokens"),
    ({"n": 2**64}, "n"),
    ({"min_tokens": 10**30}, "min_tokens"),
    ({"stop_token_ids": [2**64]}, "stop_token_ids.0"),
    (_message("\ud800"), "messages[0].content"),
    (_message("emoji half \ud83d"), "messages[0].content"),
    (_message([{"type": "text", "text": "a\udfffb"}]), "messages[0].content[0].text"),
    ({"model": "\ud800"}, "model"),
    ({"stop": ["ok", "\udc00"]}, "stop[1]"),
    ({"user": "\ud83d"}, "user"),
    ({"metadata": {"k\ud800": "v"}}, "metadata.'k\\ud800'"),
]


@pytest.mark.parametrize(("fields", "param"), REJECTED)
def test_edge_values_get_a_400_naming_the_parameter(server: RunningServer, fields: dict, param: str) -> None:
    response = post(server, "/v1/chat/completions", {**BASE, **fields})
    assert response.status_code == 400, response.text
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == param


ACCEPTED = [
    {"seed": INT64_MAX, "n": 3, "temperature": 1.0},  # choice seeds wrap around within int64
    {"seed": INT64_MIN},
    {"top_k": 2**62},  # more than the vocabulary: no truncation
    {"temperature": 1e-30},  # greedy, not a division by ~0
    {"min_tokens": 2**62, "max_tokens": 3},
    {"presence_penalty": -0.0, "frequency_penalty": 5e-324},
    _message("nul \x00 byte"),
    _message(""),
    _message("a whole pair \ud83c\udf89 is fine"),
    {"metadata": {"a": {"b": {"c": [[[[[]]]]]}}}},
]


@pytest.mark.parametrize("fields", ACCEPTED)
def test_edge_values_that_are_valid_are_served(server: RunningServer, fields: dict) -> None:
    response = post(server, "/v1/chat/completions", {**BASE, **fields})
    assert response.status_code == 200, response.text
    validate(response.json(), "CreateChatCompletionResponse")


def test_edge_prompts_on_text_completions(server: RunningServer) -> None:
    for prompt, param in ([2**64], "prompt"), (["ok", "\udbff"], "prompt[1]"), ([[1, 2], [INT64_MAX]], "prompt"):
        response = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    deep = "[" * 100_000 + "]" * 100_000  # deeper than any JSON parser's recursion
    response = httpx.post(
        f"{server.base_url}/v1/completions", content=deep, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert_serving(server)


_INTS = st.sampled_from([0, 1, -1, 2**31, 2**53 + 1, INT64_MAX, INT64_MIN, 2**63, -(2**63) - 1, 2**64, 10**40])
_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, 1.0, 2.0, 1e-30])
_STRINGS = st.sampled_from(["", "\ud800", "\udfff", "\x00", "a\ud83d", "\ud83c\udf89", "x" * 20_000, "tiny", "hi"])
_SCALARS = st.one_of(
    _INTS, st.integers(), _FLOATS, st.floats(), _STRINGS, st.text(max_size=20), st.booleans(), st.none()
)
_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_STRINGS, inner, max_size=3)
)
_FIELDS = st.sampled_from(
    [
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "stop",
        "presence_penalty", "frequency_penalty", "logit_bias", "seed", "user", "top_k", "min_p",
        "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "logprobs", "top_logprobs", "metadata",
    ]
)  # fmt: skip
_PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _STRINGS}))
_CONTENTS = st.one_of(_STRINGS, st.text(max_size=40), _PARTS)


_VALID_PROMPTS = st.sampled_from(["Hello", "tiny", "The quick brown fox"]) | st.lists(st.integers(0, 367), min_size=1)
_PROMPTS = st.one_of(
    _VALID_PROMPTS,
    _VALID_PROMPTS,
    _VALID_PROMPTS,
    _STRINGS,
    st.lists(_INTS | st.integers(0, 367), max_size=4),
    st.lists(st.lists(st.integers(-1, 400), max_size=3), max_size=3),
    st.lists(_STRINGS, max_size=3),
    _VALUES,
)
_COMPLETION_FIELDS = st.sampled_from(["echo", "logprobs", "best_of", "suffix", "n", "seed", "max_tokens", "stream"])


def _never_a_5xx(server: RunningServer, path: str, bodies: st.SearchStrategy[dict[str, Any]]) -> dict[int, int]:
    """Send 250 bodies drawn from `bodies`; each gets a 2xx or a 4xx in OpenAI's shape. The statuses seen."""
    statuses: dict[int, int] = {}

    @settings(max_examples=250, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def check(body: dict[str, Any]) -> None:
        response = post(server, path, body)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            validate(response.json(), "ErrorResponse")
        elif body.get("stream") is True:
            assert sse_events(response)[-1] == "[DONE]"

    check()
    assert_serving(server)
    return statuses


@pytest.mark.slow
def test_any_chat_request_at_the_edges_never_gets_a_5xx(server: RunningServer) -> None:
    bodies = st.builds(
        lambda fields, content: {**BASE, **_message(content), **fields},
        st.dictionaries(_FIELDS, _VALUES, max_size=3),
        _CONTENTS,
    )
    statuses = _never_a_5xx(server, "/v1/chat/completions", bodies)
    assert statuses.get(200, 0) >= 20 and statuses.get(400, 0) >= 50, statuses  # both kinds were exercised


@pytest.mark.slow
def test_any_completion_request_at_the_edges_never_gets_a_5xx(server: RunningServer) -> None:
    bodies = st.builds(
        lambda fields, prompt: {"model": MODEL, "max_tokens": 4, "prompt": prompt, **fields},
        st.dictionaries(_COMPLETION_FIELDS | _FIELDS.filter(lambda f: f != "messages"), _VALUES, max_size=2),
        _PROMPTS,
    )
    statuses = _never_a_5xx(server, "/v1/completions", bodies)
    assert statuses.get(200, 0) >= 20 and statuses.get(400, 0) >= 50, statuses


# -- a request that makes the engine fail ends alone ---------------------------------------------
POISON = 7  # min_tokens marks the poisoned requests


@pytest.fixture
def poisoned_requests_fail() -> Iterator[None]:
    original = ModelRunner.execute

    def execute(self, batch):  # type: ignore[no-untyped-def]
        for s in batch.seqs:
            if s.params.min_tokens == POISON and len(s.output_token_ids) >= 2:
                raise RuntimeError("injected fault")
        return original(self, batch)

    ModelRunner.execute = execute  # type: ignore[method-assign]
    yield
    ModelRunner.execute = original  # type: ignore[method-assign]


def test_a_failing_request_fails_alone(server: RunningServer, poisoned_requests_fail: None) -> None:
    prompts = [f"Numbers {i}: " + " ".join(str(j) for j in range(i, i + 5)) for i in range(4)]
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    poisoned = {**BASE, "max_tokens": 20, "min_tokens": POISON, "ignore_eos": True}

    async def run() -> tuple[list[str], list[str], list[Any]]:
        alone = [await greedy_stream(client, p, max_tokens=24) for p in prompts]
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            results = await asyncio.gather(
                *(greedy_stream(client, p, max_tokens=24) for p in prompts),
                http.post("/v1/chat/completions", json={**poisoned, "stream": True, "logprobs": True}),
                http.post("/v1/chat/completions", json=poisoned),
            )
        return alone, list(results[:4]), list(results[4:])  # type: ignore[arg-type]

    alone, together, (stream, plain) = asyncio.run(run())
    assert together == alone
    assert plain.status_code == 500
    validate(plain.json(), "ErrorResponse")
    assert plain.json()["error"]["code"] == "engine_error" and "injected fault" in plain.json()["error"]["message"]
    events = sse_events(stream)
    assert stream.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_error"  # an error event, after the tokens it had
    streamed = [e for e in events[1:-2] if e["choices"] and (e["choices"][0]["logprobs"] or {}).get("content")]
    assert sum(len(e["choices"][0]["logprobs"]["content"]) for e in streamed) >= 2  # its tokens came first
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'fulmine_requests_total{finish_reason="error"} 2.0' in metrics
    assert_serving(server)


# -- a dead engine is restarted --------------------------------------------------------------------
def _kill_engine_once(running: RunningServer) -> None:
    """The next scheduling raises: a failure no request can be blamed for."""
    scheduler = running.engine.scheduler
    original = scheduler.schedule

    def schedule(*args, **kwargs):  # type: ignore[no-untyped-def]
        scheduler.schedule = original  # type: ignore[method-assign]
        raise RuntimeError("injected engine bug")

    scheduler.schedule = schedule  # type: ignore[method-assign]


def _wait_health(running: RunningServer, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{running.base_url}/health").json()["status"] != status:
        assert time.monotonic() < deadline, f"health never said {status}"
        time.sleep(0.02)


def test_a_dead_engine_is_restarted(tiny_llama) -> None:
    loads = []
    reload_may_finish = threading.Event()

    def load():  # type: ignore[no-untyped-def]
        loads.append(1)
        if len(loads) > 1:
            reload_may_finish.wait(30)  # hold the reload, to see the server while it restarts
        return engine_loader(str(tiny_llama), max_model_len=128)()

    with serve(load, served_model_name=(MODEL,)) as running:
        first_engine = running.state.engine
        _kill_engine_once(running)
        response = post(running, "/v1/chat/completions", {**BASE, "stream": True})
        assert sse_events(response)[-2]["error"]["type"] == "server_error"  # the request in flight: an error
        _wait_health(running, "restarting")
        refused = post(running, "/v1/chat/completions", BASE)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "engine_restarting"
        reload_may_finish.set()
        _wait_health(running, "ok")
        assert running.state.engine is not first_engine
        assert_serving(running)
        assert "fulmine_engine_deaths_total 1.0" in httpx.get(f"{running.base_url}/metrics").text


def test_an_engine_that_keeps_dying_gives_up(tiny_llama) -> None:
    fatal: list[BaseException] = []
    loader = engine_loader(str(tiny_llama), max_model_len=128)
    with serve(loader, served_model_name=(MODEL,), max_engine_restarts=0, on_fatal=fatal.append) as running:
        _kill_engine_once(running)
        post(running, "/v1/chat/completions", BASE)
        _wait_health(running, "failed")
        assert [str(e) for e in fatal] == ["injected engine bug"]  # the CLI then exits non-zero
        assert post(running, "/v1/chat/completions", BASE).status_code == 503


# -- SIGTERM drains ----------------------------------------------------------------------------------
def _slow_steps(running: RunningServer, seconds: float) -> None:
    engine = running.engine
    original = type(engine).step.__get__(engine)
    engine.step = lambda: (time.sleep(seconds), original())[1]  # type: ignore[method-assign]


def _stream_in_background(running: RunningServer, max_tokens: int) -> tuple[threading.Thread, list[httpx.Response]]:
    result: list[httpx.Response] = []
    usage = {"include_usage": True}
    body = {**BASE, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "stream_options": usage}
    thread = threading.Thread(target=lambda: result.append(post(running, "/v1/chat/completions", body)))
    thread.start()
    deadline = time.monotonic() + 30
    while not running.engine.has_unfinished():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return thread, result


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(tiny_llama) -> None:
    with serve(engine_loader(str(tiny_llama), max_model_len=128), served_model_name=(MODEL,)) as running:
        _slow_steps(running, 0.03)
        thread, result = _stream_in_background(running, max_tokens=40)
        running.server.handle_exit(signal.SIGTERM, None)
        _wait_health(running, "draining")
        refused = post(running, "/v1/chat/completions", BASE)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_shutting_down"
        thread.join(timeout=30)
        events = sse_events(result[0])
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 40  # all of it
        assert [e["choices"][0]["finish_reason"] for e in events[:-2]][-1] == "length"  # finished normally
        deadline = time.monotonic() + 10
        while not running.server.should_exit:  # then the server exits by itself
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_sigterm_ends_what_outlasts_the_drain_timeout(tiny_llama) -> None:
    loader = engine_loader(str(tiny_llama), max_model_len=128)
    with serve(loader, served_model_name=(MODEL,), drain_timeout_s=0.3) as running:
        _slow_steps(running, 0.05)
        thread, result = _stream_in_background(running, max_tokens=100)
        running.server.handle_exit(signal.SIGTERM, None)
        thread.join(timeout=30)
        events = sse_events(result[0])
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "server_shutting_down"
        running.wait_idle()  # aborted in the engine, blocks freed
        # a request admitted just before the drain ran out, reaching the engine after it: ended too
        engine = running.state.engine
        assert engine is not None
        late = engine.generate("late", [1, 2, 3], SamplingParams(max_tokens=2), time.monotonic())
        with pytest.raises(p.RequestError, match="shutting down"):
            asyncio.run(anext(late))  # type: ignore[arg-type]


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(server: RunningServer) -> None:
    """Megabytes of text cannot fit the context whatever the tokenizer makes of them: a 400 at once,
    so the tokenizer thread every request shares is never tied up by it."""
    huge = "lorem ipsum " * 600_000  # 7 MB, under the body limit
    started = time.monotonic()
    for path, body, param in (
        ("/v1/chat/completions", {**BASE, **_message(huge)}, "messages"),
        ("/v1/completions", {"model": MODEL, "prompt": huge, "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": list(range(200)), "max_tokens": 2}, "prompt"),
    ):
        response = post(server, path, body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert response.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - started < 5  # SmolLM2's tokenizer takes 4.6 s for one such text here
    assert_serving(server)
