"""Tool calls read out of an answer, whole or as it streams (alike, however the stream is cut).

A hermes call (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, also the generic format)
streams: once its block has named a known tool and opened its arguments object, the call starts (id
and name) and its arguments go out as the model writes them, verbatim up to the object's closing
brace; the call is done when its block closes, or when the answer ends (a call cut by max_tokens
keeps the arguments written so far, as OpenAI's own API does). A block in another shape (arguments
first, arguments as a string) is read whole when it closes, its arguments re-serialized; one that
is not a call of a known tool, and everything after it, is content. Mistral and Llama 3 JSON
answers are read whole at the end (their calls are known only once the answer is complete).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
# A block's head up to the brace that opens its arguments object: `{"name": "f", "arguments": {`.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out["index"] = index
        return out

    def parsed(self) -> dict[str, Any]:
        """The arguments as an object; {} when the model wrote something else or was cut short."""
        value = loads(self.arguments)
        return value if isinstance(value, dict) else {}


@dataclass
class CallDelta:
    """One step of a streamed call: the first carries its id and name (`started`), each a fragment
    of its arguments (maybe empty), the last says it is complete (`done`)."""

    index: int  # the call's place among the answer's calls
    call: ToolCall  # the call as far as it is known
    arguments: str = ""
    started: bool = False
    done: bool = False


def call_id(format_name: str) -> str:
    if format_name == "mistral":  # Mistral's templates check for exactly 9 alphanumerics
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def loads(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def parse(text: str, fmt: str, tool_names: set[str], parallel: bool = True) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole answer: what a StreamParser emits over it."""
    parser = StreamParser(fmt, tool_names, parallel)
    content, _ = parser.feed(text, final=True)
    return content, parser.calls


def _parse_whole(text: str, fmt: str, tool_names: set[str]) -> tuple[str, list[ToolCall]]:
    """Mistral and Llama 3 JSON answers: calls only when the whole answer is well-formed calls."""
    if fmt == "llama3_json":
        call = _call(loads(text.strip()), "parameters", tool_names)
        return ("", [call]) if call else (text, [])
    head, marker, tail = text.partition(MISTRAL_OPEN)  # calls only when the answer opens with them
    items = loads(tail.strip()) if marker and not head.strip() else None
    found = [_call(item, "arguments", tool_names) for item in items] if isinstance(items, list) else []
    calls = [c for c in found if c is not None]
    if not calls or len(calls) < len(found):
        return text, []
    joined = "".join(head)
    return (joined if joined.strip() else ""), calls


