"""Structured outputs: a request's output constrained to a JSON schema, a regex, a choice of strings
or a Lark grammar, through llguidance (a grammar matcher over the model's own tokenizer).

`Grammars` compiles and checks a request's constraint when it arrives (a schema llguidance cannot
honour is refused there, naming why, never silently dropped) and keeps compiled grammars by their
text, so the next request with the same schema pays nothing. Each constrained request gets a
matcher; before a step samples it, `TokenMasks` computes every such row's allowed tokens as a
bitmask (llguidance drops the GIL: the masks fill on a worker thread while the forward runs), and
the sampler sets every other token's logit to -inf. After the step the matcher consumes the token.

JSON is generated compact by default (no whitespace between tokens beyond ", " and ": "), so a
constrained answer cannot run away in whitespace until max_tokens, the usual failure of flexible-
whitespace JSON grammars.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fulmine.config import ConfigError
from fulmine.request import StructuredOutput
from fulmine.sampling.grammar_limits import bound

# the JSON compiler's options (llguidance JsonCompileOptions): fixed separators, no free whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256  # compiled grammars kept, at most...
CACHE_BYTES = 256 * 2**20  # ...and about this much memory (estimated from each grammar's text)
# a compiled grammar's memory, from its text: a 120-property schema (13 KB of grammar) took 1.2 MB
CACHE_BYTES_PER_CHAR, CACHE_BYTES_FIXED = 96, 64 * 1024
COMPILER_STACK_BYTES = 64 * 2**20


_NAMED_SUBSCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "if", "then", "else", "additionalProperties")


def closed_objects(schema: Any) -> Any:
    """OpenAI's strict mode (`strict: true` on a json_schema response format or a function): the
    output has exactly the schema's properties, so an object schema that does not say otherwise gets
    additionalProperties false (JSON Schema's default is true: a model may then keep adding keys).
    A copy; every subschema (properties, items, combinators, definitions) likewise."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _NAMED_SUBSCHEMAS and isinstance(value, dict):
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMAS:
            out[key] = closed_objects(value)
        else:
            out[key] = value
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_text(structured: StructuredOutput) -> str:
    """The llguidance grammar for a constraint (not yet checked against a tokenizer)."""
    import llguidance

    kind, spec = structured.kind, structured.spec
    if kind in ("json_object", "json_schema"):
        try:
            schema = json.loads(spec) if kind == "json_schema" else {"type": "object"}
        except RecursionError:
            raise ConfigError("the JSON schema is nested too deeply") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, (dict, bool)):
            raise ConfigError("a JSON schema is an object (or true / false)")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        except ValueError as error:
            raise ConfigError(f"the JSON schema cannot be used: {error}") from None
    if kind == "regex":
        try:
            return llguidance.LLMatcher.grammar_from_regex(spec)
        except ValueError as error:
            raise ConfigError(f"the regex cannot be used: {_first_line(str(error))}") from None
    if kind == "choice":
        try:
            choices = json.loads(spec)
        except json.JSONDecodeError:
            choices = None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise ConfigError("choice: a non-empty list of strings")
        return llguidance.grammar_from("choice", json.dumps(choices))
    try:
        return llguidance.grammar_from("grammar", spec)
    except ValueError as error:
        raise ConfigError(f"the grammar cannot be used: {error}") from None


