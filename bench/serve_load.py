"""Load benchmark for OpenAI-compatible servers: fulmine vs llama.cpp's server on the same GGUF.

    python -m bench.serve_load                       # both servers, the embedded model
    python -m bench.serve_load --concurrency 1 4 8 --requests 16
    python -m bench.serve_load --servers fulmine llama-server --scenarios long_prompt --num-long 4

Starts each server on a free loopback port, one at a time (they would fight over 2 cores), and
measures with streaming clients:
- N concurrent chat streams: TTFT and inter-token latency p50/p99, end-to-end, throughput;
- multi-turn chat: TTFT of each follow-up turn (the previous conversation is a prefix), for
  fulmine with and without prefix caching, and llama.cpp (which keeps its slot's prompt cache);
- a running stream's inter-token latency while ~2k-token prompts arrive together (chunked prefill,
  sized by --max-itl-ms): its gaps while they prefill.
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
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from fulmine.benchmark.report import percentile
from fulmine.benchmark.servers import free_port

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for better sleep.",
    "Explain what a CPU cache is.",
    "Write a haiku about rain.",
    "What is 17 times 23?",
    "Name five fruits.",
    "How do airplanes fly?",
    "What is photosynthesis?",
    "Tell me a fun fact about octopuses.",
    "How do I boil an egg?",
]
FOLLOW_UPS = ["Tell me more.", "Can you give an example?", "Summarize that in one sentence.", "Why is that?"]
LONG_TEXT = "The history of computing is a story of ever smaller, faster and cheaper machines. " * 200


@contextmanager
def server(kind: str, model: str, threads: int, extra: list[str]) -> Iterator[tuple[str, str]]:
    port = free_port()
    if kind == "fulmine":
        command = [
            sys.executable,
            "-m",
            "fulmine",
            "serve",
            "--model",
            model,
            "--port",
            str(port),
            "--num-threads",
            str(threads),
            "--served-model-name",
            "m",
            *extra,
        ]
    elif kind == "llama-server":  # native llama.cpp's server, 4 slots (continuous batching)
        from bench.engines import native_binary

        command = [
            native_binary("llama-server"),
            "-m",
            model,
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--threads-batch",
            str(threads),
            "-c",
            "32768",
            "--parallel",
            "8",
            "-a",
            "m",
            *extra,
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            model,
            "--port",
            str(port),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--n_ctx",
            "4096",
            "--model_alias",
            "m",
            *extra,
        ]
    log = tempfile.NamedTemporaryFile("w+", prefix=f"{kind}-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                ready = httpx.get(f"{base}/v1/models", timeout=2).status_code == 200
                if ready:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start")
            time.sleep(0.2)
        yield base, "m"
    except Exception:
        log.seek(0)
        print(f"--- {kind} server log (tail) ---\n{log.read()[-3000:]}", file=sys.stderr)
        raise
    finally:
        if process.poll() is None:  # (one that never started has exited already)
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


async def stream_chat(
    client: httpx.AsyncClient,
    base: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    **extra: Any,
) -> dict[str, Any]:
    """One streamed chat: TTFT, the gaps between content chunks, the text."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body.update(extra)
    started = time.perf_counter()
    times: list[float] = []
    parts: list[str] = []
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
                parts.append(chunk["choices"][0]["delta"]["content"])
    end = time.perf_counter()
    return {
        "ttft": times[0] - started if times else end - started,
        "itl": [b - a for a, b in zip(times, times[1:])],
        "e2e": end - started,
        "tokens": len(times),
        "text": "".join(parts),
        "times": times,
        "started": started,
    }


