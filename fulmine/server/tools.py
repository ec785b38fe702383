"""Tool calling: tools rendered into the prompt (calls are read out of the answer by tool_calls.py),
and `tool_choice` required / a named function enforced by a grammar.

The call format is the model's own, detected from its chat template:
- hermes (Qwen2.5, Hermes, most recent templates): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call;
- mistral: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"} (call ids of 9 letters and digits);
- llama3_json (Llama 3.x templates): the whole answer one JSON object {"name", "parameters"};
- generic, when the template has no tool section (SmolLM2): the tools are described in a system
  message and the model answers in the hermes format.
Templates that know tools get them as the template's `tools` variable (fulmine/chat_template.py); earlier
assistant `tool_calls` go back in with their arguments as objects, `tool` messages as the template
renders them (the generic format: as `<tool_response>` blocks in a user turn).
"""

from __future__ import annotations

import json
import re
from typing import Any

from fulmine.config import ConfigError
from fulmine.request import StructuredOutput
from fulmine.sampling.grammar import closed_objects
from fulmine.sampling.grammar_limits import bound_schema
from fulmine.server.protocol import ChatCompletionRequest, RequestError
from fulmine.server.tool_calls import HERMES_CLOSE, HERMES_OPEN, MISTRAL_OPEN, loads

