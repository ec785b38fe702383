"""Reasoning formats read from real templates, and the text-exact split of thinking and answer."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fulmine.config import ConfigError
from fulmine.reasoning import NONE, ReasoningFormat, ReasoningParser, detect, prompt_opens, split
from tests.conftest import THINK_TOKENS, build_tokenizer, thinking_template

THINK = ReasoningFormat("think")
PIECES = ["<think>", "</think>", "<thi", "nk>", "</", "think>", "\n", "\n\n", " ", "a", "b c", "é", "<", ">", "{"]


def stream(parser: ReasoningParser, text: str, cuts: list[int]) -> tuple[str, str]:
    reasoning = content = ""
    previous = 0
    for cut in [*sorted(c for c in cuts if c <= len(text)), len(text)]:
        r, c = parser.feed(text[previous:cut])
        reasoning, content, previous = reasoning + r, content + c, cut
    r, c = parser.feed("", final=True)
    return reasoning + r, content + c


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=14), st.lists(st.integers(0, 80), max_size=8), st.booleans())
def test_streamed_equals_whole_at_any_cut(pieces: list[str], cuts: list[int], opened: bool) -> None:
    text = "".join(pieces)
    assert stream(ReasoningParser(THINK, opened), text, cuts) == split(THINK, text, opened)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_thinking_and_answer_come_back_apart(thinking: str, answer: str) -> None:
    """What a template writes (tags, newlines inside them and after) splits back into its parts."""
    thinking, answer = thinking.replace("</think>", "").strip("\n"), answer.replace("</think>", "").lstrip("\n")
    reasoning, content = split(THINK, f"<think>\n{thinking}\n</think>\n\n{answer}")
    assert (reasoning, content) == (thinking, answer)


@pytest.mark.parametrize(
    ("text", "opened", "expected"),
    [
        ("<think>\nhmm\n</think>\n\nAnswer", False, ("hmm", "Answer")),
        ("Answer only", False, ("", "Answer only")),
        ("  <think>x</think>y", False, ("x", "y")),
        ("deep\n</think>\n\nA", True, ("deep", "A")),  # the template opened the block
        ("<think>\ncut short by max_tokens", False, ("cut short by max_tokens", "")),
        ("cut short", True, ("cut short", "")),
        ("<thi", False, ("", "<thi")),  # an answer that only began like a tag is content
        ("<think>\n\n</think>\n\n", False, ("", "")),
        ("a < b and </thinking> is text", False, ("", "a < b and </thinking> is text")),
    ],
)
def test_examples(text: str, opened: bool, expected: tuple[str, str]) -> None:
    assert split(THINK, text, opened) == expected


def test_none_keeps_the_tags_as_content() -> None:
    assert split(NONE, "<think>x</think>y") == ("", "<think>x</think>y")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out: dict[str, object] = {}
    for kind in ("qwen3", "r1", "r1_opened"):
        out[kind] = build_tokenizer(tmp_path_factory.mktemp(kind), THINK_TOKENS, thinking_template(kind))
    out["plain"] = build_tokenizer(tmp_path_factory.mktemp("plain"))
    return out


def test_formats_are_read_from_the_templates(tokenizers: dict[str, object]) -> None:
    qwen3, r1, opened, plain = (tokenizers[k] for k in ("qwen3", "r1", "r1_opened", "plain"))
    assert detect(qwen3).kind == "think" and detect(qwen3).switch == "enable_thinking"
    assert detect(r1).kind == "think" and detect(r1).switch is None
    assert detect(opened).kind == "think"
    assert detect(plain) == NONE and detect(plain, "think").kind == "think" and detect(qwen3, "none") == NONE
    assert detect(qwen3).end_ids == (qwen3.convert_tokens_to_ids("</think>"),)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="reasoning parser"):
        detect(qwen3, "harmonica")


def test_whether_the_prompt_opens_the_thinking(tokenizers: dict[str, object]) -> None:
    chat = [{"role": "user", "content": "Why is the sky blue?"}]

    def prompt(kind: str, **kwargs: object) -> list[int]:
        tok = tokenizers[kind]
        text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, **kwargs)  # type: ignore[attr-defined]
        return list(tok.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]

    assert not prompt_opens(detect(tokenizers["qwen3"]), tokenizers["qwen3"], prompt("qwen3"))
    closed = prompt("qwen3", enable_thinking=False)  # an empty block, closed
    assert not prompt_opens(detect(tokenizers["qwen3"]), tokenizers["qwen3"], closed)
    assert not prompt_opens(detect(tokenizers["r1"]), tokenizers["r1"], prompt("r1"))
    assert prompt_opens(detect(tokenizers["r1_opened"]), tokenizers["r1_opened"], prompt("r1_opened"))


def test_the_vendored_templates_are_the_models_own() -> None:
    data = Path(__file__).parents[1] / "data"
    qwen3 = (data / "qwen3_chat_template.jinja").read_text()
    assert "enable_thinking is defined and enable_thinking is false" in qwen3 and "reasoning_content" in qwen3
    assert "<｜Assistant｜>" in (data / "deepseek_r1_distill_chat_template.jinja").read_text()


CALL_PIECES = [
    *PIECES,
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
    "<tool_",
    "call>",
    '{"name": "f", ',
]


@settings(max_examples=800, deadline=None)
@given(st.lists(st.sampled_from(CALL_PIECES), max_size=12), st.lists(st.integers(0, 120), max_size=8), st.booleans())
def test_thinking_then_tool_calls_streamed_equal_whole(pieces: list[str], cuts: list[int], opened: bool) -> None:
    """The server's order (server/events.py): the thinking split off first, the tool-call parser on
    the content; over any cut, the streamed thinking, content and calls equal the whole answer's."""
    from fulmine.server.tool_calls import StreamParser, parse

    text = "".join(pieces)
    thinking_whole, content_whole = split(THINK, text, opened)
    expected = (thinking_whole, *parse(content_whole, "hermes", {"f"}))
    reasoning, tools = ReasoningParser(THINK, opened), StreamParser("hermes", {"f"}, True)
    thought, content, calls = "", "", []
    bounds = [*sorted(c for c in cuts if c <= len(text)), len(text)]
    for start, end in zip([0, *bounds], [*bounds, len(text)]):
        final = end == len(text) and start == bounds[-1]
        r, c = reasoning.feed(text[start:end], final=final)
        visible, deltas = tools.feed(c, final=final)
        thought, content = thought + r, content + visible
        calls += [d.call for d in deltas if d.started]
    got = (thought, content, [(call.name, call.arguments) for call in calls])
    assert got == (expected[0], expected[1], [(call.name, call.arguments) for call in expected[2]])