def _call(obj: Any, key: str, tool_names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in tool_names:
        return None
    arguments = obj.get(key, obj.get("arguments", {}))
    if isinstance(arguments, str):
        arguments = loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _marker_prefix(text: str, start: int, marker: str) -> int:
    """How many of text's last characters (after `start`) could begin `marker`."""
    longest = min(len(marker) - 1, len(text) - start)
    return next((n for n in range(longest, 0, -1) if marker.startswith(text[len(text) - n :])), 0)


@dataclass
class _Streaming:
    """A hermes call whose arguments are streaming: where the scan is, and the JSON nesting there."""

    delta: CallDelta
    scan: int  # text[:scan] is read
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    closed: bool = False  # the arguments object has ended

    def read(self, text: str, upto: int) -> str:
        """The arguments in text[scan:upto], stopping after the object's closing brace."""
        start = self.scan
        i = start
        while i < upto and not self.closed:
            ch = text[i]
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.closed = self.depth == 0
            i += 1
        self.scan = max(self.scan, upto)
        return text[start:i]


@dataclass
class StreamParser:
    """Splits an answer, as it streams, into content deltas and call deltas; what it emits over the
    whole stream is the same however the text is cut. Content that might still become a call (a
    partial marker) is held back until decided, as is whitespace until something else follows it
    (content beside calls that is only whitespace is dropped)."""

    fmt: str
    tool_names: set[str]
    parallel: bool = True  # False: only the first call is kept (parallel_tool_calls: false)
    text: str = ""
    pos: int = 0  # text[:pos] is decided: emitted as content or as calls
    pending: str = ""  # decided content not yet emitted (whitespace only so far)
    calls: list[ToolCall] = field(default_factory=list)
    broken: bool = False  # a malformed block: the rest is content
    emitted: bool = False  # some content was emitted: whitespace is content from now on
    streaming: _Streaming | None = None

    def feed(self, delta: str, final: bool) -> tuple[str, list[CallDelta]]:
        """(content delta, call deltas) after `delta`; `final` when the answer is complete."""
        self.text += delta
        if self.fmt in ("mistral", "llama3_json"):
            return self._feed_whole(final)
        out: list[str] = []
        deltas: list[CallDelta] = []
        while not self.broken:
            if self.streaming is not None:
                if not self._stream_arguments(final, deltas):
                    return "".join(out), deltas
                continue
            start = self.text.find(HERMES_OPEN, self.pos)
            if start < 0:
                break
            close = self.text.find(HERMES_CLOSE, start)
            head = _HEAD.match(self.text, start + len(HERMES_OPEN))
            name = loads(head.group(1)) if head and (close < 0 or head.end() < close) else None
            if name in self.tool_names and (self.parallel or not self.calls):
                out.append(self._decide(start))
                self._start(ToolCall(str(name), "", call_id(self.fmt)), deltas)
                self.streaming, self.pos = _Streaming(deltas[-1], head.end()), head.end()  # type: ignore[union-attr]
                continue
            if close < 0 and not final:
                out.append(self._decide(start))
                return "".join(out), deltas
            body = self.text[start + len(HERMES_OPEN) : close if close >= 0 else len(self.text)]
            call = _call(loads(body.strip()), "arguments", self.tool_names)
            if call is None:
                self.broken = True
                break
            out.append(self._decide(start))
            if self.parallel or not self.calls:
                call.id = call_id(self.fmt)
                self._start(call, deltas)
                deltas[-1].arguments, deltas[-1].done = call.arguments, True
            self.pos = close + len(HERMES_CLOSE) if close >= 0 else len(self.text)  # unclosed: cut at the end
        if final:
            out.append(self._decide(len(self.text), last=True))
        else:  # hold back a tail that could begin a marker
            hold = _marker_prefix(self.text, self.pos, HERMES_OPEN) if not self.broken else 0
            out.append(self._decide(len(self.text) - hold))
        return "".join(out), deltas

    def _start(self, call: ToolCall, deltas: list[CallDelta]) -> None:
        self.calls.append(call)
        deltas.append(CallDelta(len(self.calls) - 1, call, started=True))

    def _stream_arguments(self, final: bool, deltas: list[CallDelta]) -> bool:
        """Arguments written since the last feed; True once the call's block is done."""
        s = self.streaming
        assert s is not None
        close = self.text.find(HERMES_CLOSE, s.scan)
        upto = close if close >= 0 else len(self.text)
        if close < 0 and not final:  # a tail that may begin the close marker waits
            upto -= _marker_prefix(self.text, s.scan, HERMES_CLOSE)
        fragment = s.read(self.text, upto)
        s.delta.call.arguments += fragment
        done = close >= 0 or final
        if deltas and deltas[-1] is s.delta:  # started in this same feed
            s.delta.arguments += fragment
            s.delta.done = done
        elif fragment or done:
            deltas.append(CallDelta(s.delta.index, s.delta.call, fragment, done=done))
        if done:
            self.pos, self.streaming = (close + len(HERMES_CLOSE) if close >= 0 else len(self.text)), None
        return done

    def _decide(self, upto: int, last: bool = False) -> str:
        """text[pos:upto] is content: emit it, or hold it while everything pending is whitespace."""
        piece, self.pos = self.text[self.pos : upto], max(self.pos, upto)
        self.pending += piece
        if self.pending.strip() or self.emitted or (last and not self.calls):
            out, self.pending = self.pending, ""
            self.emitted = self.emitted or bool(out)
            return out
        return ""

    def _feed_whole(self, final: bool) -> tuple[str, list[CallDelta]]:
        if self.fmt == "llama3_json":
            undecided = not self.text.strip() or self.text.lstrip().startswith("{")
        else:
            undecided = MISTRAL_OPEN.startswith(self.text.lstrip()[: len(MISTRAL_OPEN)]) or MISTRAL_OPEN in self.text
        if not final:
            if undecided or self.broken:
                return "", []
            self.broken = True  # plain content from here on
            out, self.pos = self.text[self.pos :], len(self.text)
            return out, []
        content, calls = _parse_whole(self.text, self.fmt, self.tool_names) if not self.broken else (self.text, [])
        calls = calls if self.parallel else calls[:1]
        deltas: list[CallDelta] = []
        for call in calls:
            call.id = call_id(self.fmt)
            self._start(call, deltas)
            deltas[-1].arguments, deltas[-1].done = call.arguments, True
        out, self.pos = content[self.pos :] if not calls else content, len(self.text)
        return out, deltas
