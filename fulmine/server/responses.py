"""POST /v1/responses: OpenAI's Responses API, so the OpenAI Agents SDK and Codex-style clients work.
A thin adapter over a chat run: `instructions` and `input` items (messages, function calls and their
outputs) become chat messages, function tools become tools, `text.format` a response_format; the
answer comes back as output items (a reasoning item with a thinking model's text, a message with
output_text, function_call items), whole or as the API's stream events. `previous_response_id`
continues a conversation from a bounded in-memory store; once a response has been evicted, naming it
is a clear 400.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from fulmine.server import logprobs as lp
from fulmine.server import protocol as p
from fulmine.server.completions import Completions
from fulmine.server.events import Generation
from fulmine.server.run import Choice
from fulmine.server.tool_calls import ToolCall

STORE_SIZE = 1024  # responses kept for previous_response_id


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: p.Int | None = Field(None, ge=1)
    temperature: p.Number | None = Field(None, ge=0.0, le=2.0)
    top_p: p.Number | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    truncation: str | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None
    top_logprobs: p.Int | None = None
    slo: dict[str, Any] | None = None  # fulmine's latency targets, as on chat completions


class ResponseStore:
    """The conversations of recent responses (chat messages, the answer included), newest kept."""

    def __init__(self, size: int = STORE_SIZE) -> None:
        self.size, self._items, self._lock = size, OrderedDict[str, list[dict[str, Any]]](), threading.Lock()

    def get(self, response_id: str) -> list[dict[str, Any]]:
        with self._lock:
            if response_id not in self._items:
                raise p.RequestError(
                    f"previous_response_id {response_id!r} is unknown or was evicted (the last {self.size} "
                    "responses are kept): send the conversation as input instead",
                    "previous_response_id",
                    "previous_response_not_found",
                )
            return list(self._items[response_id])

    def put(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        with self._lock:
            self._items[response_id] = messages
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input items as chat messages (consecutive function calls join one assistant turn)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(body.input):
        kind, where = item.get("type", "message"), f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise p.RequestError("a message's role is user, assistant, system or developer", f"{where}.role")
            messages.append(
                {
                    "role": role,
                    "content": p.text_of(
                        item.get("content"), f"{where}.content", ("input_text", "output_text", "text")
                    ),
                }
            )
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise p.RequestError("a function_call item has call_id, name and arguments", where)
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": str(item.get("arguments", "{}"))},
            }
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise p.RequestError("a function_call_output item has call_id and output", where)
            output = item.get("output", "")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item["call_id"],
                    "content": output if isinstance(output, str) else json.dumps(output),
                }
            )
        elif kind == "reasoning":
            continue  # a reasoning model's summary from another server: nothing this model reads
        else:
            raise p.RequestError(f"{where}: unsupported input item type {kind!r}", where)
    return messages


def to_chat(body: ResponsesRequest, history: list[dict[str, Any]]) -> p.ChatCompletionRequest:
    effort = (body.reasoning or {}).get("effort")
    p.check_effort(effort, "reasoning.effort")
    messages = (
        ([{"role": "system", "content": body.instructions}] if body.instructions else [])
        + history
        + input_messages(body)
    )
    tools = None
    if body.tools:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                raise p.RequestError(f"only function tools are supported (got {tool.get('type')!r})", f"tools[{i}]")
            function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
            tools.append({"type": "function", "function": function})
    tool_choice: Any = body.tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        tool_choice = {"type": "function", "function": {"name": tool_choice.get("name")}}
    fmt = (body.text or {}).get("format")
    response_format = None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise p.RequestError("text.format json_schema needs its schema (an object)", "text.format.schema")
        response_format = {
            "type": "json_schema",
            "json_schema": {
                "name": fmt.get("name", "output"),
                "schema": fmt.get("schema", {}),
                "strict": fmt.get("strict"),
            },
        }
    elif isinstance(fmt, dict) and fmt.get("type") in ("json_object", "text"):
        response_format = {"type": fmt["type"]}
    elif fmt is not None:
        raise p.RequestError("text.format type is text, json_object or json_schema", "text.format")
    fields = {
        "model": body.model,
        "messages": messages,
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stream": body.stream,
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": response_format,
        "slo": body.slo,
        "logprobs": True if body.top_logprobs is not None else None,
        "top_logprobs": body.top_logprobs,
        "reasoning_effort": effort,
    }
    try:
        return p.ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValueError as error:
        raise p.RequestError(f"invalid request: {error}".splitlines()[0], None) from None


def _message_item(
    item_id: str, text: str, status: str = "completed", logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def _reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    """A reasoning model's thinking as the Responses API carries an open model's: its text as content."""
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": "fc_" + secrets.token_hex(12),
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    }


class Responses:
    """The endpoint: chat runs through `completions`, conversations kept in a store."""

    def __init__(self) -> None:
        self.store = ResponseStore()

    async def create(self, completions: Completions, body: ResponsesRequest, request: Request) -> Any:
        history = self.store.get(body.previous_response_id) if body.previous_response_id else []
        chat_body = to_chat(body, history)
        chat = await completions.start_chat(chat_body, request, id_prefix="resp")
        conversation = [m.as_dict(i) for i, m in enumerate(chat_body.messages) if not (i == 0 and body.instructions)]
        if body.stream:
            return StreamingResponse(
                _sse(self._events(chat, body, conversation, completions.token_text)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        [answer] = await chat.answers()
        content, calls = answer.content, answer.calls
        entries = lp.chat_logprobs(completions.token_text, answer.choice, 0) if body.top_logprobs is not None else []
        message = _message_item("msg_" + secrets.token_hex(12), content, logprobs=entries)
        thinking = [_reasoning_item("rs_" + secrets.token_hex(12), answer.reasoning)] if answer.reasoning else []
        output = thinking + ([message] if content or not calls else []) + [_call_item(call) for call in calls]
        response = self._response(chat, body, answer.choice, output, answer.finish)
        self._remember(response, conversation, content, calls, body, answer.reasoning)
        return JSONResponse(response)

    def _response(
        self,
        chat: Generation,
        body: ResponsesRequest,
        c: Choice | None,
        output: list[dict[str, Any]],
        reason: str | None,
        status: str | None = None,
    ) -> dict[str, Any]:
        if status is None:
            status = "incomplete" if reason == "length" else "completed"
        usage = None
        if c is not None and c.last is not None:
            cached, out = c.last.num_cached_tokens, len(c.last.token_ids)
            usage = {
                "input_tokens": len(c.prompt_ids),
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": out,
                "output_tokens_details": {"reasoning_tokens": c.last.num_reasoning_tokens},
                "total_tokens": len(c.prompt_ids) + out,
            }
        return {
            "id": chat.run.id,
            "object": "response",
            "created_at": chat.run.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None},
            "store": body.store is not False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": body.text or {"format": {"type": "text"}},
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": usage,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def _remember(
        self,
        response: dict[str, Any],
        conversation: list[dict[str, Any]],
        content: str,
        calls: list[ToolCall],
        body: ResponsesRequest,
        reasoning: str = "",
    ) -> None:
        if body.store is False:
            return
        answer: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning:  # (the template keeps or drops an earlier turn's thinking, as it does)
            answer["reasoning_content"] = reasoning
        if calls:
            answer["tool_calls"] = [call.to_openai() for call in calls]
        self.store.put(response["id"], [*conversation, answer])

    async def _events(
        self, chat: Generation, body: ResponsesRequest, conversation: list[dict[str, Any]], token_text: lp.TokenText
    ) -> AsyncIterator[dict[str, Any]]:
        """The Responses stream: created, in_progress, per output item added / deltas / done, completed."""
        run = chat.run
        c = run.choices[0]
        for kind in ("created", "in_progress"):
            yield _event(kind, response=self._response(chat, body, None, [], None, "in_progress"))
        output: list[dict[str, Any]] = []
        open_id, open_text, full_text = None, "", ""  # the message item being streamed, if any
        all_calls: list[ToolCall] = []
        items: dict[int, tuple[int, dict[str, Any]]] = {}  # a streaming call's (output index, item)
        reason = None
        scored, entries = 0, []  # tokens whose logprobs went out with a delta; those of the open message
        thinking_id, thinking_text = None, ""  # the reasoning item being streamed, if any

        def new_logprobs() -> list[dict[str, Any]]:
            nonlocal scored
            if body.top_logprobs is None or c.last is None:
                return []
            fresh = lp.chat_logprobs(token_text, c, scored)
            scored = len(c.last.token_ids)
            entries.extend(fresh)
            return fresh

        async for event in chat.events():
            final, content, calls = event.finish is not None, event.content, event.calls
            reason = event.finish or reason
            if event.reasoning:
                if thinking_id is None:
                    thinking_id = "rs_" + secrets.token_hex(12)
                    output.append(_reasoning_item(thinking_id, "", "in_progress"))
                    yield _event("output_item.added", output_index=len(output) - 1, item=output[-1])
                thinking_text += event.reasoning
                yield _event("reasoning_text.delta", **_at(thinking_id, len(output) - 1), delta=event.reasoning)
            if thinking_id is not None and (content or calls or final):  # the thinking is over
                index = len(output) - 1
                output[index] = _reasoning_item(thinking_id, thinking_text)
                yield _event("reasoning_text.done", **_at(thinking_id, index), text=thinking_text)
                yield _event("output_item.done", output_index=index, item=output[index])
                thinking_id = None
            if content:
                if open_id is None:
                    open_id, open_text = "msg_" + secrets.token_hex(12), ""
                    output.append(_message_item(open_id, "", "in_progress"))
                    yield _event("output_item.added", output_index=len(output) - 1, item=output[-1])
                    part = {"type": "output_text", "text": "", "annotations": []}
                    yield _event("content_part.added", **_at(open_id, len(output) - 1), part=part)
                open_text += content
                full_text += content
                delta_logprobs = new_logprobs()
                yield _event(
                    "output_text.delta", **_at(open_id, len(output) - 1), delta=content, logprobs=delta_logprobs
                )
            if (calls or final) and open_id is not None:
                for closing in _close_message(output, open_id, open_text, entries):
                    yield closing
                open_id, entries = None, []
            for call in calls:
                if call.started:
                    output.append(_call_item(call.call, "in_progress"))
                    items[call.index] = len(output) - 1, output[-1]
                    added = {**output[-1], "arguments": ""}
                    yield _event("output_item.added", output_index=len(output) - 1, item=added)
                at, item = items[call.index]
                where = {"item_id": item["id"], "output_index": at}
                if call.arguments:
                    yield _event("function_call_arguments.delta", **where, delta=call.arguments)
                if call.done:
                    item.update(arguments=call.call.arguments, status="completed")
                    yield _event("function_call_arguments.done", **where, arguments=call.call.arguments)
                    yield _event("output_item.done", output_index=at, item=item)
                    all_calls.append(call.call)
        if not any(item["type"] != "reasoning" for item in output):  # an empty answer is still one (empty) message
            output.append(_message_item("msg_" + secrets.token_hex(12), ""))
        response = self._response(chat, body, c, output, reason)
        reasoning = "".join(i["content"][0]["text"] for i in output if i["type"] == "reasoning" and i["content"])
        self._remember(response, conversation, full_text, all_calls, body, reasoning)
        yield _event("incomplete" if response["status"] == "incomplete" else "completed", response=response)


def _event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": f"response.{kind}", **fields}


def _at(item_id: str, output_index: int) -> dict[str, Any]:
    """Where a text event belongs: the message item, its place in the output, its one content part."""
    return {"item_id": item_id, "output_index": output_index, "content_index": 0}


def _close_message(
    output: list[dict[str, Any]], message_id: str, text: str, logprobs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    index = len(output) - 1
    output[index] = _message_item(message_id, text, logprobs=list(logprobs))
    return [
        _event("output_text.done", **_at(message_id, index), text=text, logprobs=list(logprobs)),
        _event("content_part.done", **_at(message_id, index), part=output[index]["content"][0]),
        _event("output_item.done", output_index=index, item=output[index]),
    ]


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    sequence = 0
    try:
        async for event in events:
            event["sequence_number"] = sequence
            sequence += 1
            yield f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
    except p.RequestError as error:
        body = {
            "type": "error",
            "code": error.code,
            "message": error.message,
            "param": error.param,
            "sequence_number": sequence,
        }
        yield f"event: error\ndata: {json.dumps(body)}\n\n"
    except Exception as error:  # noqa: BLE001 (the engine failed mid-stream: say so, do not hang the client)
        body = {
            "type": "error",
            "code": "server_error",
            "message": f"internal error: {error}",
            "param": None,
            "sequence_number": sequence,
        }
        yield f"event: error\ndata: {json.dumps(body)}\n\n"
