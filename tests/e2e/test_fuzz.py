"""Fuzz the API from its own OpenAPI schema (schemathesis): no 5xx, no crash, server still serves."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.e2e.server import engine_loader, serve

MODEL = "tiny"


@pytest.mark.slow
def test_generated_requests_never_get_a_5xx(tiny_llama) -> None:
    with serve(engine_loader(str(tiny_llama), max_model_len=96), served_model_name=(MODEL,)) as server:
        schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
        checked = []
        calls = {"n": 0, "ok": 0}
        for result in schema.get_all_operations():
            operation = result.ok()

            @settings(
                max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
            )
            @given(case=operation.as_strategy())
            def call(case: schemathesis.Case) -> None:
                if isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = MODEL  # a served name, so generation itself is fuzzed
                response = case.call(base_url=server.base_url, timeout=60)
                assert response.status_code < 500, (json.dumps(case.body, default=str), response.text)  # the whole body
                calls["n"] += 1
                calls["ok"] += response.status_code == 200

            call()
            checked.append(operation.label)
        assert calls["ok"] >= 10, calls  # some generated requests were valid and ran
        assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= set(checked)
        server.wait_idle(timeout=30)
        ok = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            timeout=30,
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert ok.status_code == 200
