"""Replicas on Ray Serve (`fulmine serve --replicas N`) against one process, on this machine.

    python -m bench.replicas                          # every scenario, the embedded model
    python -m bench.replicas --scenarios overhead recovery --reps 3

- load: N concurrent chat streams on one process with 2 threads, 1 replica with 1 thread, and
  2 replicas with 1 thread each: aggregate tok/s, per-user TTFT / inter-token latency / tok/s;
- multi_turn: concurrent conversations (each its own long system prompt) on 2 replicas, routed by
  cached prefix vs round robin: TTFT of the follow-up turns and their cached tokens;
- overhead: one stream on a direct server vs through the front to 1 replica (both 1 thread): the
  per-token cost of the routing path (Ray's handle stream, a hop a step);
- proxy: a stream's per-item delivery latency through Serve's HTTP proxy vs a handle (a toy
  deployment streaming timestamps): the hop an ingress deployment would add to every token;
- recovery: 4 streams on 2 replicas, one replica SIGKILLed mid-stream: the longest gap the killed
  replica's streams saw (the time to go on elsewhere) and the time until Ray has it back.
Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx

from bench.serve_load import QUESTIONS, concurrent_load, server, stream_chat
from fulmine.benchmark.report import percentile

RULES = "Answer with care, in plain words, and stay on topic. " * 100  # ~1200 tokens: a cold prefill ~0.5 s


def _ray_stop() -> None:
    subprocess.run(["ray", "stop", "--force"], capture_output=True)


async def _multi_turn(base: str, model: str, conversations: int, turns: int, rep: int) -> dict[str, Any]:
    """Concurrent conversations, each with a system prompt of its own (new ones each rep)."""
    async with httpx.AsyncClient() as client:

        async def conversation(i: int) -> list[float]:
            messages = [{"role": "system", "content": f"You are assistant {rep}-{i}. {RULES}"}]
            ttfts = []
            for turn in range(turns):
                messages.append({"role": "user", "content": QUESTIONS[(i + turn) % len(QUESTIONS)]})
                result = await stream_chat(client, base, model, messages, 24)
                ttfts.append(result["ttft"])
                messages.append({"role": "assistant", "content": result["text"]})
            return ttfts

        results = await asyncio.gather(*(conversation(i) for i in range(conversations)))
    follow_ups = [ttft for ttfts in results for ttft in ttfts[1:]]
    firsts = [ttfts[0] for ttfts in results]
    return {"first_turn_ttft_p50": percentile(firsts, 0.5), "follow_up_ttft_p50": percentile(follow_ups, 0.5),
            "follow_up_ttft_p90": percentile(follow_ups, 0.9)}  # fmt: skip


def _cached_tokens(base: str) -> float:
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    line = next((x for x in metrics.splitlines() if x.startswith("fulmine_prefix_cache_hit_tokens_total")), "x 0")
    return float(line.split()[-1])


async def _one_stream(base: str, model: str, max_tokens: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
        return await stream_chat(client, base, model, messages, max_tokens, ignore_eos=True)


LONG = 400  # tokens a recovery stream runs


async def _stream_counted(
    client: httpx.AsyncClient, base: str, model: str, question: str, times: list[float]
) -> dict[str, Any]:
    """One long stream: content arrival times (into `times`, as they come), tokens by the usage it
    ends with, any error event."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    tokens, error = 0, None
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            error = chunk.get("error", error)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return {"times": times, "tokens": tokens, "error": error}


def _replica_pids() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "ServeReplica:fulmine:engine"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


