"""Tool-call parsing: a streamed answer, split anywhere, gives exactly what the whole answer parses to
(content and calls); malformed or unknown calls stay content; the forcing grammars compile."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from fulmine.server import tool_calls, tools

NAMES = {"get_weather", "add"}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWERS = {
    "hermes": [
        "Sure!\n" + CALL + "\n" + '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        CALL,
        "\n" + CALL + "\n",
        "plain text with a < and <tool",
        '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call> tail',
        CALL + " then <tool_call>{not json}</tool_call>",
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}}',  # cut by max_tokens before the close
        "   ",
        "Voilà 東京 🎉 " + CALL,
        '<tool_call>{"name":"add","arguments":{"a":"}]\\"</tool_call","b":[{"c":{}}]}}</tool_call>',
        '<tool_call>\n{"arguments": {"a": 1}, "name": "add"}\n</tool_call>',  # arguments first: read whole
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}\n</tool_call>',  # arguments as a string
        '<tool_call>\n{"name": "add", "arguments": {"a": tru}}\n</tool_call> after',  # kept as written
    ],
    "mistral": ['[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', "text [TOOL_CALLS][]", "[TOOL"],
    "llama3_json": ['{"name": "add", "parameters": {"a": 1, "b": 2}}', '{"x": 1}', "hello"],
}
CASES = [(fmt, answer) for fmt, answers in ANSWERS.items() for answer in answers]


def streamed(fmt: str, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]]]:
    """Content and calls as a client rebuilds them from the deltas of a stream cut at `cuts`."""
    parser = tool_calls.StreamParser(fmt, NAMES)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    content, calls, done = "", list[list[str]](), list[int]()
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
    for i, piece in enumerate(pieces):
        new_content, deltas = parser.feed(piece, final=i == len(pieces) - 1)
        content += new_content
        for d in deltas:
            assert d.index not in done, "a delta after its call was done"
            if d.started:
                assert d.index == len(calls) and d.call.id
                calls.append([d.call.name, ""])
            calls[d.index][1] += d.arguments
            if d.done:
                done.append(d.index)
    assert done == list(range(len(calls))), "every call is done by the end"
    return content, [(name, arguments) for name, arguments in calls]


@settings(max_examples=200, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_streamed_equals_whole(case: tuple[str, str], cuts: list[int]) -> None:
    fmt, text = case
    content, calls = tool_calls.parse(text, fmt, NAMES)
    assert streamed(fmt, text, cuts) == (content, [(c.name, c.arguments) for c in calls])


def test_what_is_a_call_and_what_stays_content() -> None:
    content, calls = tool_calls.parse(ANSWERS["hermes"][0], "hermes", NAMES)
    assert content == "Sure!\n\n" and [c.name for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[1].arguments) == {"a": 1, "b": 2}
    assert tool_calls.parse(CALL, "hermes", NAMES)[0] == ""
    unknown = ANSWERS["hermes"][4]
    assert tool_calls.parse(unknown, "hermes", NAMES) == (unknown, [])
    content, calls = tool_calls.parse(ANSWERS["hermes"][5], "hermes", NAMES)
    assert len(calls) == 1 and content == " then <tool_call>{not json}</tool_call>"
    assert tool_calls.parse("text [TOOL_CALLS][]", "mistral", NAMES)[1] == []
    call = tool_calls.parse(ANSWERS["llama3_json"][0], "llama3_json", NAMES)[1][0]
    assert (call.name, json.loads(call.arguments)) == ("add", {"a": 1, "b": 2})
    assert len(tool_calls.call_id("mistral")) == 9 and tool_calls.call_id("mistral").isalnum()


def test_arguments_stream_before_the_block_closes() -> None:
    parser = tool_calls.StreamParser("hermes", NAMES)
    content, deltas = parser.feed('Hi <tool_call>\n{"name": "add", "arguments": {"a": 1', final=False)
    assert content == "Hi " and len(deltas) == 1 and deltas[0].started and deltas[0].arguments == '{"a": 1'
    _, deltas = parser.feed(', "b": "x}"}}\n</tool_', final=False)
    assert [(d.arguments, d.done) for d in deltas] == [(', "b": "x}"}', False)]
    _, deltas = parser.feed("call>", final=False)
    assert [(d.arguments, d.done) for d in deltas] == [("", True)]
    assert json.loads(parser.calls[0].arguments) == {"a": 1, "b": "x}"}
    # cut by max_tokens: the arguments written so far, as OpenAI's API returns them
    assert (
        tool_calls.parse('<tool_call>{"name": "add", "arguments": {"a": 1', "hermes", NAMES)[1][0].arguments
        == '{"a": 1'
    )
    # parallel_tool_calls false: the second call is read but not kept
    two = CALL + CALL.replace("get_weather", "add")
    assert [c.name for c in tool_calls.parse(two, "hermes", NAMES, parallel=False)[1]] == ["get_weather"]


def test_formats_from_templates() -> None:
    assert tools.detect_format("... <tool_call> ...") == "hermes"
    assert tools.detect_format("[TOOL_CALLS] ...") == "mistral"
    assert tools.detect_format("<|python_tag|>") == "llama3_json"
    assert tools.detect_format("{{ messages }}") == "generic"
    assert tools.detect_format(None) == "generic"


def test_forcing_grammars_compile() -> None:
    import llguidance

    functions = [
        {
            "type": "function",
            "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}},
        },
        {"type": "function", "function": {"name": "get_weather"}},
    ]
    for fmt in ("hermes", "generic", "mistral", "llama3_json"):
        for choice in ("required", {"type": "function", "function": {"name": "add"}}):
            for parallel in (True, False):
                structured = tools.constraint(functions, choice, parallel, fmt)
                assert structured is not None
                grammar = llguidance.LLMatcher.grammar_from_lark(structured.spec)
                assert llguidance.LLMatcher.validate_grammar(grammar) == "", (fmt, choice)
    assert tools.constraint(functions, "auto", True, "hermes") is None