async def concurrent_load(base: str, model: str, concurrency: int, num_requests: int, max_tokens: int) -> dict:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient() as client:

        async def one(i: int) -> dict[str, Any] | None:
            async with semaphore:
                messages = [{"role": "user", "content": f"({i}) {QUESTIONS[i % len(QUESTIONS)]}"}]
                try:
                    return await stream_chat(client, base, model, messages, max_tokens)
                except httpx.HTTPError as error:  # counted, not fatal: a peer may drop streams under load
                    print(f"request {i} failed: {error!r}", file=sys.stderr)
                    return None

        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one(i) for i in range(num_requests)))
        wall = time.perf_counter() - started
    results = [r for r in outcomes if r is not None]
    if not results:
        return {"concurrency": concurrency, "failed": num_requests}
    ttft = [r["ttft"] for r in results]
    itl = [gap for r in results for gap in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "failed": num_requests - len(results),
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p99": percentile(ttft, 0.99),
        "itl_p50": percentile(itl, 0.5),
        "itl_p99": percentile(itl, 0.99),
        "e2e_p50": percentile([r["e2e"] for r in results], 0.5),
        "throughput_tok_s": tokens / wall,
        "per_user_tok_s": statistics.median(
            (r["tokens"] - 1) / (r["e2e"] - r["ttft"]) for r in results if r["tokens"] > 1
        ),
    }


async def multi_turn(base: str, model: str, turns: int, max_tokens: int) -> list[float]:
    """TTFT of each turn of one conversation (turn 0 is cold)."""
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 20}]
    ttfts = []
    async with httpx.AsyncClient() as client:
        for turn in range(turns):
            question = QUESTIONS[turn % len(QUESTIONS)] if turn == 0 else FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]
            messages.append({"role": "user", "content": question})
            result = await stream_chat(client, base, model, messages, max_tokens)
            ttfts.append(result["ttft"])
            messages.append({"role": "assistant", "content": result["text"]})
    return ttfts


async def itl_under_long_prompt(base: str, model: str, num_long: int = 4) -> dict[str, Any]:
    """Inter-token latency of a running stream while `num_long` ~2k-token prompts (distinct, so no
    prefix cache helps) arrive together and are prefilled beside it: the gaps while they prefill."""
    async with httpx.AsyncClient() as client:
        running = asyncio.create_task(
            stream_chat(  # ignore_eos: an extension fulmine honours; llama.cpp's server ignores it
                client,
                base,
                model,
                [{"role": "user", "content": "Write a long story about a dragon."}],
                600,
                ignore_eos=True,
            )
        )
        await asyncio.sleep(1.0)
        arrived = time.perf_counter()
        prompts = [f"Document {k}. {LONG_TEXT[: 9000 - 20]}\nSummarize it." for k in range(num_long)]
        longs = await asyncio.gather(
            *(stream_chat(client, base, model, [{"role": "user", "content": text}], 4) for text in prompts)
        )
        prefilled = max(r["started"] + r["ttft"] for r in longs)
        try:
            result = await running
        except httpx.HTTPError as error:  # llama-cpp-python's server drops a stream when another arrives
            print(f"the running stream was dropped: {error!r}", file=sys.stderr)
            return {
                "running_itl_p50": float("nan"),
                "running_itl_p90": float("nan"),
                "running_itl_max": float("nan"),
                "running_tokens": 0,
                "long_prompt_ttft": max(r["ttft"] for r in longs),
                "running_dropped": True,
            }
    times = result["times"]
    window = [b - a for a, b in zip(times, times[1:]) if b > arrived and a < prefilled]
    return {
        "num_long": num_long,
        "running_itl_p50": percentile(window, 0.5),
        "running_itl_p90": percentile(window, 0.9),
        "running_itl_max": max(window or [0.0]),
        "running_tokens_during_prefill": len(window),
        "running_tokens": result["tokens"],
        "long_prompt_ttft": max(r["ttft"] for r in longs),
        "running_dropped": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["fulmine", "llama.cpp"],
        help="fulmine, llama.cpp (llama-cpp-python's server: one request at a time), llama-server (native, "
        "bench/build_llama_cpp.sh; 8 slots)",
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["load", "multi_turn", "long_prompt"],
        choices=["load", "multi_turn", "long_prompt"],
    )
    parser.add_argument("--num-long", type=int, default=4, help="long prompts arriving together beside a stream")
    parser.add_argument("--fulmine-args", default="", help="extra `fulmine serve` flags, e.g. '--max-itl-ms 0'")
    args = parser.parse_args()
    if args.model is None:
        from fulmine.models.source import default_model_path

        args.model = str(default_model_path())
    report: dict[str, Any] = {"model": args.model, "load": {}, "multi_turn": {}, "long_prompt": {}}
    report["fulmine_args"] = args.fulmine_args
    extra_flags = args.fulmine_args.split()
    variants = [("fulmine", extra_flags)]
    if "multi_turn" in args.scenarios:
        variants.append(("fulmine (no prefix cache)", [*extra_flags, "--no-enable-prefix-caching"]))
    for peer in ("llama.cpp", "llama-server"):
        if peer in args.servers:
            variants.append((peer, []))
    for name, extra in variants:
        kind = name if name in ("llama.cpp", "llama-server") else "fulmine"
        if kind not in args.servers:
            continue
        with server(kind, args.model, args.threads, extra) as (base, model):
            asyncio.run(stream_chat_warmup(base, model))
            if "multi_turn" in args.scenarios:
                report["multi_turn"][name] = asyncio.run(multi_turn(base, model, args.turns, 32))
            if "no prefix" in name:
                continue
            if "load" in args.scenarios:
                report["load"][name] = [
                    asyncio.run(concurrent_load(base, model, c, args.requests, args.max_tokens))
                    for c in args.concurrency
                ]
            if "long_prompt" in args.scenarios:
                report["long_prompt"][name] = asyncio.run(itl_under_long_prompt(base, model, args.num_long))
        print(f"done: {name}", file=sys.stderr)
    print_report(report)
    print(json.dumps(report))


