"""Bounds on an output constraint, checked in plain Python before any third-party compiler sees it.

llguidance compiles grammars in the server's process, in native code: a chain of 5000 Lark rules
overflowed its stack (the process died), 50 000 alternatives took seconds, a schema nested 960
levels deep overflowed Python's own recursion in json.dumps. Each bound below is a 400 naming it.
Measured on llguidance 1.9 (tests/unit/test_grammar_limits.py compiles a constraint at every
bound, on a thread with a quarter of a default thread's stack): a 2600-rule chain compiles in
0.1 s; 2000 alternatives in 30 ms; the limits leave that margin.

A JSON schema whose every value nests forever (a required property referring back to its own
object) has no finite instance: refused here too, since a grammar for it only ever runs to
max_tokens.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fulmine.config import ConfigError
from fulmine.request import StructuredOutput

MAX_SPEC_BYTES = {"json_schema": 256 * 1024, "regex": 16 * 1024, "choice": 256 * 1024, "grammar": 64 * 1024}
MAX_RULES = 1000  # Lark rules in a grammar
MAX_ALTERNATIVES = 1000  # `|` in a grammar, entries of a choice, an enum's values
MAX_NESTING = 64  # groups inside groups (regexes), schemas inside schemas
MAX_GRAMMAR_NESTING = 24  # brackets inside brackets in a Lark grammar (llguidance refuses 30)
MAX_SUBSCHEMAS = 5000  # objects in a JSON schema
MAX_REPEAT = 10_000  # {n,m} bounds in a regex; minLength, maxItems... in a schema
MAX_CHOICE_CHARS = 4096  # one choice
MAX_FIXPOINT_PASSES = 32

_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_RULE = re.compile(r"^\s*[?!]?[A-Za-z_][\w.]*(?:\{[^}\n]*\})?\s*(?:\.\s*-?\d+\s*)?(?::|::=)", re.MULTILINE)
_COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains",
                   "maxContains")  # fmt: skip


def bound(structured: StructuredOutput) -> None:
    """Raise ConfigError (param response_format) if the constraint is past a bound."""
    kind, spec = structured.kind, structured.spec
    limit = MAX_SPEC_BYTES.get(kind)
    if limit is not None and len(spec.encode("utf-8", "surrogatepass")) > limit:
        _refuse(f"{kind}: {len(spec.encode('utf-8', 'surrogatepass'))} bytes; at most {limit} are accepted")
    if kind == "regex":
        _bound_regex(spec, "regex")
    elif kind == "grammar":
        _bound_grammar(spec)
    elif kind == "choice":
        _bound_choice(spec)
    elif kind == "json_schema":
        _bound_schema(spec)


def _refuse(message: str) -> None:
    raise ConfigError(message, "response_format")


def nesting(text: str, opening: str = "([{", closing: str = ")]}") -> int:
    """The deepest bracket nesting in `text`, quoted strings and escapes skipped (an upper bound)."""
    depth = deepest = 0
    quote, escaped = "", False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "\"'" and opening != "(":  # grammars quote their literals; regexes do not
            quote = char
        elif char in opening:
            depth += 1
            deepest = max(deepest, depth)
        elif char in closing:
            depth = max(depth - 1, 0)
    return deepest


def _bound_regex(pattern: str, what: str) -> None:
    depth = nesting(pattern, "(", ")")
    if depth > MAX_NESTING:
        _refuse(f"{what}: groups nested {depth} deep; at most {MAX_NESTING}")
    _bound_repeats(pattern, what)


def _bound_repeats(text: str, what: str) -> None:
    """Every {n} / {n,m} repetition bound in `text` at most MAX_REPEAT."""
    for match in _REPEAT.finditer(text):
        for number in match.groups():
            if number and int(number) > MAX_REPEAT:
                _refuse(f"{what}: the repetition {match.group(0)} is past the bound of {MAX_REPEAT}")


def _outside_quotes(text: str) -> str:
    """The grammar with its quoted literals and /regex/ literals blanked."""
    return re.sub(r'"(?:[^"\\\n]|\\.)*"|/(?:[^/\\\n]|\\.)+/[imslux]*', '""', text)


def _bound_grammar(spec: str) -> None:
    bare = _outside_quotes(spec)
    rules = len(_RULE.findall(bare))
    if rules > MAX_RULES:
        _refuse(f"grammar: {rules} rules; at most {MAX_RULES}")
    alternatives = bare.count("|")
    if alternatives > MAX_ALTERNATIVES:
        _refuse(f"grammar: {alternatives} alternatives (|); at most {MAX_ALTERNATIVES}")
    depth = nesting(bare)
    if depth > MAX_GRAMMAR_NESTING:
        _refuse(f"grammar: brackets nested {depth} deep; at most {MAX_GRAMMAR_NESTING}")
    for literal in re.findall(r"/((?:[^/\\\n]|\\.)+)/", spec):
        _bound_regex(literal, "grammar")
    _bound_repeats(bare, "grammar")


def _bound_choice(spec: str) -> None:
    try:
        choices = json.loads(spec)
    except (json.JSONDecodeError, RecursionError):
        return  # grammar_text says what is wrong with it
    if isinstance(choices, list):
        if len(choices) > MAX_ALTERNATIVES:
            _refuse(f"choice: {len(choices)} choices; at most {MAX_ALTERNATIVES}")
        if any(isinstance(c, str) and len(c) > MAX_CHOICE_CHARS for c in choices):
            _refuse(f"choice: a choice of more than {MAX_CHOICE_CHARS} characters")


def _bound_schema(spec: str) -> None:
    if nesting(spec, "[{", "]}") > MAX_NESTING * 2:  # before json.loads, whose recursion it bounds
        _refuse(f"json_schema: nested more than {MAX_NESTING} schemas deep")
    try:
        schema = json.loads(spec)
    except (json.JSONDecodeError, RecursionError):
        return  # grammar_text says what is wrong with it
    bound_schema(schema)


def bound_schema(schema: Any) -> None:
    """A parsed JSON schema's bounds (tool parameters are checked with it too), and that some finite
    value satisfies it."""
    count = 0
    stack: list[tuple[Any, int]] = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING * 2:  # a schema level is an object inside an object (properties, then the schema)
            _refuse(f"json_schema: nested more than {MAX_NESTING} schemas deep")
        if isinstance(node, dict):
            count += 1
            if count > MAX_SUBSCHEMAS:
                _refuse(f"json_schema: more than {MAX_SUBSCHEMAS} subschemas")
            for keyword in _COUNT_KEYWORDS:
                value = node.get(keyword)
                if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_REPEAT:
                    _refuse(f"json_schema: {keyword} {value} is past the bound of {MAX_REPEAT}")
            for keyword in ("enum", "anyOf", "oneOf", "allOf", "prefixItems"):
                value = node.get(keyword)
                if isinstance(value, list) and len(value) > MAX_ALTERNATIVES:
                    _refuse(f"json_schema: {keyword} has {len(value)} entries; at most {MAX_ALTERNATIVES}")
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                if len(pattern) > MAX_SPEC_BYTES["regex"]:
                    _refuse(f"json_schema: a pattern of {len(pattern)} characters; at most {MAX_SPEC_BYTES['regex']}")
                _bound_regex(pattern, "json_schema pattern")
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
    if isinstance(schema, dict) and not _has_finite_instance(schema):
        _refuse("json_schema: no finite JSON value satisfies it (a required property nests it forever)")


def _has_finite_instance(root: dict[str, Any]) -> bool:
    """Whether some finite value satisfies the schema, by a least fixpoint over its subschemas: a
    subschema is finite once one of its types is (a scalar always; an object once its required
    properties are; an array once its items are or it may be empty); $ref, allOf need every part,
    anyOf / oneOf one. Conservative: what it cannot read counts as finite."""
    nodes: dict[int, dict[str, Any]] = {}
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if id(node) in nodes:
                continue
            nodes[id(node)] = node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    finite: set[int] = set()

    def ok(schema: Any) -> bool:
        return not isinstance(schema, dict) or id(schema) in finite or schema is True

    def resolve(ref: str) -> Any:
        if not ref.startswith("#"):
            return None
        target: Any = root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        return target

    def finite_now(schema: dict[str, Any]) -> bool:
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = resolve(ref)
            if isinstance(target, dict) and not ok(target):
                return False
        for keyword in ("allOf",):
            if isinstance(schema.get(keyword), list) and not all(ok(s) for s in schema[keyword]):
                return False
        for keyword in ("anyOf", "oneOf"):
            if isinstance(schema.get(keyword), list) and schema[keyword] and not any(ok(s) for s in schema[keyword]):
                return False
        types = schema.get("type")
        types = [types] if isinstance(types, str) else types if isinstance(types, list) else None
        if types is not None and any(t not in ("object", "array") for t in types):
            return True  # a scalar (or a type the compiler will name as wrong)
        if "enum" in schema or "const" in schema:
            return True
        if types is None or "object" in types:
            properties: dict[str, Any] = schema["properties"] if isinstance(schema.get("properties"), dict) else {}
            required: list[Any] = schema["required"] if isinstance(schema.get("required"), list) else []
            if all(ok(properties.get(name)) for name in required if isinstance(name, str)):
                return True
        if types is None or "array" in types:
            min_items = schema.get("minItems", 0)
            if not isinstance(min_items, int) or min_items <= 0 or ok(schema.get("items")):
                return True
        return False

    order = list(nodes.items())[::-1]  # descendants before their ancestors: a tree settles in one pass
    for _ in range(MAX_FIXPOINT_PASSES):  # each further pass follows $refs one more step
        changed = False
        for key, schema in order:
            if key not in finite and finite_now(schema):
                finite.add(key)
                changed = True
        if not changed:
            return id(root) in finite
    return True  # not settled: say nothing
