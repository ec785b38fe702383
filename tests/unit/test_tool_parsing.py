"""Tool-call parsing: a streamed answer, split anywhere, gives exactly what the whole answer parses to
(content and calls); malformed or unknown calls stay content; the forcing grammars compile."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from fulmine.server import tools

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
    ],
    "mistral": ['[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', "text [TOOL_CALLS][]", "[TOOL"],
    "llama3_json": ['{"name": "add", "parameters": {"a": 1, "b": 2}}', '{"x": 1}', "hello"],
}
CASES = [(fmt, answer) for fmt, answers in ANSWERS.items() for answer in answers]


def streamed(fmt: str, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]]]:
    parser = tools.StreamParser(fmt, NAMES)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    content, calls = "", []
    for a, b in zip(bounds, bounds[1:]):
        piece, new = parser.feed(text[a:b], final=b == len(text))
        content += piece
        calls += [(c.name, c.arguments) for c in new]
    if len(bounds) == 1:
        piece, new = parser.feed("", final=True)
        content += piece
        calls += [(c.name, c.arguments) for c in new]
    return content, calls


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_streamed_equals_whole(case: tuple[str, str], cuts: list[int]) -> None:
    fmt, text = case
    content, calls = tools.parse(text, fmt, NAMES)
    assert streamed(fmt, text, cuts) == (content, [(c.name, c.arguments) for c in calls])


def test_what_is_a_call_and_what_stays_content() -> None:
    content, calls = tools.parse(ANSWERS["hermes"][0], "hermes", NAMES)
    assert content == "Sure!\n\n" and [c.name for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[1].arguments) == {"a": 1, "b": 2}
    assert tools.parse(CALL, "hermes", NAMES)[0] == ""
    unknown = ANSWERS["hermes"][4]
    assert tools.parse(unknown, "hermes", NAMES) == (unknown, [])
    content, calls = tools.parse(ANSWERS["hermes"][5], "hermes", NAMES)
    assert len(calls) == 1 and content == " then <tool_call>{not json}</tool_call>"
    assert tools.parse("text [TOOL_CALLS][]", "mistral", NAMES)[1] == []
    call = tools.parse(ANSWERS["llama3_json"][0], "llama3_json", NAMES)[1][0]
    assert (call.name, json.loads(call.arguments)) == ("add", {"a": 1, "b": 2})
    assert len(tools.call_id("mistral")) == 9 and tools.call_id("mistral").isalnum()


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
