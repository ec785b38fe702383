"""`fulmine bench`: drive OpenAI-compatible endpoints with the workloads at each concurrency.

Without --base-url it starts a fulmine server itself (the embedded model unless --model);
--side-by-side also starts llama.cpp's server on the same GGUF, runs the same requests against
both (levels alternate between them, so machine noise falls on both) and reports the ratios.
Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import httpx

from fulmine.benchmark.client import RequestResult, stream_chat
from fulmine.benchmark.report import Summary, as_json, plot, ratios, summarize, table
from fulmine.benchmark.servers import Server, start_fulmine, start_llama_cpp
from fulmine.benchmark.workloads import SAMPLING, WORKLOADS, Workload, workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None, help="an endpoint to measure, e.g. http://host:8000/v1")
    parser.add_argument("--api-key", default=None, help="bearer token for --base-url")
    parser.add_argument("--model", default=None, help="model for the servers bench starts (default: embedded)")
    parser.add_argument("--model-name", default=None, help="model name to request (default: the endpoint's first)")
    parser.add_argument("--side-by-side", action="store_true", help="also start llama.cpp's server on the same GGUF")
    parser.add_argument("--fulmine-args", default="", help="extra `fulmine serve` flags for the server bench starts")
    parser.add_argument("--workload", nargs="+", default=["chat"], choices=WORKLOADS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--requests", type=int, default=8, help="requests per level (at least the concurrency)")
    parser.add_argument(
        "--sampling",
        nargs="+",
        default=["greedy", "t0.7-p0.9"],
        choices=list(SAMPLING),
        help="sampling settings, each a level of its own: "
        + "; ".join(f"{name} = {fields}" for name, fields in SAMPLING.items()),
    )
    parser.add_argument(
        "--allow-cache",
        action="store_true",
        help="send prompts as they are; by default each request starts with a unique tag, so no server "
        "answers from a prefix cache filled by an earlier level",
    )
    parser.add_argument("--long-prompt-tokens", type=int, default=1000)
    parser.add_argument("--slo-ttft", type=float, default=1.0, help="seconds, for goodput")
    parser.add_argument("--slo-itl", type=float, default=0.1, help="seconds, mean per request, for goodput")
    parser.add_argument(
        "--send-slo",
        action="store_true",
        help="send --slo-ttft and --slo-itl with each request (fulmine's `slo` field: a request that cannot meet "
        "them is refused at once with 429); without it the server serves every request first come, first served",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads of the servers bench starts")
    parser.add_argument("--plot", default=None, metavar="DIR", help="write latency_cdf.png and tok_s_per_user.png")


async def run_level(
    base_url: str,
    model: str,
    load: Workload,
    concurrency: int,
    num_requests: int,
    args: argparse.Namespace,
    sampling: dict[str, float],
) -> tuple[list[RequestResult], float]:
    limit = asyncio.Semaphore(concurrency)
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        nonce = uuid.uuid4().hex[:8]

        async def one(i: int) -> RequestResult:
            async with limit:
                messages = load.prompts[i % len(load.prompts)]
                if not args.allow_cache:
                    first = {**messages[0], "content": f"[{nonce}-{i}] {messages[0]['content']}"}
                    messages = [first, *messages[1:]]
                slo = {"ttft_ms": args.slo_ttft * 1e3, "itl_ms": args.slo_itl * 1e3} if args.send_slo else None
                return await stream_chat(
                    client, base_url, model, messages, load.max_tokens, sampling, args.api_key, slo
                )

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(num_requests)))
        return list(results), time.perf_counter() - started


def model_name(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{base_url}/models", headers=headers, timeout=10)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def fulmine_metrics(base_url: str) -> dict[str, float]:
    """fulmine's own gauges from /metrics (empty for other servers)."""
    root = base_url.removesuffix("/").removesuffix("/v1")
    try:
        text = httpx.get(f"{root}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    values = {}
    for line in text.splitlines():
        if line.startswith("fulmine_energy_joules{"):  # labelled by its source: keep the label
            labels, value = line.rsplit(" ", 1)
            values["fulmine_energy_joules"] = float(value)
            values["energy_source"] = labels.split('source="', 1)[1].rsplit('"', 1)[0]  # type: ignore[assignment]
        elif line.startswith("fulmine_") and " " in line and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def memory_bandwidth_gb_s() -> float:
    """This machine's read bandwidth: summing a 512 MB buffer (torch, all threads), best of 5."""
    import torch

    data = torch.ones(128 * 2**20)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best / 1e9


def main(args: argparse.Namespace) -> int:
    servers: list[Server] = []
    try:
        if args.base_url:
            endpoints = [("endpoint", args.base_url.rstrip("/"))]
            host = urlparse(args.base_url).hostname
            local = host in ("127.0.0.1", "localhost", "::1")
        else:
            model = args.model
            if model is None:
                from fulmine.models.source import default_model_path

                model = str(default_model_path())
            servers.append(start_fulmine(model, args.threads, shlex.split(args.fulmine_args)))
            if args.side_by_side:
                servers.append(start_llama_cpp(model, args.threads))
            endpoints = [(s.name, s.base_url) for s in servers]
            local = True
        names = {url: args.model_name or model_name(url, args.api_key) for _, url in endpoints}
        bandwidth = memory_bandwidth_gb_s() if local else None
        summaries: list[Summary] = []
        results: dict[tuple[str, str, int], list[RequestResult]] = {}
        for load_name in args.workload:
            load = workload(load_name, args.long_prompt_tokens)
            for _, url in endpoints:  # warm up each server on this workload once
                asyncio.run(run_level(url, names[url], load, 1, 1, args, SAMPLING["greedy"]))
            for sampling_name in args.sampling:
                sampling = SAMPLING[sampling_name]
                label = load_name if sampling_name == "greedy" else f"{load_name}:{sampling_name}"
                for concurrency in args.concurrency:
                    for endpoint, url in endpoints:
                        before = fulmine_metrics(url)
                        level, duration = asyncio.run(
                            run_level(
                                url, names[url], load, concurrency, max(args.requests, concurrency), args, sampling
                            )
                        )
                        summary = summarize(endpoint, label, concurrency, level, duration, args.slo_ttft, args.slo_itl)
                        _add_engine_figures(summary, before, fulmine_metrics(url), bandwidth)
                        summaries.append(summary)
                        results[(endpoint, label, concurrency)] = level
                        print(f"  {endpoint} {label} c{concurrency}: done in {duration:.1f} s", flush=True)
        print()
        print(table(summaries))
        errors = [r.error for rs in results.values() for r in rs if not r.ok]
        if errors:
            print(f"\n{len(errors)} requests failed, e.g.: {errors[0]}")
        report: dict[str, Any] = {"memory_bandwidth_gb_s": bandwidth, "levels": as_json(summaries)}
        peaks = {server.name: server.peak_rss_mb() for server in servers}  # the servers bench started
        if peaks:
            report["peak_rss_mb"] = peaks
            print("\npeak RSS: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in peaks.items() if mb is not None))
        if args.side_by_side:
            report["fulmine_over_llama.cpp"] = ratios(summaries, "fulmine", "llama.cpp")
            print("\nfulmine / llama.cpp (tok/s per user: higher is better; TTFT, TPOT: lower is better)")
            for level, entry in report["fulmine_over_llama.cpp"].items():
                print(f"  {level:<10} " + "  ".join(f"{k} {v:.2f}" for k, v in entry.items()))
        if args.plot:
            from pathlib import Path

            for path in plot(summaries, results, Path(args.plot)):
                print(f"wrote {path}")
        print(json.dumps(report))
        return 0
    finally:
        for server in servers:
            server.stop()


def _add_engine_figures(
    summary: Summary, before: dict[str, float], after: dict[str, float], bandwidth: float | None
) -> None:
    """Speculation acceptance, weight bytes read per second against the memory roofline, joules per
    output token (with its source), and refusals by latency targets."""
    joules = after.get("fulmine_energy_joules", 0) - before.get("fulmine_energy_joules", 0)
    tokens = after.get("fulmine_generation_tokens_total", 0) - before.get("fulmine_generation_tokens_total", 0)
    if joules > 0 and tokens > 0:
        summary.extra["J/tok"] = joules / tokens
        summary.extra["energy_source"] = after.get("energy_source")
    drafted = after.get("fulmine_spec_draft_tokens", 0) - before.get("fulmine_spec_draft_tokens", 0)
    if drafted > 0:
        accepted = after.get("fulmine_spec_accepted_tokens", 0) - before.get("fulmine_spec_accepted_tokens", 0)
        summary.extra["spec_accept"] = accepted / drafted
    weight_bytes = after.get("fulmine_model_weight_bytes")
    if weight_bytes and summary.tok_s_per_user:
        # a step reads every weight once and gives each running request a token (more with drafts)
        gb_s = weight_bytes * summary.tok_s_per_user / 1e9
        summary.extra["GB/s"] = gb_s
        if bandwidth:
            summary.extra["roofline"] = gb_s / bandwidth
