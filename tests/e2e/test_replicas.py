"""`fulmine serve --replicas 2` on a Ray cluster of two nodes (ray.cluster_utils.Cluster: a head and
a second node, one CPU each, on this machine), driven by the official openai client:

- concurrent streamed chats (greedy and seeded) keep streaming while the replica running some of them
  is killed (SIGKILL): every stream ends normally and its text equals what one replica answers alone;
- Ray restarts the replica (/health counts replicas up again);
- a multi-turn chat's next turn lands where its prefix is cached (cached tokens in usage);
- started without a cluster, the server makes a local one, and Serve adds a replica under load.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from fulmine.benchmark.servers import free_port

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
MODEL = "SmolLM2-135M-Instruct"
EXTRA = {"ignore_eos": True}  # every stream runs its full length: long enough to outlive a replica


@pytest.fixture(scope="module")
def replicas() -> Iterator[str]:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    port = free_port()
    command = [sys.executable, "-m", "fulmine", "serve", "--port", str(port), "--replicas", "2"]
    command += ["--ray-address", cluster.address, "--num-threads", "1", "--max-num-batched-tokens", "64"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_replicas(base_url, 2, server, timeout=240)
        yield base_url
    finally:
        _stop(server)
        cluster.shutdown()


def _stop(server: subprocess.Popen[str]) -> None:
    """SIGTERM (a drain, then the replicas taken down), a kill if that takes over a minute."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def test_replicas_scale_up_on_queue_depth_on_a_local_cluster() -> None:
    """No --ray-address: the server starts a Ray cluster of its own. --max-replicas 2 with a batch of
    2: six long streams make Serve's autoscaler add the second replica (/health counts it)."""
    port = free_port()
    command = [sys.executable, "-m", "fulmine", "serve", "--port", str(port), "--replicas", "1"]
    command += ["--max-replicas", "2", "--max-num-seqs", "2", "--num-threads", "1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base_url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120)
    try:
        _wait_for_replicas(base_url, 1, server, timeout=180)

        def stream() -> None:
            messages = [{"role": "user", "content": "Tell me everything about the sea."}]
            events = client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=3000, stream=True, extra_body=EXTRA
            )
            for _ in events:
                if total_seen:
                    events.close()  # scaled: stop here
                    return

        total_seen: list[int] = []
        threads = [threading.Thread(target=stream, daemon=True) for _ in range(6)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not total_seen:
            if _health(base_url).get("replicas", {}).get("total") == 2:
                total_seen.append(2)
            time.sleep(0.5)
        assert total_seen, _health(base_url)
        for thread in threads:
            thread.join(timeout=30)
    finally:
        _stop(server)


def _health(base_url: str) -> dict[str, Any]:
    try:
        return dict(httpx.get(f"{base_url}/health", timeout=5).json())
    except (httpx.HTTPError, ValueError):
        return {}


def _wait_for_replicas(base_url: str, up: int, server: subprocess.Popen[str] | None, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server is not None and server.poll() is not None:
            raise AssertionError(f"the server exited: {server.stderr.read() if server.stderr else ''}")
        health = _health(base_url)
        if health.get("status") == "ok" and health.get("replicas", {}).get("up") == up:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"replicas not up in {timeout} s: {_health(base_url)}")


def _replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ServeReplica:fulmine:engine"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _busiest(pids: list[int]) -> int:
    """The replica computing most over a moment: one that is running streams."""
    before = {pid: _cpu_ticks(pid) for pid in pids}
    time.sleep(0.3)
    return max(pids, key=lambda pid: _cpu_ticks(pid) - before[pid])


ASKS = [
    ("Write a long story about a lighthouse keeper.", {"temperature": 0.0}),
    ("Describe every planet of the solar system.", {"temperature": 0.8, "seed": 11}),
    ("Explain how bread is baked, step by step.", {"temperature": 0.9, "top_p": 0.9, "seed": 5}),
    ("List facts about octopuses.", {"temperature": 0.0}),
]


def test_streams_survive_a_killed_replica(replicas: str) -> None:
    client = openai.OpenAI(base_url=f"{replicas}/v1", api_key="none", max_retries=0)
    texts: dict[int, str] = {}
    errors: list[BaseException] = []
    chunks = [0] * len(ASKS)

    def stream(i: int) -> None:
        prompt, sampling = ASKS[i]
        try:
            pieces = []
            events = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=160, stream=True,
                extra_body=EXTRA, **sampling,
            )  # fmt: skip
            for chunk in events:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    chunks[i] += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    assert chunk.choices[0].finish_reason == "length"
            texts[i] = "".join(pieces)
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(ASKS))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while min(chunks) < 10 and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    pids = _replica_pids()
    assert len(pids) == 2, pids
    os.kill(_busiest(pids), signal.SIGKILL)  # mid-stream: the router spread the four streams two and two
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert all(len(text) > 200 for text in texts.values()), texts
    # what each request answers alone, on whichever replica: the same text
    for i, (prompt, sampling) in enumerate(ASKS):
        alone = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=160, extra_body=EXTRA, **sampling
        )
        assert alone.choices[0].message.content == texts[i], (i, sampling)
    recovered = _wait_for_replicas(replicas, 2, None, timeout=120) + (time.monotonic() - killed_at)
    print(f"replica back after {recovered:.1f} s")
    metrics = httpx.get(f"{replicas}/metrics").text
    resumed = next(line for line in metrics.splitlines() if line.startswith("fulmine_replica_resumed_streams_total"))
    assert float(resumed.split()[-1]) >= 1, resumed  # the killed replica's streams went on on the other


def test_next_turn_hits_its_replicas_prefix_cache(replicas: str) -> None:
    client = openai.OpenAI(base_url=f"{replicas}/v1", api_key="none", max_retries=0)
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are a concise assistant. " * 8}]
    cached = []
    for turn in ("Name a color.", "Name another.", "And a third?", "Which do you like best?"):
        messages.append({"role": "user", "content": turn})
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        messages.append({"role": "assistant", "content": answer.choices[0].message.content or ""})
        details = answer.usage.prompt_tokens_details if answer.usage else None
        cached.append(details.cached_tokens if details else 0)
    assert all(c and c >= 64 for c in cached[1:]), cached  # each later turn: the earlier turns from cache
    health = _health(replicas)
    assert health["replicas"] == {"up": 2, "total": 2}, health
    assert health["status"] == "ok"


def test_a_stream_its_replica_refuses_is_a_429_before_it_starts(replicas: str) -> None:
    """Latency targets behind replicas: the replica that gets the request admits it; a refusal
    reaches the client as the 429 one engine gives, not as an error inside a started stream."""
    client = openai.OpenAI(base_url=f"{replicas}/v1", api_key="none", max_retries=0)
    long_prompt = "Summarize this. " + "The tide rises and falls with the moon. " * 150
    with pytest.raises(openai.RateLimitError, match="slo_unattainable|predicted time"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_prompt}], max_tokens=4, stream=True,
            extra_body={"slo": {"ttft_ms": 1}},
        )  # fmt: skip
    ok = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body={"slo": {"ttft_ms": 60000}}
    )
    assert ok.choices[0].message.content is not None
