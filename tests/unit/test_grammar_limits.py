"""Output constraints bounded before llguidance sees them, each bound a clear 400; at the bounds,
compiling (on its own thread) and every later step (on a thread with a 1 MB stack) are safe."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest

from fulmine.config import ConfigError
from fulmine.request import StructuredOutput as S
from fulmine.sampling import grammar_limits as limits
from fulmine.sampling.grammar import Grammars


def chain(n: int) -> str:
    return "start: r0\n" + "\n".join(f'r{i}: "x" r{i + 1}' for i in range(n)) + f'\nr{n}: "y"\n'


def schema(value: Any) -> S:
    return S("json_schema", json.dumps(value))


REFUSED = {
    "a chain of 5000 rules": (S("grammar", chain(5000)), "bytes"),
    "1200 short rules": (S("grammar", "\n".join(f"r{i}: /a/" for i in range(1200))), "rules"),
    "50 000 alternatives": (S("grammar", "start: " + " | ".join(f'"{i}"' for i in range(50_000))), "bytes"),
    "1500 alternatives": (S("grammar", "start: " + "|".join(f'"{i}"' for i in range(1500))), "alternatives"),
    "brackets 100 deep": (S("grammar", "start: " + "(" * 100 + '"a"' + ")" * 100), "nested"),
    "2000 choices": (S("choice", json.dumps([f"o{i}" for i in range(2000)])), "choices"),
    "a long choice": (S("choice", json.dumps(["a" * 5000])), "characters"),
    "a regex repeat": (S("regex", "a{0,100000}"), "repetition"),
    "regex groups 100 deep": (S("regex", "(" * 100 + "a" + ")" * 100), "nested"),
    "minLength a million": (schema({"type": "string", "pattern": "^(a+)+$", "minLength": 1_000_000}), "minLength"),
    "maxItems a million": (schema({"type": "array", "maxItems": 1_000_000}), "maxItems"),
    "a schema 200 deep": (
        S("json_schema", '{"type":"object","properties":{"a":' * 200 + '{"type":"string"}' + "}}" * 200),
        "nested",
    ),
    "a schema 960 deep in lists": (S("json_schema", '{"anyOf": [' * 960 + "{}" + "]}" * 960), "nested"),
    "an enum of 5000": (schema({"enum": list(range(5000))}), "enum"),
    "required recursion": (
        schema({"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}),
        "no finite JSON value",
    ),
    "mutual recursion": (
        schema(
            {
                "$defs": {
                    "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
                    "b": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "required": ["a"]},
                },
                "$ref": "#/$defs/a",
            }
        ),
        "no finite JSON value",
    ),
}
NODE = {"$ref": "#/$defs/node"}
ACCEPTED = {
    "optional recursion": schema({"type": "object", "properties": {"x": {"$ref": "#"}}}),
    "recursion with a way out": schema({"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": "#"}}]}),
    "a tree": schema(
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                    "required": ["kids"],
                }
            },  # fmt: skip
            "$ref": "#/$defs/node",
        }
    ),
    "a schema 60 deep": S("json_schema", '{"type":"object","properties":{"a":' * 60 + '{"type":"string"}' + "}}" * 60),
    "999 chained rules": S("grammar", chain(998)),
    "999 alternatives": S("grammar", "start: " + " | ".join(f'"w{i}"' for i in range(999))),
    "1000 choices": S("choice", json.dumps([f"o{i}" for i in range(1000)])),
    "brackets 24 deep": S("grammar", "start: " + "(" * 24 + '"a"' + ")" * 24),
    "a regex at its bound": S("regex", "a{0,10000}"),
}


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    from fulmine.models.source import resolve
    from fulmine.tokenizer import load_tokenizer

    source = resolve(None)
    return Grammars(load_tokenizer(source, False), source.config.vocab_size, source.config.eos_token_ids)


@pytest.mark.parametrize("name", REFUSED)
def test_past_a_bound_is_refused_naming_it(grammars: Grammars, name: str) -> None:
    structured, words = REFUSED[name]
    with pytest.raises(ConfigError, match=words) as error:
        grammars.check(structured)
    assert error.value.param == "response_format"


@pytest.mark.parametrize(
    "structured", [S("regex", r"[^\s\S]"), S("grammar", 'start: start "a"')], ids=["empty-class", "left-recursion"]
)
def test_an_unsatisfiable_constraint_is_refused(grammars: Grammars, structured: S) -> None:
    with pytest.raises(ConfigError, match="nothing can satisfy"):
        grammars.check(structured)


@pytest.mark.parametrize("name", ACCEPTED)
def test_at_the_bounds_every_step_runs_on_a_small_stack(grammars: Grammars, name: str) -> None:
    """Compiled on the compiler thread; copies, masks and tokens consumed on a 1 MB stack (the mask
    worker and the engine thread have 8 MB by default)."""
    grammars.check(ACCEPTED[name])
    result: list[Any] = []

    def steps() -> None:
        matcher = grammars.matcher(ACCEPTED[name])
        bits = np.zeros((grammars._vocab_size + 31) // 32, dtype=np.int32)
        for _ in range(20):
            matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            allowed = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little"))
            if matcher.is_stopped() or not len(allowed):
                break
            assert matcher.consume_token(int(allowed[-1]))
        result.append(matcher.is_error())

    previous = threading.stack_size(1 << 20)
    try:
        thread = threading.Thread(target=steps)
        thread.start()
    finally:
        threading.stack_size(previous)
    thread.join()
    assert result == [False]


def test_the_cache_is_bounded_in_bytes(grammars: Grammars, monkeypatch: pytest.MonkeyPatch) -> None:
    from fulmine.sampling import grammar

    monkeypatch.setattr(grammar, "CACHE_BYTES", 3 * grammar.CACHE_BYTES_FIXED)
    for i in range(6):
        grammars.check(S("regex", f"x{i}[a-z]+"))
    assert len(grammars._cache) <= 3 and grammars._cache_bytes <= 3 * grammar.CACHE_BYTES_FIXED + 10_000


def test_nesting_skips_quoted_brackets() -> None:
    assert limits.nesting('start: "((((" ("a")') == 1