# OpenAI's function names ([a-zA-Z0-9_-]{1,64}) plus the . and : of namespaced tools (MCP): nothing
# that could close the call format's tags or the prompt's quotes
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def checked_tools(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The tools the model may call (none when tool_choice is "none"), checked; the legacy
    functions / function_call are taken as tools / tool_choice."""
    tools = list(
        body.tools if body.tools is not None else [{"type": "function", "function": f} for f in body.functions or []]
    )
    names = []
    for i, tool in enumerate(tools):
        function = (
            tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        )
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError("each tool is {type: function, function: {name, parameters}}", f"tools[{i}]")
        name = function["name"]
        if not _NAME.fullmatch(name):
            raise RequestError(
                f"a function name is 1 to 64 letters, digits, _ - . or : (got {name[:80]!r})",
                f"tools[{i}].function.name",
            )
        if name in names:
            raise RequestError(f"two tools are named {name!r}", f"tools[{i}].function.name")
        if not isinstance(function.get("parameters", {}), dict):
            raise RequestError("a function's parameters are a JSON schema object", f"tools[{i}].function.parameters")
        try:  # before anything serializes it (json.dumps recursed past Python's limit ~960 levels deep)
            bound_schema(function.get("parameters", {}))
        except ConfigError as error:
            raise RequestError(
                str(error).replace("json_schema", "parameters"), f"tools[{i}].function.parameters"
            ) from None
        if function.get("strict") is True and "parameters" in function:  # exactly the parameters named
            tools[i] = {**tool, "function": {**function, "parameters": closed_objects(function["parameters"])}}
        names.append(function["name"])
    choice = body.tool_choice_value()
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
        if name not in names:
            raise RequestError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    elif choice not in (None, "auto", "none", "required"):
        raise RequestError("tool_choice is none, auto, required or {type: function, function: {name}}", "tool_choice")
    if choice == "required" and not tools:
        raise RequestError("tool_choice required needs tools", "tool_choice")
    return [] if choice == "none" else tools


def check_call_ids(messages: list[dict[str, Any]], where: str = "messages") -> None:
    """Each tool result answers a call an earlier assistant turn made (by its id), as OpenAI requires."""
    called: set[str] = set()
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            called.add(call.get("id"))
        if message["role"] == "tool" and message["tool_call_id"] not in called:
            raise RequestError(
                f"the tool result's id {message['tool_call_id'][:80]!r} answers no earlier tool call",
                f"{where}[{index}].tool_call_id",
            )


def detect_format(chat_template: str | None) -> str:
    template = chat_template or ""
    if HERMES_OPEN in template:
        return "hermes"
    if MISTRAL_OPEN in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "generic"


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function", tool)


def function_name(tool: dict[str, Any]) -> str:
    return str(_function(tool)["name"])


def generic_system_prompt(tools: list[dict[str, Any]]) -> str:
    lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "You may call one or more functions to assist with the user query. The functions, as JSON "
        f"signatures:\n<tools>\n{lines}\n</tools>\n\nTo call a function, answer with a JSON object with "
        f'its name and arguments within {HERMES_OPEN}{HERMES_CLOSE} tags:\n{HERMES_OPEN}\n{{"name": '
        f'<function-name>, "arguments": <args-json-object>}}\n{HERMES_CLOSE}'
    )


def hermes_block(name: str, arguments: str) -> str:
    body = json.dumps({"name": name, "arguments": loads(arguments)}, ensure_ascii=False)
    return f"{HERMES_OPEN}\n{body}\n{HERMES_CLOSE}"


def render_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, fmt: str
) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: assistant tool calls with their arguments as
    objects; for the generic format, the tools in a system message and calls / results as text."""
    out: list[dict[str, Any]] = []
    for message in messages:
        message = dict(message)
        calls = message.get("tool_calls") or []
        if message.get("content") is None:
            message["content"] = ""
        if fmt == "generic":
            if calls:
                blocks = [hermes_block(c["function"]["name"], c["function"]["arguments"]) for c in calls]
                message = {"role": "assistant", "content": "\n".join(filter(None, [message["content"], *blocks]))}
            elif message["role"] == "tool":
                message = {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        elif calls:
            message["tool_calls"] = [
                {
                    "id": c.get("id"),
                    "type": "function",
                    "function": {"name": c["function"]["name"], "arguments": loads(c["function"]["arguments"])},
                }
                for c in calls
            ]
        out.append(message)
    if fmt == "generic" and tools:
        prompt = generic_system_prompt(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def special_markers(tokenizer: Any) -> set[str]:
    """The call markers that are single added tokens of this tokenizer (Qwen's <tool_call>): a grammar
    names them as tokens, since the text would be matched byte by byte."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    return {m for m in (HERMES_OPEN, HERMES_CLOSE, MISTRAL_OPEN) if m in added}


def _lit(marker: str, tokens: frozenset[str]) -> str:
    return marker if marker in tokens else json.dumps(marker)


def constraint(
    tools: list[dict[str, Any]], tool_choice: Any, parallel: bool, fmt: str, tokens: frozenset[str] = frozenset()
) -> StructuredOutput | None:
    """A grammar forcing a call when tool_choice is "required" or names a function (None for "auto"):
    the call's arguments then always parse and validate against the function's parameters. A named
    function is called once (as OpenAI's API and vLLM do); "required" allows parallel calls. `tokens`:
    the markers that are single tokens (special_markers)."""
    if tool_choice in (None, "auto", "none"):
        return None
    parallel = parallel and not isinstance(tool_choice, dict)
    if isinstance(tool_choice, dict):
        wanted = [_function(tool_choice)["name"]]
    else:
        wanted = [_function(t)["name"] for t in tools]
    functions = {_function(t)["name"]: _function(t) for t in tools}
    key = "parameters" if fmt == "llama3_json" else "arguments"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, key: functions[name].get("parameters") or {"type": "object"}},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for name in wanted
    ]
    schema = json.dumps(options[0] if len(options) == 1 else {"anyOf": options})
    repeat = "+" if parallel else ""
    if fmt == "mistral":
        items = 'call (", " call)*' if parallel else "call"
        lark = f'start: {_lit(MISTRAL_OPEN, tokens)} "[" {items} "]"\ncall: %json {schema}'
    elif fmt == "llama3_json":
        lark = f"start: %json {schema}"
    else:
        start, end = _lit(HERMES_OPEN, tokens), _lit(HERMES_CLOSE, tokens)
        lark = f'start: block{repeat}\nblock: {start} "\\n" %json {schema} "\\n" {end} "\\n"?'
    return StructuredOutput("grammar", lark)