async def stream_chat_warmup(base: str, model: str) -> None:
    async with httpx.AsyncClient() as client:
        await stream_chat(client, base, model, [{"role": "user", "content": "Hi"}], 4)


def print_report(report: dict[str, Any]) -> None:
    print(f"\nmodel {report['model']}\n")
    print(
        f"{'server':28}{'conc':>5}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
        f"{'tok/s':>8}{'tok/s/user':>11}"
    )
    for name, rows in report["load"].items():
        for r in rows:
            if "ttft_p50" not in r:
                print(f"{name:28}{r['concurrency']:>5}  all {r['failed']} requests failed")
                continue
            print(
                f"{name:28}{r['concurrency']:>5}{r['ttft_p50']:>10.3f}{r['ttft_p99']:>10.3f}{r['itl_p50']:>9.3f}"
                f"{r['itl_p99']:>9.3f}{r['throughput_tok_s']:>8.1f}{r['per_user_tok_s']:>11.1f}"
                + (f"  ({r['failed']} of the requests failed)" if r["failed"] else "")
            )
    print("\nmulti-turn TTFT (s), turn 0 cold:")
    for name, ttfts in report["multi_turn"].items():
        print(f"  {name:28}" + " ".join(f"{t:7.3f}" for t in ttfts))
    print("\na running stream while ~2k-token prompts arrive together (its gaps while they prefill):")
    for name, r in report["long_prompt"].items():
        print(
            f"  {name:28} {r.get('num_long', 1)} prompts: ITL p50 {r['running_itl_p50']:.3f} s, "
            f"p90 {r['running_itl_p90']:.3f} s, max {r['running_itl_max']:.3f} s over "
            f"{r.get('running_tokens_during_prefill', 0)} tokens{' (stream dropped)' if r['running_dropped'] else ''}; "
            f"slowest long prompt TTFT {r['long_prompt_ttft']:.2f} s"
        )


if __name__ == "__main__":
    main()
