"""Soak: one fulmine server on loopback under thousands of mixed valid and invalid requests, hundreds
of mid-stream disconnects, then an overload burst. Bounded in count and time; loopback only.

    python -m bench.soak                                   # the embedded model
    python -m bench.soak --requests 3000 --disconnects 300 --burst 300
    python -m bench.soak --model path/to/model.gguf

Reports, with the goal of each:
- 5xx answers, and server_error events inside streams (goal 0);
- KV blocks still held once the server is idle (goal 0: nothing leaked by errors or disconnects);
- the server's RSS growth over the last third of the mixed phase (goal < 5 %);
- the overload burst's statuses (goal: only 200 and 429, each 429 with Retry-After).
Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from fulmine.benchmark.servers import Server, start_fulmine

MODEL = "soak"
QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for better sleep.",
    "Write a haiku about rain.",
    "What is 17 times 23?",
    "Name five fruits.",
    "How do airplanes fly?",
]


def _chat(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **fields}


# Each is sent raw (json.dumps with NaN allowed, lone surrogates escaped) or as the bytes given.
INVALID: list[dict[str, Any] | bytes] = [
    _chat("hi", seed=2**64),
    _chat("hi", temperature=float("nan")),
    _chat("hi", top_p=float("inf")),
    _chat("lone \ud800 surrogate"),
    _chat("hi", logit_bias={"²": 1}),
    _chat("hi", logit_bias={"99999999": 1}),
    _chat("hi", max_tokens=10**6),
    _chat("hi", top_k=2**64),
    _chat("hi", n=0),
    _chat("hi", stop=["a", "b", "c", "d", "e"]),
    _chat("hi", frobnicate=True),
    _chat("hi", tools=[{"type": "function", "function": {"name": "f"}}]),
    {**_chat("hi"), "model": "no-such-model"},
    {"model": MODEL, "messages": []},
    {"model": MODEL, "prompt": [2**64], "max_tokens": 4},
    _chat("hi", guided_grammar="start: r0\n" + "\n".join(f'r{i}: "x" r{i + 1}' for i in range(5000))),
    _chat("hi", guided_choice=[f"c{i}" for i in range(2000)]),
    _chat("hi", guided_json={"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}),
    _chat("hi", guided_regex=r"[^\s\S]"),
    _chat("hi", tools=[{"type": "function", "function": {"name": 'x"</tool_call>', "parameters": {}}}]),
    _chat("hi", slo={"ttft_ms": True}),
    b"{not json",
    b"[" * 50_000 + b"]" * 50_000,
    _chat("word " * 20_000),  # longer than the context window
]


REWRITE = "Rewrite this code with better names: def f(a,b): return [x for x in a if x in b]"


def _valid(rng: random.Random) -> tuple[str, dict[str, Any]]:
    question = f"{rng.choice(QUESTIONS)} (#{rng.randrange(10**6)})"
    kind = rng.randrange(6)
    if kind == 4:  # the same greedy chat again and again: prefix hits, answers ending inside accepted drafts
        return "/v1/chat/completions", _chat(REWRITE, temperature=0, max_tokens=32)
    if kind == 5:  # overlapping conversations: a follow-up turn on a shared first turn, streamed
        turns = [{"role": "user", "content": REWRITE}, {"role": "assistant", "content": "def common(a, b):"}]
        turns.append({"role": "user", "content": f"Now explain it (#{rng.randrange(10**6)})"})
        return "/v1/chat/completions", {**_chat(""), "messages": turns, "temperature": 0, "stream": True}
    if kind == 0:
        return "/v1/chat/completions", _chat(question, temperature=0)
    if kind == 1:
        usage = {"include_usage": True}
        return "/v1/chat/completions", _chat(question, temperature=0.7, top_p=0.9, stream=True, stream_options=usage)
    if kind == 2:
        return "/v1/chat/completions", _chat(question, n=2, seed=rng.randrange(-(2**63), 2**63))
    return "/v1/completions", {"model": MODEL, "prompt": question, "max_tokens": 8, "logprobs": 2}


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    stream_errors: int = 0  # server_error events inside 200 streams
    disconnects: int = 0
    missing_retry_after: int = 0
    failures: list[str] = field(default_factory=list)  # 5xx and stream errors, for the log

    def record(self, status: int, text: str = "", headers: httpx.Headers | None = None) -> None:
        self.statuses[status] += 1
        if status >= 500:
            self.failures.append(f"{status}: {text[:300]}")
        if status == 429 and (headers is None or "retry-after" not in headers):
            self.missing_retry_after += 1


async def _send(http: httpx.AsyncClient, path: str, body: dict[str, Any] | bytes, tally: Tally) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    headers = {"content-type": "application/json"}
    if isinstance(body, dict) and body.get("stream"):
        async with http.stream("POST", path, content=content, headers=headers) as response:
            text = (await response.aread()).decode("utf-8", "replace")
            tally.record(response.status_code, text, response.headers)
            if response.status_code == 200 and '"server_error"' in text:
                tally.stream_errors += 1
                tally.failures.append(f"stream error: {text[-300:]}")
        return
    response = await http.post(path, content=content, headers=headers)
    tally.record(response.status_code, response.text, response.headers)


async def _disconnect(http: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    """A stream abandoned after its first content chunk: the server must abort it and free its blocks."""
    body = _chat(f"Tell me a long story (#{rng.randrange(10**6)})", max_tokens=64, ignore_eos=True, stream=True)
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if '"content"' in line and '"content":""' not in line.replace(" ", ""):
                break
    tally.disconnects += 1


def _rss_mb(server: Server) -> float:
    status = open(f"/proc/{server.process.pid}/status").read()  # noqa: SIM115 (a /proc read)
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


async def _mixed(server: Server, args: argparse.Namespace) -> tuple[Tally, list[tuple[int, float]], float]:
    rng = random.Random(args.seed)
    jobs: list[tuple[str, Any]] = [("valid", None)] * (args.requests // 2)
    jobs += [("invalid", None)] * (args.requests - args.requests // 2)
    jobs += [("disconnect", None)] * args.disconnects
    rng.shuffle(jobs)
    tally, rss, done = Tally(), [], 0
    queue: asyncio.Queue[str] = asyncio.Queue()
    for kind, _ in jobs:
        queue.put_nowait(kind)
    base = server.base_url.removesuffix("/v1")

    async def worker() -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=base, timeout=args.timeout_s) as http:
            while not queue.empty():
                kind = queue.get_nowait()
                if kind == "valid":
                    await _send(http, *_valid(rng), tally)
                elif kind == "invalid":
                    body = rng.choice(INVALID)
                    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
                    await _send(http, path, body, tally)
                else:
                    await _disconnect(http, rng, tally)
                done += 1

    async def sample_rss() -> None:
        while True:
            rss.append((done, _rss_mb(server)))
            await asyncio.sleep(0.5)

    started = time.perf_counter()
    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    sampler.cancel()
    rss.append((done, _rss_mb(server)))
    return tally, rss, time.perf_counter() - started


async def _burst(server: Server, args: argparse.Namespace) -> tuple[Tally, float]:
    """Everyone at once: more requests than running slots plus the queue. Only 200 or 429 may answer."""
    tally = Tally()
    base = server.base_url.removesuffix("/v1")
    limits = httpx.Limits(max_connections=args.burst)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout_s, limits=limits) as http:
        bodies = [_chat(f"Burst {i}: {QUESTIONS[i % len(QUESTIONS)]}", stream=True) for i in range(args.burst)]
        await asyncio.gather(*(_send(http, "/v1/chat/completions", body, tally) for body in bodies))
    return tally, time.perf_counter() - started


def _idle_kv_blocks(server: Server, timeout: float = 30.0) -> float:
    """KV blocks still held once nothing runs or waits (read from /metrics)."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(server.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
        values = {
            name: float(value) for name, value in re.findall(r"^(fulmine_\w+) ([-+.\deE]+)$", text, flags=re.MULTILINE)
        }
        idle = values["fulmine_num_requests_running"] == 0 and values["fulmine_num_requests_waiting"] == 0
        if (idle and values["fulmine_kv_cache_used_blocks"] == 0) or time.monotonic() > deadline:
            return values["fulmine_kv_cache_used_blocks"]
        time.sleep(0.2)


