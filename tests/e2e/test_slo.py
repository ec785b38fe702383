"""Latency as a contract, against a real server: the `slo` field, refusals with 429 and Retry-After
before anything else waits, earliest deadline first, attainment, goodput and energy in /metrics, and
`fulmine plan`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import EMBEDDED_NAME
from tests.e2e.server import RunningServer, engine_loader, serve

LONG = "The history of computing is a story of ever smaller, faster and cheaper machines. " * 120  # ~2000 tokens


@pytest.fixture(scope="module")
def server() -> RunningServer:
    with serve(engine_loader(None, speculative="off"), served_model_name=(EMBEDDED_NAME,)) as s:
        yield s


def chat(server: RunningServer, content: str, slo: dict | None, max_tokens: int = 8) -> httpx.Response:
    body = {"model": EMBEDDED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    if slo is not None:
        body["slo"] = slo
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)


def test_a_reachable_target_is_served_and_counted_as_met(server: RunningServer) -> None:
    response = chat(server, "Hi!", {"ttft_ms": 30_000, "itl_ms": 10_000})
    assert response.status_code == 200
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'fulmine_slo_requests_total{met="true",target="ttft"}' in metrics
    assert "fulmine_slo_goodput_requests_total 1.0" in metrics


def test_an_unreachable_target_is_refused_at_once_with_429(server: RunningServer) -> None:
    started = time.monotonic()
    response = chat(server, LONG, {"ttft_ms": 1})
    assert time.monotonic() - started < 0.5
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "slo_unattainable" and error["param"] == "slo"
    assert "predicted time to first token" in error["message"] and "exceeds the requested 1 ms" in error["message"]
    assert 'fulmine_requests_rejected_total{reason="slo"}' in httpx.get(f"{server.base_url}/metrics").text
    server.wait_idle()  # nothing of it was queued


def test_the_openai_client_sees_the_refusal_as_a_rate_limit(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.RateLimitError, match="slo_unattainable|predicted time"):
        client.chat.completions.create(
            model=EMBEDDED_NAME,
            messages=[{"role": "user", "content": LONG}],
            max_tokens=4,
            extra_body={"slo": {"ttft_ms": 1}},
        )


def test_a_refusal_does_not_wait_for_a_long_step(server: RunningServer) -> None:
    """While a long prompt is being computed (steps of hundreds of ms), a refusal still comes at once."""
    busy = threading.Thread(target=chat, args=(server, LONG * 2, None, 4))
    busy.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        response = chat(server, LONG, {"ttft_ms": 5})
        assert response.status_code == 429 and time.monotonic() - started < 0.5
    finally:
        busy.join()


@pytest.mark.parametrize(
    "slo", [{"ttft_ms": 0}, {"ttft_ms": -5}, {"itl_ms": "fast"}, {"ttft_ms": 1e9}, {"deadline": 5}, [100]]
)
def test_bad_targets_are_400(server: RunningServer, slo) -> None:
    response = chat(server, "Hi!", slo)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_the_responses_api_takes_the_same_field(server: RunningServer) -> None:
    body = {"model": EMBEDDED_NAME, "input": LONG, "max_output_tokens": 4, "slo": {"ttft_ms": 1}}
    response = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=60)
    assert response.status_code == 429


def test_energy_is_reported_with_its_source(server: RunningServer) -> None:
    chat(server, "Count to five.", None, max_tokens=16)
    metrics = httpx.get(f"{server.base_url}/metrics").text
    lines = [line for line in metrics.splitlines() if line.startswith("fulmine_energy_joules_per_output_token{")]
    assert lines and 'source="' in lines[0] and float(lines[0].rsplit(" ", 1)[1]) > 0
    assert any(s in lines[0] for s in ("rapl", "nvml", "estimate"))


def test_earlier_deadlines_start_first() -> None:
    """Queued behind a running request, a request with a tight first-token target overtakes one
    without a target that arrived before it."""
    with serve(engine_loader(None, speculative="off", max_num_seqs=1), served_model_name=(EMBEDDED_NAME,)) as server:
        first_tokens: dict[str, float] = {}

        def timed(name: str, slo: dict | None, delay: float) -> None:
            time.sleep(delay)
            chat(server, f"Say {name}.", slo, max_tokens=2)
            first_tokens[name] = time.monotonic()

        threads = [
            threading.Thread(target=chat, args=(server, LONG, None, 64)),  # runs; the others wait for it
            threading.Thread(target=timed, args=("relaxed", None, 0.2)),
            threading.Thread(target=timed, args=("urgent", {"ttft_ms": 20_000}, 0.4)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert first_tokens["urgent"] < first_tokens["relaxed"]


def test_plan_validates_its_predictions_and_names_its_energy_source() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fulmine", "plan", "--validate", "--max-rel-error", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    # exit 0 means every prediction was within --max-rel-error: here 1 (a shared CI machine's noise
    # reached 0.89 once beside other work), the default 0.5; the target, 0.2, is a benchmark's
    assert 0 <= summary["max_rel_error"] <= 1 and summary["joules_per_token"] > 0
    assert summary["energy_source"].split(":")[0] in ("rapl", "nvml + estimate", "estimate")
    assert "predicted" in done.stdout and "measured" in done.stdout


def test_plan_sizes_replicas_and_power() -> None:
    args = ["--users", "1000", "--power-mw", "1", "--speed", "5", "--ttft-ms", "5000", "--phases", "0.5", "1"]
    done = subprocess.run([sys.executable, "-m", "fulmine", "plan", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["users_per_replica"] >= 1 and summary["replicas_for_users"] >= 1
    assert [p["power_mw"] for p in summary["phases"]] == [0.5, 1.0]
    assert summary["phases"][1]["users"] >= summary["phases"][0]["users"] > 0
