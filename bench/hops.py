"""How many hand-offs a streamed chat takes inside the server: to its first token, and per later token.

    python -m bench.hops                    # the embedded model, 5 requests of each length
    python -m bench.hops --tokens 64 --repeats 9

Runs the real app (uvicorn on loopback, the stdlib asyncio loop so its callbacks can be counted) in
this process and streams chats with a plain HTTP client on another thread. Counts, on the server's
side, per request: event-loop callbacks run (every task wake-up, timer and cross-thread call is
one), tasks created, calls from other threads onto the loop (call_soon_threadsafe) and jobs sent to
worker threads (run_in_executor). A request of 1 token is the cost to the first token; the
difference to one of N tokens, over N - 1, the cost of each later token. Medians over the repeats.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from collections import Counter
from typing import Any

import httpx
import uvicorn

from fulmine.benchmark.servers import free_port
from fulmine.config import EngineConfig, ServerConfig
from fulmine.engine.llm_engine import LLMEngine
from fulmine.server.api import create_app
from fulmine.server.lifecycle import Server

COUNTS: Counter[str] = Counter()


def _counted(cls: Any, name: str, key: str) -> None:
    original = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        COUNTS[key] += 1
        return original(*args, **kwargs)

    setattr(cls, name, wrapper)


def instrument() -> None:
    _counted(asyncio.events.Handle, "_run", "callbacks")
    _counted(asyncio.base_events.BaseEventLoop, "create_task", "tasks")
    _counted(asyncio.base_events.BaseEventLoop, "call_soon_threadsafe", "from_threads")
    _counted(asyncio.base_events.BaseEventLoop, "run_in_executor", "to_threads")


def stream_chat(base_url: str, model: str, tokens: int) -> dict[str, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count from one to one hundred, in words."}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
    }
    before = COUNTS.copy()
    received = 0
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                received += 1
    time.sleep(0.05)  # the server's own cleanup after the last byte
    counts = {key: COUNTS[key] - before[key] for key in ("callbacks", "tasks", "from_threads", "to_threads")}
    counts["chunks"] = received
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF file or HF directory (default: the embedded model)")
    parser.add_argument("--tokens", type=int, default=33, help="the long request's max_tokens")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    instrument()
    port = free_port()
    config = ServerConfig(host="127.0.0.1", port=port)

    def load() -> LLMEngine:
        return LLMEngine(args.model, EngineConfig(speculative="off"), progress=False)

    app = create_app(config, load)
    server = Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio", http="h11"),
        app.state.fulmine,
    )
    threading.Thread(target=server.run, daemon=True).start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
    stream_chat(base_url, model, 4)  # warm: the first request builds what later ones reuse
    short = [stream_chat(base_url, model, 1) for _ in range(args.repeats)]
    long = [stream_chat(base_url, model, args.tokens) for _ in range(args.repeats)]
    server.should_exit = True
    rows = {}
    for key in ("callbacks", "tasks", "from_threads", "to_threads"):
        first = statistics.median(r[key] for r in short)
        short_chunks = statistics.median(r["chunks"] for r in short)
        per_token = statistics.median((lo[key] - first) / (lo["chunks"] - short_chunks) for lo in long)
        rows[key] = {"first_token": first, "per_later_token": round(per_token, 2)}
    print(f"{'':16} {'to the first token':>20} {'per later token':>16}")
    for key, row in rows.items():
        print(f"{key:16} {row['first_token']:>20g} {row['per_later_token']:>16g}")
    print(json.dumps({"bench": "hops", "tokens": args.tokens, "repeats": args.repeats, **rows}))


if __name__ == "__main__":
    main()
