"""Chat templates: a model's Jinja template rendered over a conversation, in a sandbox.

The environment is the one the Hugging Face ecosystem renders templates in (transformers'
`apply_chat_template`), so a model's template means here what its authors tested it to mean:
blocks trimmed, `loopcontrols`, a `tojson` that keeps non-ASCII text and does not escape HTML,
`raise_exception`, `strftime_now`, and a namespace that refuses underscore names. Reasoning given
under an older name (`reasoning`, `thinking`) is also offered as `reasoning_content`, and as
`thinking` for the templates that read that. Everything a template sees is plain JSON data.
Tests compare the rendering with transformers' on every template the project ships or meets.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fulmine.config import ConfigError

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def pick(template: str | dict[str, str] | None, tools: Any = None) -> str | None:
    """The template to render: a model with several named templates renders "tool_use" when it is
    given tools and has one, else "default"."""
    if not isinstance(template, dict):
        return template
    if tools and "tool_use" in template:
        return template["tool_use"]
    return template.get("default")


def render(
    template: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """The conversation as the template writes it. `variables`: the special tokens (bos_token, ...)
    and the template's own switches (enable_thinking, ...). A template that fails raises its error."""
    chat = [_aliased(message) for message in _plain(messages)]
    return _compiled(template).render(
        messages=chat,
        tools=_plain(tools),
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **_plain(variables),
    )


def check(template: str) -> None:
    """ConfigError naming the line where the template's syntax is broken."""
    try:
        _compiled(template)
    except jinja2.TemplateSyntaxError as error:
        raise ConfigError(f"line {error.lineno}: {error.message}", "chat_template") from None


def _aliased(message: Any) -> Any:
    if not isinstance(message, dict):
        raise ConfigError("a chat message is an object")
    reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """A copy of `value` made of plain JSON types only (what a sandboxed template may touch)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return str(value)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore-prefixed names (no reaching CPython's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's own signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")


class _Dict:
    """`dict(...)` in templates, without the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 (the name templates call it with)
    return datetime.now().strftime(format)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (templates that mark the assistant's tokens for
    training): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


@lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace
    )
    return environment.from_string(template)
