"""The server end to end: a real server on loopback, the official openai client, OpenAI's schemas."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import openai
import pytest

from fulmine.engine.llm_engine import LLMEngine
from tests.e2e.openai_schemas import validate
from tests.e2e.server import RunningServer, engine_loader, serve, wait_for_first_token

MODEL = "tiny"
CHAT = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def server(tiny_llama) -> RunningServer:
    # float32 weights: batch invariance is then exact; with the float16 default, a row's numerics
    # depend (at rounding level) on whether its batch ran the GEMV or the GEMM path, which flips
    # near-ties of this random model (see docs/BENCHMARKS.md)
    loader = engine_loader(str(tiny_llama), block_size=4, max_model_len=128, weight_dtype="float32")
    with serve(loader, served_model_name=(MODEL,)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def raw(server: RunningServer, path: str, body: object, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=timeout)


# -- chat -------------------------------------------------------------------------------------
def test_chat_plain_matches_schema_and_usage(server: RunningServer, client: openai.OpenAI) -> None:
    response = raw(
        server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0}
    )
    assert response.status_code == 200
    body = response.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"
    assert body["timing"]["ttft_s"] > 0 and "ttft;dur=" in response.headers["server-timing"]
    typed = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert typed.choices[0].message.content == body["choices"][0]["message"]["content"]


def test_chat_stream_equals_plain_and_chunks_match_schema(server: RunningServer, client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    with httpx.stream(
        "POST",
        f"{server.base_url}/v1/chat/completions",
        timeout=30,
        json={
            "model": MODEL,
            "messages": CHAT,
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain.choices[0].message.content
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    streamed = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_chat_text_parts_system_and_multi_turn(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Paris "}, {"type": "text", "text": "is"}]},
        {"role": "assistant", "content": "the capital"},
        {"role": "user", "content": "of?"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.prompt_tokens > 10


def test_n_seed_stop_and_logprobs(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=10, temperature=1.0, seed=11, n=3)
    first = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    again = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1  # each choice draws its own tokens
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0).choices[0]
    text = full.message.content or ""
    cut = text[3:5]
    stopped = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, stop=[cut])
    assert stopped.choices[0].message.content == text[: text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    lp = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = lp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy = the top one


def test_logit_bias_forces_a_token(client: openai.OpenAI, server: RunningServer) -> None:
    token_id = server.engine.tokenizer.encode(" dog")[0]
    token = server.engine.tokenizer.decode([token_id])
    biased = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logit_bias={str(token_id): 100}
    )
    assert biased.choices[0].message.content == token * 3


def test_prefix_cache_reports_cached_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Numbers: 0 1 2 3 4 5 6 7 8 9. The lazy dog " * 2}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 4


# -- completions ------------------------------------------------------------------------------
def test_completions_shapes(server: RunningServer, client: openai.OpenAI) -> None:
    one = raw(
        server,
        "/v1/completions",
        {"model": MODEL, "prompt": "The lazy dog", "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": False},
    )
    assert one.status_code == 200
    validate(one.json(), "CreateCompletionResponse")
    logprobs = one.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 5 and all(len(t) == 2 for t in logprobs["top_logprobs"])
    assert "".join(logprobs["tokens"]) == one.json()["choices"][0]["text"]
    many = client.completions.create(model=MODEL, prompt=["a b", "c d"], max_tokens=3, n=2, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    ids = server.engine.tokenizer.encode("The lazy dog")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == one.json()["choices"][0]["text"]
    echoed = client.completions.create(model=MODEL, prompt="The lazy dog", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "The lazy dog" + by_ids.choices[0].text
    stream = client.completions.create(model=MODEL, prompt="The lazy dog", max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == by_ids.choices[0].text


def test_models_and_metrics(server: RunningServer, client: openai.OpenAI) -> None:
    models = httpx.get(f"{server.base_url}/v1/models").json()
    validate(models, "ListModelsResponse")
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    metrics = httpx.get(f"{server.base_url}/metrics").text
    for name in (
        "fulmine_time_to_first_token_seconds_bucket",
        "fulmine_inter_token_latency_seconds_bucket",
        "fulmine_e2e_request_latency_seconds_bucket",
        "fulmine_request_queue_time_seconds_bucket",
        "fulmine_prompt_tokens_total",
        "fulmine_generation_tokens_total",
        "fulmine_num_requests_running",
        "fulmine_num_requests_waiting",
        "fulmine_kv_cache_usage_ratio",
        "fulmine_kv_cache_used_blocks",
        "fulmine_engine_deaths_total",
        "fulmine_prefix_cache_hit_rate",
    ):
        assert name in metrics


# -- errors -------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"model": "gpt-4o", "messages": CHAT}, 404, "model"),
    ({"model": MODEL, "messages": CHAT, "temperature": 3}, 400, "temperature"),
    ({"model": MODEL, "messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": CHAT, "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "messages": CHAT, "n": 0}, 400, "n"),
    ({"model": MODEL, "messages": CHAT, "n": 1000}, 400, "n"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL, "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "messages": CHAT, "response_format": {"type": "grammar"}}, 400, "response_format"),
    ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function", "function": {"name": ""}}]}, 400, "tools[0]"),
    ({"model": MODEL, "messages": CHAT, "frobnicate": True}, 400, "frobnicate"),
    ({"model": MODEL, "messages": CHAT, "logit_bias": {"999999": 5}}, 400, "logit_bias"),
    ({"model": MODEL, "messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content",
    ),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_chat_requests_get_openai_errors(server: RunningServer, body: dict, status: int, param: str) -> None:
    response = raw(server, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == param


def test_malformed_bodies_and_routes(server: RunningServer) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    for content in (b"{not json", b"", b"[1, 2]", b"null"):
        response = httpx.post(url, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, content
        validate(response.json(), "ErrorResponse")
    too_big = httpx.post(url, content=b"x" * (9 * 2**20), headers={"content-type": "application/json"})
    assert too_big.status_code == 413
    validate(too_big.json(), "ErrorResponse")
    assert httpx.get(f"{server.base_url}/v1/nothing").status_code == 404
    assert httpx.get(url).status_code == 405
    completions = raw(server, "/v1/completions", {"model": MODEL, "prompt": [], "max_tokens": 2})
    assert completions.status_code == 400
    assert raw(server, "/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}).status_code == 400


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=-1)  # type: ignore[arg-type]
    assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices  # still serving


# -- concurrency, cancellation, overload ------------------------------------------------------------
async def greedy_stream(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> str:
    """The text of one streamed greedy chat answer of exactly `max_tokens` tokens."""
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def test_concurrent_streams_equal_each_alone(server: RunningServer) -> None:
    prompts = [f"Numbers {i}: " + " ".join(str(j) for j in range(i, i + 6)) for i in range(8)]
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)

    async def one(prompt: str) -> str:
        return await greedy_stream(client, prompt, max_tokens=16)

    async def run() -> tuple[list[str], list[str]]:
        alone = [await one(p) for p in prompts]
        together = await asyncio.gather(*(one(p) for p in prompts))
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone
    server.wait_idle()


def test_client_disconnect_mid_stream_frees_the_kv_cache(server: RunningServer) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 100, "stream": True, "ignore_eos": True, "logprobs": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i == 3:
                assert server.engine.has_unfinished()
                break  # closing the connection mid-stream
    server.wait_idle(timeout=5)


def test_client_disconnect_on_a_plain_request_frees_the_kv_cache(tiny_llama) -> None:
    # a slow engine: a big step budget and a long answer keep the request running for a while
    with serve(engine_loader(str(tiny_llama), max_model_len=256), served_model_name=(MODEL,)) as s:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 200, "ignore_eos": True}
        original = s.engine.step

        def slow_step() -> list:
            time.sleep(0.02)
            return original()

        s.engine.step = slow_step  # type: ignore[method-assign]
        with pytest.raises(httpx.ReadTimeout):
            raw(s, "/v1/chat/completions", body, timeout=0.5)
        s.wait_idle(timeout=5)


def test_overload_answers_429_with_retry_after(tiny_llama) -> None:
    loader = engine_loader(str(tiny_llama), max_num_seqs=1, max_model_len=256)
    with serve(loader, served_model_name=(MODEL,), max_queue=0) as s:
        original = s.engine.step
        s.engine.step = lambda: (time.sleep(0.02), original())[1]  # type: ignore[method-assign]
        body = {
            "model": MODEL,
            "messages": CHAT,
            "max_tokens": 200,
            "stream": True,
            "ignore_eos": True,
            "logprobs": True,
        }
        with httpx.stream("POST", f"{s.base_url}/v1/chat/completions", json=body, timeout=30) as first:
            lines = wait_for_first_token(first)  # noqa: F841 (held open on purpose)
            second = raw(s, "/v1/chat/completions", {**body, "stream": False})
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            validate(second.json(), "ErrorResponse")
        s.wait_idle(timeout=5)
        ok = raw(s, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2})
        assert ok.status_code == 200  # accepted again once the running request left


def test_request_timeout(tiny_llama) -> None:
    with serve(
        engine_loader(str(tiny_llama), max_model_len=256), served_model_name=(MODEL,), request_timeout_s=0.3
    ) as s:
        original = s.engine.step
        s.engine.step = lambda: (time.sleep(0.02), original())[1]  # type: ignore[method-assign]
        response = raw(
            s, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 200, "ignore_eos": True}
        )
        assert response.status_code == 408
        validate(response.json(), "ErrorResponse")
        s.wait_idle(timeout=5)


# -- auth and readiness ---------------------------------------------------------------------------
def test_api_keys(tiny_llama) -> None:
    with serve(engine_loader(str(tiny_llama)), served_model_name=(MODEL,), api_key=("k1", "k2")) as s:
        assert httpx.get(f"{s.base_url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}, {"x-api-key": "k3"}):
            response = httpx.get(f"{s.base_url}/v1/models", headers=headers)
            assert response.status_code == 401
            validate(response.json(), "ErrorResponse")
        assert httpx.get(f"{s.base_url}/metrics").status_code == 401
        for key in ("k1", "k2"):
            client = openai.OpenAI(base_url=f"{s.base_url}/v1", api_key=key, max_retries=0)
            assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices  # type: ignore
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.base_url}/v1", api_key="bad", max_retries=0).models.list()
        # Anthropic's clients send x-api-key
        assert httpx.get(f"{s.base_url}/v1/models", headers={"x-api-key": "k2"}).status_code == 200


def test_health_is_503_while_loading(tiny_llama) -> None:
    release = threading.Event()

    def slow_load() -> LLMEngine:
        release.wait(30)
        return engine_loader(str(tiny_llama))()

    with serve(slow_load, wait_ready=False, served_model_name=(MODEL,)) as s:
        assert httpx.get(f"{s.base_url}/health").json() == {"status": "loading"}
        loading = raw(s, "/v1/chat/completions", {"model": MODEL, "messages": CHAT})
        assert loading.status_code == 503
        validate(loading.json(), "ErrorResponse")
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{s.base_url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_prompts_are_logged_only_when_asked(tiny_llama, caplog: pytest.LogCaptureFixture) -> None:
    secret = "my secret question"
    body = {"model": MODEL, "messages": [{"role": "user", "content": secret}], "max_tokens": 2}
    caplog.set_level(logging.INFO, logger="fulmine.server")
    for log_prompts in (False, True):
        with serve(engine_loader(str(tiny_llama)), served_model_name=(MODEL,), log_prompts=log_prompts) as s:
            assert raw(s, "/v1/chat/completions", body).status_code == 200
        assert (secret in caplog.text) is log_prompts


def test_bad_requests_never_disturb_streams_in_flight(server: RunningServer) -> None:
    prompts = [f"Numbers {i}: " + " ".join(str(j) for j in range(i, i + 5)) for i in range(4)]
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)

    async def good(prompt: str) -> str:
        return await greedy_stream(client, prompt, max_tokens=24)

    async def bad(body: dict) -> int:
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
            return response.status_code

    async def run() -> tuple[list[str], list[str], list[int]]:
        alone = [await good(p) for p in prompts]
        mixed = await asyncio.gather(*(good(p) for p in prompts), *(bad(b) for b, _, _ in BAD_REQUESTS))
        return alone, list(mixed[: len(prompts)]), list(mixed[len(prompts) :])  # type: ignore[arg-type]

    alone, together, statuses = asyncio.run(run())
    assert together == alone
    assert statuses == [status for _, status, _ in BAD_REQUESTS]
    server.wait_idle()


def test_echo_with_logprobs_scores_the_prompt(server: RunningServer) -> None:
    """What evaluation harnesses use: the prompt's own token logprobs, echoed before the answer."""
    ids = server.engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    body = {"model": MODEL, "prompt": ids, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2}
    plain = raw(server, "/v1/completions", body)
    assert plain.status_code == 200, plain.text
    logprobs = plain.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None  # as OpenAI's API
    assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert "".join(logprobs["tokens"]) == plain.json()["choices"][0]["text"]
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(ids) + 3)]
    # OpenAI's schema says numbers only; its API sends null for the first echoed token
    trimmed = {**logprobs, **{k: logprobs[k][1:] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}}
    validate(
        {**plain.json(), "choices": [{**plain.json()["choices"][0], "logprobs": trimmed}]}, "CreateCompletionResponse"
    )
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for key in streamed:
            streamed[key] += (chunk["choices"][0]["logprobs"] or {}).get(key, [])
    assert streamed == {k: logprobs[k] for k in streamed}
