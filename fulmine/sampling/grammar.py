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
from typing import Any

import numpy as np
import torch

from fulmine.config import ConfigError
from fulmine.request import StructuredOutput

# the JSON compiler's options (llguidance JsonCompileOptions): fixed separators, no free whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256


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
        except json.JSONDecodeError as error:
            raise ConfigError(f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, (dict, bool)):
            raise ConfigError("a JSON schema is an object (or true / false)")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        except ValueError as error:
            raise ConfigError(f"the JSON schema cannot be used: {error}") from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
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
    """The model's llguidance tokenizer (built on first use, about a second) and a cache of checked
    grammars; makes a matcher per constrained request. Thread-safe."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: Any = None
        self._cache: OrderedDict[StructuredOutput, str] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled (cache misses), for /metrics

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos or None
                    )
                except Exception as error:  # noqa: BLE001 (a tokenizer llguidance cannot read)
                    raise ConfigError(f"structured outputs are not available for this tokenizer: {error}") from None
            return self._tokenizer

    def check(self, structured: StructuredOutput) -> str:
        """The constraint's grammar, compiled and checked; ConfigError (a 400) naming the problem."""
        import llguidance

        with self._lock:
            if structured in self._cache:
                self._cache.move_to_end(structured)
                return self._cache[structured]
        grammar = grammar_text(structured)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ConfigError(f"{structured.kind}: {messages[0] if messages else 'invalid'}", "response_format")
        with self._lock:
            self.compiles += 1
            self._cache[structured] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, structured: StructuredOutput) -> Any:
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, self.check(structured), log_level=0)
        if matcher.is_error():
            raise ConfigError(f"{structured.kind}: {matcher.get_error()}", "response_format")
        return matcher


class TokenMasks:
    """The allowed tokens of a step's constrained rows, filled on a worker thread (started here) while
    the forward runs; the sampler waits for them. A sequence verifying drafts (tokens its grammar
    forces, fed ahead: fast-forward) has a row per draft and one after them: each row's mask is the
    grammar's state after the drafts before it (the matcher walks the drafts, then rolls back; what
    is accepted is consumed after the step)."""

    _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fulmine-masks")

    def __init__(self, matchers: dict[str, tuple[Any, list[int]]], vocab_size: int) -> None:
        self.rows: dict[str, int] = {}  # request id -> its first row
        num_rows = 0
        for request_id, (_, drafts) in matchers.items():
            self.rows[request_id] = num_rows
            num_rows += len(drafts) + 1
        self.vocab_size = vocab_size
        self.bits = torch.zeros(num_rows, (vocab_size + 31) // 32, dtype=torch.int32)
        self.seconds = 0.0  # time spent computing the masks (on the worker thread)
        self._future: Future[None] = self._pool.submit(self._fill, list(matchers.values()))

    def _fill(self, matchers: list[tuple[Any, list[int]]]) -> None:
        import time

        started = time.perf_counter()
        row_bytes, row = self.bits.shape[1] * 4, 0
        for matcher, drafts in matchers:
            consumed = 0
            for j in range(len(drafts) + 1):
                matcher.unsafe_compute_mask_ptr(self.bits[row + j].data_ptr(), row_bytes)
                # a draft the grammar refuses is not consumed (a refused token would leave the matcher in
                # an error state for good); verification discards the rows after it
                if j < len(drafts) and consumed == j and matcher.validate_tokens([drafts[j]]) == 1:
                    matcher.consume_token(drafts[j])
                    consumed += 1
            if consumed:
                matcher.rollback(consumed)
            row += len(drafts) + 1
        self.seconds = time.perf_counter() - started

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
