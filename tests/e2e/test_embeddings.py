"""POST /v1/embeddings through the official openai client: shapes, normalization, base64 == float,
the same text the same vector alone or beside others and while generation runs, chunked == whole,
and bad inputs refused in OpenAI's error shape."""

from __future__ import annotations

import base64
import struct
import threading

import httpx
import openai
import pytest
import torch

from fulmine import EngineConfig, SamplingParams
from fulmine.engine.llm_engine import LLMEngine
from tests.e2e.openai_schemas import validate
from tests.e2e.server import RunningServer, engine_loader, serve

MODEL = "m"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "def main(): return 42"]


@pytest.fixture(scope="module")
def server(tiny_llama) -> RunningServer:
    # float32 weights: a row's values do not depend on what else shares the product
    with serve(
        engine_loader(str(tiny_llama), weight_dtype="float32", max_num_batched_tokens=8), served_model_name=(MODEL,)
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_vectors_shapes_and_norms(server: RunningServer, client: openai.OpenAI) -> None:
    response = client.embeddings.create(model=MODEL, input=TEXTS)
    width = server.engine.model_config.hidden_size
    assert [d.index for d in response.data] == [0, 1, 2]
    for d in response.data:
        assert len(d.embedding) == width
        assert abs(torch.tensor(d.embedding).norm().item() - 1.0) < 1e-4
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0
    raw = httpx.post(f"{server.base_url}/v1/embeddings", json={"model": MODEL, "input": TEXTS[0]}).json()
    # the published schema extract has no embeddings: the openai SDK's own types check the body instead
    parsed = openai.types.CreateEmbeddingResponse.model_validate(raw, strict=True)
    assert parsed.object == "list" and parsed.data[0].object == "embedding"


def test_alone_batched_base64_and_during_generation_agree(server: RunningServer, client: openai.OpenAI) -> None:
    together = [d.embedding for d in client.embeddings.create(model=MODEL, input=TEXTS).data]
    alone = [client.embeddings.create(model=MODEL, input=text).data[0].embedding for text in TEXTS]
    assert together == alone
    packed = httpx.post(
        f"{server.base_url}/v1/embeddings", json={"model": MODEL, "input": TEXTS[1], "encoding_format": "base64"}
    ).json()["data"][0]["embedding"]
    decoded = list(struct.unpack(f"<{len(alone[1])}f", base64.b64decode(packed)))
    assert decoded == pytest.approx(alone[1], abs=0)
    busy = threading.Thread(
        target=lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=40
        )
    )
    busy.start()
    during = client.embeddings.create(model=MODEL, input=TEXTS[2]).data[0].embedding
    busy.join()
    assert during == alone[2]


@pytest.fixture(scope="module")
def engine(tiny_llama) -> LLMEngine:
    return LLMEngine(str(tiny_llama), EngineConfig(weight_dtype="float32", max_num_batched_tokens=8), progress=False)


def test_chunked_equals_whole_and_pooling(engine: LLMEngine) -> None:
    """Chunks of 8 tokens give the mean one whole-prompt pass gives."""
    ids = list(engine.tokenizer.encode(TEXTS[0] * 3))
    chunked = engine.embed(ids)
    budget = engine.scheduler.max_num_batched_tokens
    engine.admission.max_batched_tokens = engine.scheduler.max_num_batched_tokens = 4096
    try:
        whole = engine.embed(ids)
    finally:
        engine.admission.max_batched_tokens = engine.scheduler.max_num_batched_tokens = budget
    assert torch.allclose(torch.tensor(chunked), torch.tensor(whole), atol=1e-5)
    last = engine.embed(ids, pooling="last", normalize=False)
    assert abs(torch.tensor(last).norm().item() - 1.0) > 1e-3  # not normalized


def test_an_embedding_is_cut_into_steps_beside_streams(engine: LLMEngine) -> None:
    """A long input takes a chunk per step while a stream gets a token every step; dropped midway, it
    frees its blocks; the same input alone gives the same vector."""
    ids = list(engine.tokenizer.encode(TEXTS[1] * 12))
    alone = engine.embed(ids)
    stream = engine.add_request("Tell me a story", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    engine.step()
    results: list = []
    engine.add_embedding(ids, "mean", True, lambda vector, error: results.append((vector, error)))
    steps = 0
    while not results:
        outputs = engine.step()
        steps += 1
        assert [o.request_id for o in outputs] == [stream]  # the stream got its token this step too
    assert steps >= len(ids) // 8 and results[0][1] is None  # chunks of the step budget at most
    assert torch.allclose(torch.tensor(results[0][0]), torch.tensor(alone), atol=1e-5)
    job = engine.add_embedding(ids, "mean", True, lambda vector, error: results.append((vector, error)))
    engine.step()
    engine.step()
    assert job in engine.kv_cache.block_tables
    engine.abort_embedding(job)
    assert job not in engine.kv_cache.block_tables and len(results) == 1
    engine.abort(stream)
    assert engine.kv_cache.pool.usage == 0.0 and not engine.has_unfinished()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "input": ""}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": [999999]}, "input"),
        ({"model": MODEL, "input": "x", "dimensions": 3}, "dimensions"),
        ({"model": MODEL, "input": "x", "pooling": "max"}, "pooling"),
        ({"model": MODEL, "input": "word " * 400}, "input"),
    ],
)
def test_bad_inputs(server: RunningServer, body: dict, param: str) -> None:
    response = httpx.post(f"{server.base_url}/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == param
