"""Logprobs in OpenAI's two shapes: chat's list of token entries, and text completions' parallel
lists (tokens, token_logprobs, top_logprobs, text_offset), with an echoed prompt's scores first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fulmine.server.run import Choice

TokenText = Callable[[int], str]  # a token id's text


def chat_logprobs(token_text: TokenText, c: Choice, start: int) -> list[dict[str, Any]]:
    assert c.last is not None
    entries = []
    for token_id, lp in zip(c.last.token_ids[start:], (c.last.logprobs or [])[start:]):
        text = token_text(token_id)
        entries.append(
            {
                "token": text,
                "logprob": lp.logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": token_text(t), "logprob": v, "bytes": list(token_text(t).encode())} for t, v in lp.top
                ],
            }
        )
    return entries


def echo_logprobs(token_text: TokenText, c: Choice) -> dict[str, Any]:
    """The echoed prompt's tokens; the first has no logprob (nothing precedes it), as in OpenAI's API."""
    assert c.last is not None and c.last.prompt_logprobs is not None
    tokens = [token_text(t) for t in c.prompt_ids]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {
        "tokens": tokens,
        "token_logprobs": [None] + [lp.logprob for lp in c.last.prompt_logprobs],
        "top_logprobs": [None] + [{token_text(t): v for t, v in lp.top} for lp in c.last.prompt_logprobs],
        "text_offset": offsets,
    }


def echo_and_text_logprobs(token_text: TokenText, c: Choice, echo: str | None) -> dict[str, Any]:
    completion = text_logprobs(token_text, c, 0, len(echo or ""))
    if echo is None:
        return completion
    prompt = echo_logprobs(token_text, c)
    return {key: prompt[key] + completion[key] for key in completion}


def text_logprobs(token_text: TokenText, c: Choice, start: int, offset: int) -> dict[str, Any]:
    assert c.last is not None
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, lp in zip(c.last.token_ids[start:], (c.last.logprobs or [])[start:]):
        text = token_text(token_id)
        tokens.append(text)
        token_logprobs.append(lp.logprob)
        top.append({token_text(t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