def _metric(server: Server, name: str) -> float:
    text = httpx.get(server.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    match = re.search(rf"^{name} ([-+.\deE]+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=2000, help="valid and invalid requests (half each)")
    parser.add_argument("--disconnects", type=int, default=200, help="streams abandoned after their first token")
    parser.add_argument("--burst", type=int, default=200, help="requests fired at once at the end")
    parser.add_argument("--concurrency", type=int, default=16, help="clients in the mixed phase")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=0.25,
        help="the server's KV cache: the prefix cache fills all of it in time (pages become resident as "
        "blocks are first used), so a small one is resident early and RSS growth after that means a leak",
    )
    args = parser.parse_args(argv)
    # 8 running + 24 queued: the mixed phase's clients all fit, the burst does not
    flags = ["--served-model-name", MODEL, "--max-num-seqs", "8", "--max-queue", "24", "--max-model-len", "2048"]
    flags += ["--kv-cache-memory-gb", str(args.kv_cache_memory_gb)]
    server = start_fulmine(args.model, args.threads, flags)
    try:
        rss_loaded = _rss_mb(server)
        mixed, rss, mixed_s = asyncio.run(_mixed(server, args))
        burst, burst_s = asyncio.run(_burst(server, args))
        leaked = _idle_kv_blocks(server)
        deaths = _metric(server, "fulmine_engine_deaths_total")
        alive = server.process.poll() is None and httpx.get(server.base_url.removesuffix("/v1") + "/health").is_success
    finally:
        server.stop()

    third = [mb for n, mb in rss if n >= 2 * rss[-1][0] / 3]
    growth = (rss[-1][1] - third[0]) / third[0] if third else float("nan")
    num_5xx = sum(n for status, n in (mixed.statuses + burst.statuses).items() if status >= 500)
    burst_ok = set(burst.statuses) <= {200, 429} and burst.missing_retry_after == 0
    print(f"{'phase':<8}{'requests':>10}{'seconds':>9}  statuses")
    for name, tally, seconds in (("mixed", mixed, mixed_s), ("burst", burst, burst_s)):
        total = sum(tally.statuses.values()) + tally.disconnects
        print(f"{name:<8}{total:>10}{seconds:>9.1f}  {dict(sorted(tally.statuses.items()))}", end="")
        print(f" + {tally.disconnects} disconnected" if tally.disconnects else "")
    print(f"5xx answers + stream errors: {num_5xx} + {mixed.stream_errors + burst.stream_errors} (goal 0)")
    print(f"KV blocks held when idle: {leaked:g} (goal 0)")
    print(f"engine deaths: {deaths:g} (goal 0)")
    print(
        f"RSS: {rss_loaded:.0f} MB loaded, {rss[0][1]:.0f} MB at start, {third[0] if third else 0:.0f} MB at "
        f"two thirds, {rss[-1][1]:.0f} MB at the end: {100 * growth:+.1f} % over the last third (goal < 5 %)"
    )
    print(f"burst: {dict(sorted(burst.statuses.items()))}, 429 without Retry-After: {burst.missing_retry_after}")
    print(f"server alive and healthy after: {alive}")
    for failure in (mixed.failures + burst.failures)[:10]:
        print("  failure:", failure, file=sys.stderr)
    report = {
        "requests": args.requests,
        "disconnects": mixed.disconnects,
        "burst": args.burst,
        "mixed_statuses": dict(mixed.statuses),
        "burst_statuses": dict(burst.statuses),
        "num_5xx": num_5xx,
        "stream_errors": mixed.stream_errors + burst.stream_errors,
        "leaked_kv_blocks": leaked,
        "engine_deaths": deaths,
        "rss_mb": {
            "loaded": rss_loaded,
            "start": rss[0][1],
            "two_thirds": third[0] if third else None,
            "end": rss[-1][1],
        },
        "rss_growth_last_third": growth,
        "burst_only_200_429": burst_ok,
        "alive": alive,
        "seconds": {"mixed": mixed_s, "burst": burst_s},
    }
    print(json.dumps(report))
    passed = num_5xx == 0 and not report["stream_errors"] and leaked == 0 and growth < 0.05 and burst_ok and alive
    passed = passed and deaths == 0
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
