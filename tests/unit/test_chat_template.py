"""fulmine renders chat templates and reads tokenizers without transformers: the same text and the
same tokens as transformers' own, on every template the project ships or meets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import SecurityError

from fulmine.config import ConfigError
from fulmine.models.source import resolve
from fulmine.tokenizer import Tokenizer, load_tokenizer
from tests.conftest import THINK_TOKENS, build_tokenizer, thinking_template
from tests.unit.test_detokenizer import assert_same_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city — «ünïcode»",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<b>東京</b> {{ x }} {% raw %}"}],
    [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "They want weather.", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees.", "reasoning": "Older name for the reasoning."},
        {"role": "user", "content": "Thanks"},
    ],
]


def _templates(tmp: Path) -> dict[str, Any]:
    """The transformers tokenizers whose templates are compared: ChatML, Qwen3's, R1's (both
    revisions), the embedded model's, and the real files' where they were fetched."""
    out: dict[str, Any] = {"chatml": build_tokenizer(tmp / "chatml")}
    for kind in ("qwen3", "r1", "r1_opened"):
        out[kind] = build_tokenizer(tmp / kind, THINK_TOKENS, thinking_template(kind))
    return out


@pytest.fixture(scope="module")
def theirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _templates(tmp_path_factory.mktemp("templates"))


@pytest.mark.parametrize("kind", ["chatml", "qwen3", "r1", "r1_opened"])
def test_a_directory_reads_as_transformers_reads_it(theirs: dict[str, Any], kind: str, tmp_path: Path) -> None:
    theirs[kind].save_pretrained(tmp_path)
    ours = Tokenizer.from_directory(tmp_path)
    assert_same_tokenizer(ours, theirs[kind])
    assert ours.get_added_vocab() == theirs[kind].get_added_vocab()
    assert len(ours) == len(theirs[kind])
    for token in THINK_TOKENS:
        assert ours.convert_tokens_to_ids(token) == theirs[kind].convert_tokens_to_ids(token)


@pytest.mark.parametrize("kind", ["chatml", "qwen3", "r1", "r1_opened"])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_the_same_prompt_as_transformers(theirs: dict[str, Any], kind: str, index: int) -> None:
    ours = Tokenizer.from_transformers(theirs[kind])
    chat = CONVERSATIONS[index]
    for tools in (None, TOOLS):
        for variables in ({}, {"enable_thinking": False}):
            expected = theirs[kind].apply_chat_template(
                chat, tools=tools, add_generation_prompt=True, tokenize=False, **variables
            )
            assert ours.apply_chat_template(chat, tools=tools, **variables) == expected


def assert_same_prompts(ours: Tokenizer, theirs: Any) -> None:
    """Every conversation, with and without tools, written the same (a model without a template: none)."""
    assert ours.chat_template == theirs.chat_template
    if theirs.chat_template is None:
        return
    for chat in CONVERSATIONS:
        for tools in (None, TOOLS):
            expected = theirs.apply_chat_template(chat, tools=tools, add_generation_prompt=True, tokenize=False)
            assert ours.apply_chat_template(chat, tools=tools) == expected


def test_the_embedded_models_template() -> None:
    """(The real files' templates: tests/parity/test_real_models.py.)"""
    from fulmine.tokenizer import _from_gguf

    source = resolve(None)
    assert_same_prompts(load_tokenizer(source), _from_gguf(source))


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    turns=st.lists(st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), _TEXT), min_size=1, max_size=5),
    thinking=st.none() | _TEXT,
    enable=st.booleans(),
)
def test_any_conversation_renders_as_transformers_renders_it(
    theirs: dict[str, Any], turns: list[tuple[str, str]], thinking: str | None, enable: bool
) -> None:
    chat: list[dict[str, Any]] = [{"role": role, "content": text} for role, text in turns]
    if thinking is not None and chat[-1]["role"] == "assistant":
        chat[-1]["reasoning_content"] = thinking
    for kind in ("qwen3", "r1"):
        try:
            expected = theirs[kind].apply_chat_template(
                chat, add_generation_prompt=True, tokenize=False, enable_thinking=enable
            )
        except Exception as error:  # noqa: BLE001 (a conversation the template refuses: refused here too)
            with pytest.raises(type(error)):
                Tokenizer.from_transformers(theirs[kind]).apply_chat_template(chat, enable_thinking=enable)
            continue
        assert Tokenizer.from_transformers(theirs[kind]).apply_chat_template(chat, enable_thinking=enable) == expected


def test_template_errors_and_escapes_are_refused() -> None:
    from fulmine import chat_template

    with pytest.raises(ConfigError, match="line 1"):
        chat_template.check("{% for m in messages %}")
    raising = "{{ raise_exception('no system role') }}"
    with pytest.raises(Exception, match="no system role"):
        chat_template.render(raising, [{"role": "user", "content": "x"}])
    assert chat_template.render("{{ messages.__class__ }}", [{"role": "user", "content": "x"}]) == ""
    with pytest.raises(SecurityError):
        chat_template.render("{% set ns = namespace() %}{% set ns._x = 1 %}", [])


def test_special_tokens_named_only_in_the_legacy_map(theirs: dict[str, Any], tmp_path: Path) -> None:
    """Older repositories name their special tokens in special_tokens_map.json only."""
    import json

    theirs["chatml"].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for name in ("eos_token", "bos_token", "pad_token"):
        config.pop(name, None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    ours = Tokenizer.from_directory(tmp_path)
    assert ours.eos_token_id == theirs["chatml"].eos_token_id and ours.bos_token_id is None
