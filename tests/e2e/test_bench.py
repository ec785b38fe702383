"""`fulmine bench` as users run it: a real process against a real server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fulmine.benchmark.client import RequestResult
from fulmine.benchmark.report import percentiles, ratios, summarize
from tests.e2e.server import engine_loader, serve


def test_bench_measures_an_endpoint(tiny_llama, tmp_path) -> None:
    with serve(engine_loader(str(tiny_llama)), served_model_name=("tiny",)) as server:  # 256 positions: chat only
        command = [
            sys.executable, "-m", "fulmine", "bench", "--base-url", f"{server.base_url}/v1",
            "--workload", "chat", "--concurrency", "1", "2", "--requests", "3", "--plot", str(tmp_path),
            "--sampling", "greedy", "chain",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("endpoint") and "TTFT" in line for line in lines)  # the table
    report = json.loads(lines[-1])  # the JSON line comes last
    levels = report["levels"]
    expected = [("chat", 1), ("chat", 2), ("chat:chain", 1), ("chat:chain", 2)]  # greedy, then llama.cpp's chain
    assert [(lv["workload"], lv["concurrency"]) for lv in levels] == expected
    for level in levels:
        assert level["errors"] == 0 and level["requests"] == 3
        assert 0 < level["ttft_s"]["p50"] <= level["ttft_s"]["p99"] and level["tok_s_per_user"] > 0
        assert 0 <= level["slo_attainment"] <= 1
        assert level["extra"]["GB/s"] > 0 and level["extra"]["roofline"] > 0  # fulmine's weight bytes, local roofline
    assert report["memory_bandwidth_gb_s"] > 0
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0 and (tmp_path / "tok_s_per_user.png").exists()


def test_bench_reports_a_dead_endpoint_clearly() -> None:
    command = [sys.executable, "-m", "fulmine", "bench", "--base-url", "http://127.0.0.1:9/v1", "--model-name", "x"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "requests failed" in result.stdout and "ConnectError" in result.stdout


def test_statistics() -> None:
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert percentiles([float(i) for i in range(1, 101)]) == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    fast = RequestResult(ok=True, ttft=0.1, e2e=1.1, itls=[0.01] * 100, completion_tokens=101)
    slow = RequestResult(ok=True, ttft=2.0, e2e=3.0, itls=[0.01] * 100, completion_tokens=101)
    failed = RequestResult(ok=False, error="HTTP 500")
    ours = summarize("fulmine", "chat", 1, [fast, slow, failed], 4.0, slo_ttft=1.0, slo_itl=0.05)
    assert ours.errors == 1 and ours.slo_attainment == pytest.approx(1 / 3) and ours.goodput_rps == 0.25
    assert ours.tok_s_per_user == pytest.approx(100.0) and fast.tpot == pytest.approx(0.01)
    peer = summarize("llama.cpp", "chat", 1, [slow], 3.0, 1.0, 0.05)
    entry = ratios([ours, peer], "fulmine", "llama.cpp")["chat@1"]
    assert entry["tok_s_per_user"] == pytest.approx(1.0) and entry["ttft_p50"] < 1
