"""One streamed chat completion, timed the way a user feels it.

TTFT is from sending the request to the first token streamed (a reasoning model's thinking
included), TTFAT to the first answer token (after the thinking; TTFT otherwise); inter-token latency
is the gap between chunks (an engine that sends several tokens in one chunk shows fewer, longer gaps);
TPOT is (end - first content) / (completion tokens - 1), from the usage the server reports, or
the number of content chunks when it reports none.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    ttfat: float = 0.0  # to the first answer token (after any thinking)
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""
    refused: bool = False  # 429: the server said it could not meet the request's latency targets

    @property
    def tpot(self) -> float | None:
        if self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)


async def stream_chat(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    sampling: dict[str, float],
    api_key: str | None,
    slo: dict[str, float] | None = None,
) -> RequestResult:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        **sampling,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if slo:
        body["slo"] = slo  # fulmine's extension: refused at once (429) if it cannot be met
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.perf_counter()
    result = RequestResult(ok=False)
    chunks = 0
    last = None
    try:
        async with client.stream("POST", f"{base_url}/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                result.refused = response.status_code == 429
                result.e2e = time.perf_counter() - started
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage")
                if usage:
                    result.completion_tokens = usage.get("completion_tokens", 0)
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                choices = event.get("choices") or []
                delta = choices[0].get("delta", {}) if choices else {}
                if delta.get("content") or delta.get("reasoning_content"):
                    now = time.perf_counter()
                    if delta.get("content") and not result.ttfat:
                        result.ttfat = now - started
                    if last is None:
                        result.ttft = now - started
                    else:
                        result.itls.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.e2e = time.perf_counter() - started
    result.completion_tokens = result.completion_tokens or chunks
    result.ok = last is not None
    if not result.ok:
        result.error = "no content streamed"
    return result
