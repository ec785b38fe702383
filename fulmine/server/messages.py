"""POST /v1/messages: Anthropic's Messages API, so the anthropic SDK and Claude-Code-style clients
work. A thin adapter: the request becomes a chat request (system, text blocks, tool_use and
tool_result blocks, tools with their input_schema, tool_choice), runs as one, and its content and
tool calls come back as Anthropic content blocks, whole or as Anthropic's stream events. Errors are
in Anthropic's shape ({"type": "error", "error": {"type", "message"}}).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from fulmine.server import protocol as p
from fulmine.server.completions import Completions
from fulmine.server.events import Generation
from fulmine.server.run import Choice
from fulmine.server.tool_calls import ToolCall

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    max_tokens: p.Positive
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: p.Number | None = Field(None, ge=0.0, le=1.0)
    top_p: p.Number | None = Field(None, gt=0.0, le=1.0)
    top_k: p.Int | None = Field(None, ge=0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    thinking: dict[str, Any] | None = None


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def to_chat(body: MessagesRequest) -> p.ChatCompletionRequest:
    """The request as a chat completion request (OpenAI's shape, fulmine's internal one)."""
    budget = _thinking_budget(body)
    messages: list[dict[str, Any]] = []
    if body.system is not None:
        messages.append({"role": "system", "content": p.text_of(body.system, "system")})
    for i, message in enumerate(body.messages):
        role, content = message.get("role"), message.get("content")
        where = f"messages[{i}].content"
        if role not in ("user", "assistant"):
            raise p.RequestError("a message's role is user or assistant", f"messages[{i}].role")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise p.RequestError(f"{where} is a string or a list of content blocks", where)
        if not content:  # Anthropic's API refuses it too: a turn says something
            raise p.RequestError(f"{where} is empty: a message needs at least one content block", where)
        text, calls, thought = [], [], []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif kind == "thinking" and role == "assistant" and isinstance(block.get("thinking"), str):
                thought.append(block["thinking"])  # an earlier answer's thinking: the template keeps or drops it
            elif kind == "redacted_thinking" and role == "assistant":
                continue  # another server's encrypted thinking: nothing this model reads
            elif kind == "tool_use" and role == "assistant" and isinstance(block.get("name"), str):
                arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
                calls.append(
                    {
                        "id": str(block.get("id", "")),
                        "type": "function",
                        "function": {"name": block["name"], "arguments": arguments},
                    }
                )
            elif kind == "tool_result" and role == "user" and isinstance(block.get("tool_use_id"), str):
                result = block.get("content", "")
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": block["tool_use_id"],
                        "content": p.text_of(result, f"{where}[{j}].content"),
                    }
                )
            else:
                raise p.RequestError(f"{where}[{j}]: unsupported content block {kind!r}", where)
        if text or calls or role == "assistant":
            entry: dict[str, Any] = {"role": role, "content": "".join(text)}
            if calls:
                entry["tool_calls"] = calls
            if thought:
                entry["reasoning_content"] = "".join(thought)
            messages.append(entry)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel: bool | None = None
    if body.tools:
        tools = []
        for i, tool in enumerate(body.tools):
            if not isinstance(tool.get("name"), str) or tool.get("type") not in (None, "custom"):
                raise p.RequestError("each tool is {name, description, input_schema}", f"tools[{i}]")
            function = {
                "name": tool["name"],
                "description": tool.get("description", ""),
                "parameters": tool.get("input_schema") or {"type": "object"},
            }
            tools.append({"type": "function", "function": function})
    if body.tool_choice:
        kind = body.tool_choice.get("type")
        tool_choice = {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))
        if kind == "tool":
            tool_choice = {"type": "function", "function": {"name": body.tool_choice.get("name")}}
        elif tool_choice is None:
            raise p.RequestError("tool_choice type is auto, any, tool or none", "tool_choice")
        parallel = False if body.tool_choice.get("disable_parallel_tool_use") else None
    fields = {
        "model": body.model,
        "messages": messages,
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "stop": body.stop_sequences,
        "stream": body.stream,
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": parallel,
        # Anthropic's thinking is off unless enabled, and then bounded by its budget
        "reasoning_effort": "none" if budget is None else None,
        "reasoning_budget": budget,
    }
    try:
        return p.ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValueError as error:
        raise p.RequestError(f"invalid request: {error}".splitlines()[0], None) from None


def _thinking_budget(body: MessagesRequest) -> int | None:
    """`thinking`: disabled (the default: None) or enabled with its budget_tokens, under max_tokens."""
    thinking = body.thinking or {"type": "disabled"}
    kind = thinking.get("type")
    if kind == "disabled":
        return None
    budget = thinking.get("budget_tokens")
    if kind != "enabled" or not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise p.RequestError("thinking is {type: enabled, budget_tokens: N >= 1} or {type: disabled}", "thinking")
    if budget >= body.max_tokens:
        raise p.RequestError("thinking.budget_tokens must be less than max_tokens", "thinking.budget_tokens")
    return budget


# Anthropic's clients keep a thinking block's signature and send it back; nothing here checks it
SIGNATURE = "fulmine-unsigned"


def _blocks(content: str, calls: list[ToolCall], thinking: str = "") -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = (
        [{"type": "thinking", "thinking": thinking, "signature": SIGNATURE}] if thinking else []
    )
    blocks += [{"type": "text", "text": content}] if content else []
    for call in calls:
        blocks.append({"type": "tool_use", "id": _tool_id(call), "name": call.name, "input": call.parsed()})
    return blocks


def _tool_id(call: ToolCall) -> str:
    return "toolu_" + call.id.removeprefix("call_") if call.id else "toolu_" + secrets.token_hex(12)


def _usage(c: Choice) -> dict[str, int]:
    cached = c.last.num_cached_tokens if c.last else 0
    output = len(c.last.token_ids) if c.last else 0
    return {
        "input_tokens": len(c.prompt_ids) - cached,
        "output_tokens": output,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


async def create(completions: Completions, body: MessagesRequest, request: Request) -> Any:
    chat = await completions.start_chat(to_chat(body), request, id_prefix="msg")
    run = chat.run
    if body.stream:
        return StreamingResponse(
            _sse(_events(chat, body.model)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    [answer] = await chat.answers()
    c = answer.choice
    return JSONResponse(
        {
            "id": run.id,
            "type": "message",
            "role": "assistant",
            "model": body.model,
            "content": _blocks(answer.content, answer.calls, answer.reasoning),
            "stop_reason": STOP_REASONS[answer.finish],
            "stop_sequence": None,
            "usage": _usage(c),
        }
    )


async def _events(chat: Generation, model: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Anthropic's stream: message_start, per block start / deltas / stop, message_delta, message_stop.
    A tool call is one tool_use block, its input streamed as input_json_delta fragments."""
    run = chat.run
    c = run.choices[0]
    start: dict[str, Any] = {
        "id": run.id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    yield (
        "message_start",
        {
            "type": "message_start",
            "message": {**start, "usage": {"input_tokens": len(c.prompt_ids), "output_tokens": 0}},
        },
    )
    index, text_open, thinking_open = 0, False, False
    async for event in chat.events():
        content, calls = event.content, event.calls
        if event.reasoning:
            if not thinking_open:
                opening: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
                yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": opening}
                thinking_open = True
            delta = {"type": "thinking_delta", "thinking": event.reasoning}
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        if thinking_open and (content or calls or event.finish is not None):  # the thinking is over
            delta = {"type": "signature_delta", "signature": SIGNATURE}
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
            index, thinking_open = index + 1, False
        if content:
            if not text_open:
                yield (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
                )
                text_open = True
            yield (
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": content}},
            )
        for call in calls:
            if call.started:
                if text_open:
                    yield "content_block_stop", {"type": "content_block_stop", "index": index}
                    index, text_open = index + 1, False
                block = {"type": "tool_use", "id": _tool_id(call.call), "name": call.call.name, "input": {}}
                yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
            if call.arguments:
                delta = {"type": "input_json_delta", "partial_json": call.arguments}
                yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
            if call.done:
                yield "content_block_stop", {"type": "content_block_stop", "index": index}
                index += 1
        if event.finish is not None:
            if text_open:
                yield "content_block_stop", {"type": "content_block_stop", "index": index}
            stop = STOP_REASONS[event.finish]
            usage = _usage(c)
            yield (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
            )
            yield "message_stop", {"type": "message_stop"}


async def _sse(events: AsyncIterator[tuple[str, dict[str, Any]]]) -> AsyncIterator[str]:
    try:
        async for name, data in events:
            yield f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
    except p.RequestError as error:
        yield f"event: error\ndata: {json.dumps(error_body(error.status, error.message))}\n\n"
    except Exception as error:  # noqa: BLE001 (the engine failed mid-stream: say so, do not hang the client)
        yield f"event: error\ndata: {json.dumps(error_body(500, f'internal error: {error}'))}\n\n"