class Grammars:
    """The model's llguidance tokenizer (built on first use, about a second) and a cache of checked,
    compiled grammars; makes a matcher per constrained request (a copy of the compiled one, so the
    engine thread never compiles). Thread-safe.

    A constraint is bounded before llguidance sees it (grammar_limits.py), then compiled and its
    first step's mask computed where it is checked (the server's tokenizer thread, off the engine
    thread): a constraint that fails there, or that nothing can satisfy, is a 400 at admission."""

    def __init__(self, model_tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._model_tokenizer = model_tokenizer  # fulmine.tokenizer.Tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: Any = None
        self._cache: OrderedDict[StructuredOutput, tuple[Any, int]] = OrderedDict()  # -> (matcher, bytes)
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled (cache misses), for /metrics

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                try:
                    self._tokenizer = llguidance.LLTokenizer(
                        self._model_tokenizer.to_json(), n_vocab=self._vocab_size, eos_token=self._eos or None
                    )
                except Exception as error:  # noqa: BLE001 (a tokenizer llguidance cannot read)
                    raise ConfigError(f"structured outputs are not available for this tokenizer: {error}") from None
            return self._tokenizer

    def check(self, structured: StructuredOutput) -> Any:
        """The constraint bounded, compiled and its first step checked; ConfigError (a 400) naming the
        problem. Returns the compiled matcher (the cache's: copy it before use)."""
        with self._lock:
            if structured in self._cache:
                self._cache.move_to_end(structured)
                return self._cache[structured][0]
        bound(structured)
        tokenizer = self.tokenizer
        matcher, grammar = _compiler().submit(self._compile, structured, tokenizer).result()
        size = CACHE_BYTES_PER_CHAR * len(grammar) + CACHE_BYTES_FIXED
        with self._lock:
            self.compiles += 1
            if structured not in self._cache:
                self._cache[structured] = (matcher, size)
                self._cache_bytes += size
            while len(self._cache) > 1 and (len(self._cache) > CACHE_SIZE or self._cache_bytes > CACHE_BYTES):
                _, (_, evicted) = self._cache.popitem(last=False)
                self._cache_bytes -= evicted
        return matcher

    def _compile(self, structured: StructuredOutput, tokenizer: Any) -> tuple[Any, str]:
        """On the compiler thread: the grammar, validated, compiled, and its first step's mask computed
        (on a copy): a grammar failing there is a 400 now, not an error at its first token."""
        import llguidance

        grammar = grammar_text(structured)
        limits = llguidance.LLParserLimits(verbose_errors=False)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer, limits=limits)
        if is_error:
            raise ConfigError(
                f"{structured.kind}: {_first_line(messages[0]) if messages else 'invalid'}", "response_format"
            )
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
        first = matcher.deep_copy()
        bits = np.zeros((self._vocab_size + 31) // 32, dtype=np.int32)
        first.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        if first.is_error() or matcher.is_error():
            error = _first_line(first.get_error() or matcher.get_error())
            if not bits.any() or "NoExtension" in error:  # llguidance found no first token
                error = f"nothing can satisfy this constraint ({error})"
            raise ConfigError(f"{structured.kind}: {error}", "response_format")
        if not bits.any() and not first.is_accepting():
            raise ConfigError(f"{structured.kind}: nothing can satisfy this constraint", "response_format")
        return matcher, grammar

    def matcher(self, structured: StructuredOutput) -> Any:
        """A fresh matcher for one request (a copy of the compiled grammar: no compiling here)."""
        return self.check(structured).deep_copy()


_compiler_pool: ThreadPoolExecutor | None = None
_compiler_lock = threading.Lock()


def _compiler() -> ThreadPoolExecutor:
    """The thread every grammar is compiled on, with a 64 MB stack: llguidance's compiler recurses
    along chains of rules (a default 8 MB thread stack overflowed at ~2750 rules, a 2 MB one under
    1000; grammar_limits allows 1000). Computing masks and consuming tokens do not recurse so."""
    global _compiler_pool
    with _compiler_lock:
        if _compiler_pool is None:
            previous = threading.stack_size(COMPILER_STACK_BYTES)
            try:
                _compiler_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fulmine-grammar")
                _compiler_pool.submit(lambda: None).result()  # its thread starts now, with that stack
            finally:
                threading.stack_size(previous)
        return _compiler_pool


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "invalid"


@dataclass
class MaskEntry:
    """One sampling sequence's allowed tokens this step, a row per draft and one after them."""

    matcher: Any | None  # its grammar's matcher (None: the grammar does not apply, e.g. while it thinks)
    drafts: list[int]
    forced: list[int] = field(default_factory=list)  # row j < len(forced) allows forced[j] alone
    also: int | None = None  # a token the first grammar row allows besides the grammar's (a thinking start)


class TokenMasks:
    """The allowed tokens of a step's constrained rows, filled on a worker thread (started here) while
    the forward runs; the sampler waits for them. A sequence verifying drafts (tokens its grammar
    forces, fed ahead: fast-forward) has a row per draft and one after them: each row's mask is the
    grammar's state after the drafts before it (the matcher walks the drafts, then rolls back; what
    is accepted is consumed after the step). Rows the engine forces (a thinking budget's closing
    tokens) allow one token each; the rows after them follow the grammar, if any, else allow all."""

    _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fulmine-masks")

    def __init__(self, entries: dict[str, MaskEntry], vocab_size: int) -> None:
        self.rows: dict[str, int] = {}  # request id -> its first row
        num_rows = 0
        for request_id, entry in entries.items():
            self.rows[request_id] = num_rows
            num_rows += len(entry.drafts) + 1
        self.vocab_size = vocab_size
        self.bits = torch.zeros(num_rows, (vocab_size + 31) // 32, dtype=torch.int32)
        self.seconds = 0.0  # time spent computing the masks (on the worker thread)
        self._future: Future[None] = self._pool.submit(self._fill, list(entries.values()))

    def _fill(self, entries: list[MaskEntry]) -> None:
        import time

        started = time.perf_counter()
        row_bytes, row = self.bits.shape[1] * 4, 0
        for entry in entries:
            matcher, drafts, forced = entry.matcher, entry.drafts, entry.forced
            rows = len(drafts) + 1
            for j in range(min(len(forced), rows)):
                self._allow(row + j, forced[j])
            first = min(len(forced), rows)
            if matcher is None:
                for j in range(first, rows):
                    self.bits[row + j] = -1  # every bit: no constraint on this row
            else:
                consumed = 0
                for j in range(first, rows):
                    matcher.unsafe_compute_mask_ptr(self.bits[row + j].data_ptr(), row_bytes)
                    if j == first and entry.also is not None:
                        self._allow(row + j, entry.also)
                    # a draft the grammar refuses is not consumed (a refused token would leave the matcher in
                    # an error state for good); verification discards the rows after it
                    if j < len(drafts) and consumed == j - first and matcher.validate_tokens([drafts[j]]) == 1:
                        matcher.consume_token(drafts[j])
                        consumed += 1
                if consumed:
                    matcher.rollback(consumed)
            row += rows
        self.seconds = time.perf_counter() - started

    def _allow(self, row: int, token: int) -> None:
        word, bit = divmod(token, 32)
        value = int(self.bits[row, word]) | (1 << bit)
        self.bits[row, word] = value - (1 << 32) if value >= 1 << 31 else value  # (int32 storage)

    def row_indices(self, request_ids: list[str]) -> list[int]:
        """Each sampled row's mask row (-1: unconstrained); a sequence's rows are consecutive."""
        self._future.result()
        seen: dict[str, int] = {}
        out = []
        for request_id in request_ids:
            if request_id in self.rows:
                out.append(self.rows[request_id] + seen.get(request_id, 0))
                seen[request_id] = seen.get(request_id, 0) + 1
            else:
                out.append(-1)
        return out

    def apply(self, logits: torch.Tensor, request_ids: list[str]) -> None:
        """Every disallowed token of a constrained row gets logit -inf (rows in request_ids order)."""
        for row, mask_row in enumerate(self.row_indices(request_ids)):
            if mask_row >= 0:
                words = self.bits[mask_row].numpy().view(np.uint8)
                allowed = torch.from_numpy(np.unpackbits(words, bitorder="little")[: self.vocab_size].astype(bool))
                logits[row, : self.vocab_size].masked_fill_(~allowed.to(logits.device), float("-inf"))
                logits[row, self.vocab_size :] = float("-inf")

    def wait(self) -> None:
        self._future.result()
