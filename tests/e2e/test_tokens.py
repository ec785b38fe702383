"""The endpoints tools script against: tokens counted exactly as a request would be prompted, tokens
shown and turned back into text, the server's facts; on the embedded model."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import EMBEDDED_NAME
from tests.e2e.server import RunningServer

MODEL = EMBEDDED_NAME
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def post(server: RunningServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


def prompt_tokens_of_a_chat(server: RunningServer) -> int:
    response = post(server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 1})
    return int(response.json()["usage"]["prompt_tokens"])


def test_counts_equal_what_a_request_is_prompted_with(server: RunningServer) -> None:
    expected = prompt_tokens_of_a_chat(server)
    tokenized = post(server, "/tokenize", {"model": MODEL, "messages": CHAT}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == expected
    assert tokenized["max_model_len"] == server.engine.max_model_len
    anthropic = post(
        server,
        "/v1/messages/count_tokens",
        {"model": MODEL, "system": "Be brief.", "messages": CHAT[1:]},
    ).json()
    assert anthropic == {"input_tokens": expected}
    openai_count = post(
        server, "/v1/responses/input_tokens", {"model": MODEL, "instructions": "Be brief.", "input": CHAT[1]["content"]}
    ).json()
    assert openai_count == {"object": "response.input_tokens", "input_tokens": expected}


def test_tokens_round_trip_with_their_pieces(server: RunningServer) -> None:
    text = "Café, naïve, 東京 🎉"
    tokenized = post(server, "/tokenize", {"prompt": text, "with_pieces": True}).json()
    ids = [t["id"] for t in tokenized["tokens"]]
    completion = post(server, "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}).json()
    assert len(ids) == completion["usage"]["prompt_tokens"]
    assert post(server, "/detokenize", {"tokens": ids}).json()["prompt"] == text
    strs = post(server, "/tokenize", {"prompt": "Paris", "return_token_strs": True}).json()
    assert "".join(strs["token_strs"]) == "Paris" and isinstance(strs["tokens"][0], int)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"model": "nope", "prompt": "a"}, "model"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/detokenize", {"tokens": [True]}, "tokens.0"),
    ],
)
def test_bad_inputs_are_a_400(server: RunningServer, path: str, body: dict, param: str) -> None:
    response = post(server, path, body)
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["param"] == param


def test_props_say_what_the_server_serves(server: RunningServer) -> None:
    props = httpx.get(f"{server.base_url}/props", timeout=10).json()
    assert props["model"] == MODEL and props["n_ctx"] == props["max_model_len"] == server.engine.max_model_len
    assert props["chat_template"] == server.engine.tokenizer.chat_template
    assert props["capabilities"]["reasoning"] == {"format": "none", "switch": None}
    assert props["build_info"].startswith("fulmine ")


def test_hostile_inputs_get_a_clear_4xx(server: RunningServer) -> None:
    huge = "lorem ipsum " * 600_000  # 7 MB: more than any tokenization could fit the context
    response = post(server, "/tokenize", {"prompt": huge})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    response = post(server, "/tokenize", {"messages": [{"role": "user", "content": huge}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    too_many = post(server, "/detokenize", {"tokens": [1] * ((1 << 20) + 1)})
    assert too_many.status_code == 400
    bad = post(server, "/v1/messages/count_tokens", {"model": MODEL, "messages": "hi"})
    assert bad.status_code == 400 and bad.json()["type"] == "error"  # Anthropic's shape on its path
    bad = post(server, "/v1/responses/input_tokens", {"model": MODEL, "input": 3})
    assert bad.status_code == 400 and "error" in bad.json()
    lone = httpx.post(  # a lone surrogate, as JSON's escape sends it
        f"{server.base_url}/tokenize", content=b'{"prompt": "a\\ud800"}', headers={"content-type": "application/json"}
    )
    assert lone.status_code == 400 and lone.json()["error"]["code"] == "invalid_unicode"
