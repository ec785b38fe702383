"""The fields every response body shares, whichever API shapes it: ids, timestamps, usage, per-request
timing (also as a Server-Timing header) and OpenAI's finish reasons."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fulmine.engine.outputs import RequestOutput


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def timing(output: RequestOutput) -> dict[str, float | None]:
    """Seconds: queue (arrival -> first scheduled), prefill (-> first token), decode (-> finish), and
    from arrival to the first token, to the first answer token (after a reasoning model's thinking),
    to the finish."""
    m = output.metrics

    def span(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else round(end - start, 6)

    return {
        "queue_s": span(m.arrival_time, m.first_scheduled_time),
        "prefill_s": span(m.first_scheduled_time, m.first_token_time),
        "decode_s": span(m.first_token_time, m.finished_time),
        "ttft_s": span(m.arrival_time, m.first_token_time),
        "ttfat_s": span(m.arrival_time, m.first_answer_time),  # to the first answer token, after any thinking
        "total_s": span(m.arrival_time, m.finished_time),
    }


def server_timing_header(timings: dict[str, float | None]) -> str:
    parts = [
        f"{name.removesuffix('_s')};dur={1000 * value:.3f}" for name, value in timings.items() if value is not None
    ]
    return ", ".join(parts)


def finish_reason(output: RequestOutput) -> str | None:
    if not output.finished or output.finish_reason is None:
        return None
    return output.finish_reason.value if output.finish_reason.value in ("stop", "length") else "stop"