async def _recovery(base: str, model: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        arrivals: list[list[float]] = [[] for _ in range(4)]
        tasks = [asyncio.create_task(_stream_counted(client, base, model, q, t)) for q, t in zip(QUESTIONS, arrivals)]
        while min(len(t) for t in arrivals) < 30:  # every stream is well under way
            await asyncio.sleep(0.01)
        before = _replica_pids()
        victim = min(before)
        killed = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        results = await asyncio.gather(*tasks)
    back = None  # a new replica process, and the controller counting two up again
    while time.perf_counter() - killed < 180:
        pids = _replica_pids()
        health = httpx.get(f"{base}/health", timeout=10).json()
        if len(pids) == 2 and victim not in pids and health.get("replicas", {}).get("up") == 2:
            back = time.perf_counter() - killed
            break
        await asyncio.sleep(0.1)
    gaps_after = [max((b - a for a, b in zip(r["times"], r["times"][1:]) if b > killed), default=0) for r in results]
    return {
        "all_completed": all(r["tokens"] == LONG and r["error"] is None for r in results),
        "longest_gap_after_kill_s": max(gaps_after),
        "median_gap_after_kill_s": statistics.median(gaps_after),
        "replica_back_s": back,
    }


class _Ticker:
    """A Serve deployment that streams `n` timestamps `interval` apart: over HTTP through Serve's
    proxy (__call__, server-sent events), or to a handle (ticks)."""

    async def ticks(self, n: int, interval: float) -> Any:
        for _ in range(n):
            await asyncio.sleep(interval)
            yield time.time()

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import StreamingResponse

        async def events() -> Any:
            async for stamp in self.ticks(int(request.query_params["n"]), float(request.query_params["interval"])):
                yield f"data: {stamp}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def _proxy_vs_handle(n: int = 200, interval: float = 0.005, reps: int = 3) -> dict[str, Any]:
    """Delivery latency of a streamed item (its stamp to its arrival here), through a handle's stream
    (what the front uses) and through Serve's HTTP proxy (what an ingress deployment would add)."""
    import ray
    from ray import serve

    from fulmine.benchmark.servers import free_port

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(serve.deployment(_Ticker).bind(), name="ticker", route_prefix="/tick").options(stream=True)

    async def by_handle() -> list[float]:
        return [time.time() - stamp async for stamp in handle.ticks.remote(n, interval)]

    def by_proxy() -> list[float]:
        late = []
        with httpx.stream("GET", f"http://127.0.0.1:{port}/tick", params={"n": n, "interval": interval}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    late.append(time.time() - float(line[6:]))
        return late

    try:
        out = {}
        for name, run in (("handle", lambda: asyncio.run(by_handle())), ("serve proxy", by_proxy)):
            run()  # warm
            late = [x for _ in range(reps) for x in run()]
            out[name] = {
                "p50_ms": percentile(late, 0.5) * 1e3,
                "p90_ms": percentile(late, 0.9) * 1e3,
                "p99_ms": percentile(late, 0.99) * 1e3,
            }
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--scenarios", nargs="+", default=["load", "multi_turn", "overhead", "proxy", "recovery"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.model is None:
        from fulmine.models.source import default_model_path

        args.model = str(default_model_path())
    report: dict[str, Any] = {"model": args.model}
    setups = {
        "one process, 2 threads": (2, []),
        "1 replica, 1 thread": (1, ["--replicas", "1"]),
        "2 replicas, 1 thread each": (1, ["--replicas", "2"]),
    }
    if "load" in args.scenarios:
        report["load"] = {}
        for name, (threads, extra) in setups.items():
            with server("fulmine", args.model, threads, extra) as (base, model):
                runs = [asyncio.run(concurrent_load(base, model, args.concurrency, args.requests, args.max_tokens))
                        for _ in range(args.reps)]  # fmt: skip
            _ray_stop()
            report["load"][name] = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "failed"}
            report["load"][name]["failed"] = sum(r["failed"] for r in runs)
            print(f"done: load, {name}", file=sys.stderr)
    if "multi_turn" in args.scenarios:
        report["multi_turn"] = {}
        for routing in ("prefix", "round_robin"):
            with server("fulmine", args.model, 1, ["--replicas", "2", "--routing", routing]) as (base, model):
                runs = [
                    asyncio.run(_multi_turn(base, model, args.conversations, args.turns, r)) for r in range(args.reps)
                ]
                cached = _cached_tokens(base)
            _ray_stop()
            report["multi_turn"][routing] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            report["multi_turn"][routing]["cached_tokens"] = cached
            print(f"done: multi_turn, {routing}", file=sys.stderr)
    if "overhead" in args.scenarios:
        report["overhead"] = {}
        for name, extra in (("direct", []), ("front + 1 replica", ["--replicas", "1"])):
            with server("fulmine", args.model, 1, extra) as (base, model):
                asyncio.run(_one_stream(base, model, 8))
                runs = [asyncio.run(_one_stream(base, model, 128)) for _ in range(args.reps)]
            _ray_stop()
            report["overhead"][name] = {
                "ttft_ms": statistics.median(r["ttft"] for r in runs) * 1e3,
                "itl_ms": statistics.median(statistics.median(r["itl"]) for r in runs) * 1e3,
                "chunks": statistics.median(r["tokens"] for r in runs),
            }
            print(f"done: overhead, {name}", file=sys.stderr)
    if "proxy" in args.scenarios:
        report["proxy"] = _proxy_vs_handle(reps=args.reps)
        _ray_stop()
    if "recovery" in args.scenarios:
        with server("fulmine", args.model, 1, ["--replicas", "2"]) as (base, model):
            report["recovery"] = asyncio.run(_recovery(base, model))
        _ray_stop()
    for scenario in ("load", "multi_turn", "overhead", "proxy"):
        for name, row in report.get(scenario, {}).items():
            cells = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            print(f"{scenario:10s} {name:28s} {cells}")
    if "recovery" in report:
        print("recovery  ", report["recovery"])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
