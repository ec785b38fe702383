"""OpenAI's request shapes as pydantic models (pydantic's only home); the fields every response
body shares are in bodies.py.

Requests are validated strictly: a field OpenAI does not define is rejected (as OpenAI does), a
field that would change the output and that fulmine does not implement yet is rejected with a
clear message, and fields that do not change the output (user, metadata, store, ...) are
accepted. Responses are plain dicts in OpenAI's shapes, plus `timing` (per-request seconds).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fulmine.config import EFFORTS
from fulmine.request import INT64_MAX, INT64_MIN, SLO, SamplingParams, StructuredOutput
from fulmine.sampling.grammar import closed_objects

MAX_STOP_SEQUENCES = 4
# Every integer a request carries fits the engine's 64-bit integers; larger ones are a 400 here.
# (Only in a union or a list: a field of its own with Field(ge=...) would lose that bound to this one.)
# JSON's types as OpenAI's API reads them: no booleans or numeric strings for numbers (`true` is not 1 ms)
Int = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]
Number = Annotated[float, Field(strict=True)]
Count = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]  # (a field's own Field(ge=...) narrows it)
Positive = Annotated[int, Field(strict=True, ge=1, le=INT64_MAX)]
_TOKEN_ID = re.compile(r"^-?[0-9]{1,19}$")


class RequestError(Exception):
    """A client mistake: becomes a 4xx in OpenAI's error shape."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        error_type: str = "invalid_request_error",
        retry_after_s: int = 1,  # with 429 and 503: the Retry-After header
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.error_type = message, param, code, status, error_type
        self.retry_after_s = retry_after_s


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN and Infinity parse as JSON here


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # tool_calls, refusal, ...: checked in `text`
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise RequestError(f"messages[{index}].content is required", f"messages[{index}].content")
        return text_of(self.content, f"messages[{index}].content")

    def as_dict(self, index: int) -> dict[str, Any]:
        """The message as the chat template takes it: role, text, and an assistant's tool calls or a
        tool result's call id (checked here: a malformed call is a 400, not a template error)."""
        if self.role == "function":
            raise RequestError("function messages are deprecated: use tool messages", f"messages[{index}].role")
        extra = self.model_extra or {}
        calls = extra.get("tool_calls")
        if self.role == "assistant" and calls:
            if not isinstance(calls, list) or not all(_is_call(c) for c in calls):
                raise RequestError(
                    "tool_calls entries are {id, type: function, function: {name, arguments}}",
                    f"messages[{index}].tool_calls",
                )
            return {"role": "assistant", "content": self.text(index), "tool_calls": calls, **self._reasoning(index)}
        if self.role == "tool":
            if not isinstance(extra.get("tool_call_id"), str):
                raise RequestError("a tool message needs its tool_call_id", f"messages[{index}].tool_call_id")
            return {"role": "tool", "content": self.text(index), "tool_call_id": extra["tool_call_id"]}
        return {
            "role": self.role,
            "content": self.text(index),
            **(self._reasoning(index) if self.role == "assistant" else {}),
        }

    def _reasoning(self, index: int) -> dict[str, str]:
        """An earlier answer's thinking, under either name, for the template to keep or drop as it does."""
        extra = self.model_extra or {}
        value = extra.get("reasoning_content", extra.get("reasoning"))
        if value is None:
            return {}
        if not isinstance(value, str):
            raise RequestError("reasoning_content is a string", f"messages[{index}].reasoning_content")
        return {"reasoning_content": value}


def text_of(content: Any, where: str, kinds: tuple[str, ...] = ("text",)) -> str:
    """A message's text: a string, or the concatenated text of its parts (OpenAI's content parts,
    Anthropic's blocks, Responses' input_text / output_text); any other part is a 400 naming it."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where} is a string or a list of content parts", where)
    pieces = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}[{i}]: only text parts are supported here (got type {kind!r})", where)
        pieces.append(part["text"])
    return "".join(pieces)


def _is_call(call: Any) -> bool:
    function = call.get("function") if isinstance(call, dict) else None
    return (
        isinstance(function, dict)
        and isinstance(function.get("name"), str)
        and isinstance(function.get("arguments"), str)
    )


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class LatencyTargets(_Strict):
    """fulmine's `slo` extension: the request's first token within ttft_ms, each next within itl_ms, a
    reasoning model's first answer token within ttfat_ms (its thinking budgeted to fit)."""

    ttft_ms: Number | None = Field(None, gt=0, le=3.6e6)
    itl_ms: Number | None = Field(None, gt=0, le=3.6e6)
    ttfat_ms: Number | None = Field(None, gt=0, le=3.6e6)  # the first answer token, after any thinking


class _Sampling(_Strict):
    """Fields shared by chat and text completions (fulmine extensions marked)."""

    model: str
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0.0, le=2.0)
    top_p: Number | None = Field(None, gt=0.0, le=1.0)
    n: Positive = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: Number | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Number | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: Int | None = None
    user: str | None = None
    # extensions (vLLM's names), reachable from the openai client through extra_body
    top_k: Int | None = Field(None, ge=-1)
    min_p: Number | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Number | None = Field(None, gt=0.0, le=10.0)
    min_tokens: Count = 0
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = None
    # structured outputs: OpenAI's response_format; vLLM's guided_* and structured_outputs extensions
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    # latency targets (fulmine's extension): refused with 429 at once if they cannot be met
    slo: LatencyTargets | None = None

    def structured(self) -> StructuredOutput | None:
        """The request's output constraint, from whichever field names it (at most one)."""
        found: list[tuple[str, StructuredOutput]] = []
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type")
            if kind == "json_object":
                found.append(("response_format", StructuredOutput("json_object")))
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                    raise RequestError("response_format.json_schema must be an object with a schema", "response_format")
                schema = spec.get("schema", {})  # OpenAI: a missing schema means any JSON
                if spec.get("strict") is True:
                    schema = closed_objects(schema)
                found.append(("response_format", StructuredOutput("json_schema", json.dumps(schema))))
            elif kind not in (None, "text"):
                raise RequestError(
                    f"response_format type {kind!r}: use text, json_object or json_schema", "response_format"
                )
        extension = dict(self.structured_outputs or {})
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice")):
            if getattr(self, name) is not None:
                extension.setdefault(key, getattr(self, name))
        if self.guided_grammar is not None:
            extension.setdefault("grammar", self.guided_grammar)
        for key, value in extension.items():
            if key == "json":
                text = value if isinstance(value, str) else json.dumps(value)
                found.append((f"structured_outputs.{key}", StructuredOutput("json_schema", text)))
            elif key == "regex" and isinstance(value, str):
                found.append((f"structured_outputs.{key}", StructuredOutput("regex", value)))
            elif key == "choice" and isinstance(value, list):
                found.append((f"structured_outputs.{key}", StructuredOutput("choice", json.dumps(value))))
            elif key in ("grammar", "lark") and isinstance(value, str):
                found.append((f"structured_outputs.{key}", StructuredOutput("grammar", value)))
            elif key == "json_object" and value:
                found.append((f"structured_outputs.{key}", StructuredOutput("json_object")))
            else:
                raise RequestError(
                    f"structured_outputs.{key}: expected json, regex, choice or grammar", "structured_outputs"
                )
        if len(found) > 1:
            names = ", ".join(name for name, _ in found)
            raise RequestError(f"more than one output constraint given ({names}): give one", found[1][0])
        return found[0][1] if found else None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not _TOKEN_ID.match(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError("logit_bias values must be in [-100, 100]")
        return value

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, seed_offset: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=None if self.seed is None else _wrap_int64(self.seed + seed_offset),
            stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            min_tokens=self.min_tokens,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            structured=self.structured(),
            slo=SLO(self.slo.ttft_ms, self.slo.itl_ms, self.slo.ttfat_ms) if self.slo is not None else None,
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # reasoning models: OpenAI's effort, and the template's own variables (vLLM's chat_template_kwargs)
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_budget: Count | None = None  # fulmine's: most thinking tokens (beside or instead of an effort)
    # accepted, no effect on the output
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    # would change the output, not supported yet
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None

    def check_supported(self) -> None:
        self.structured()  # a malformed constraint is refused before anything runs
        if self.modalities not in (None, ["text"]) or self.audio:
            raise RequestError("only text output is supported", "modalities")
        check_effort(self.reasoning_effort, "reasoning_effort")
        check_template_kwargs(self.chat_template_kwargs)
        for name in ("prediction", "verbosity", "web_search_options", "moderation"):
            if getattr(self, name) is not None:
                raise RequestError(f"{name} is not supported yet", name)
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")

    def tool_choice_value(self) -> Any:
        if self.tool_choice is not None:
            return self.tool_choice
        if isinstance(self.function_call, dict):
            return {"type": "function", "function": self.function_call}
        return self.function_call

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    echo: bool = False
    logprobs: Int | None = Field(None, ge=0, le=20)
    best_of: Int | None = Field(None, ge=1)
    suffix: str | None = None

    def check_supported(self) -> None:
        self.structured()
        if self.suffix:
            raise RequestError("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of other than n is not supported yet", "best_of")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, seed_offset: int) -> SamplingParams:
        params = super().sampling_params(max_tokens, logprobs, seed_offset)
        if self.echo and self.logprobs is not None:  # the echoed prompt is scored too
            params.prompt_logprobs = self.logprobs
        return params

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise RequestError("prompt must not be empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


def check_effort(effort: str | None, param: str) -> None:
    if effort is not None and effort not in EFFORTS:
        raise RequestError(f"{param} must be one of {', '.join(EFFORTS)} (got {effort!r})", param)


# what a template's renderer takes itself: a request's chat_template_kwargs may not name them
_TEMPLATE_OWN = {"messages", "tools", "add_generation_prompt", "tokenize", "documents", "continue_final_message"}
_MAX_TEMPLATE_KWARGS = 32


def check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    """A template's variables: a few plain JSON values under names the renderer does not take itself."""
    if not kwargs:
        return
    if len(kwargs) > _MAX_TEMPLATE_KWARGS or len(json.dumps(kwargs)) > 4096:
        raise RequestError("chat_template_kwargs: at most 32 variables, 4 KB", "chat_template_kwargs")
    for name in kwargs:
        if name in _TEMPLATE_OWN or not name.isidentifier():
            raise RequestError(
                f"chat_template_kwargs: {name!r} is not a template variable one may set", "chat_template_kwargs"
            )


def _wrap_int64(value: int) -> int:
    """Choice i of a seeded request uses seed + i, wrapped into the signed 64-bit range."""
    return (value - INT64_MIN) % 2**64 + INT64_MIN


def check_unicode(value: Any, path: str = "") -> None:
    """Raise a 400 naming the first string (or key) that is not valid Unicode: JSON's \\ud800
    escapes decode to lone UTF-16 surrogates, which no tokenizer or response encoder accepts."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise RequestError(
                f"{path or 'the request'} is not valid Unicode: a lone UTF-16 surrogate "
                f"(\\u{ord(value[error.start]):04x}) at character {error.start}; send each surrogate pair "
                "whole, or the character itself",
                path or None,
                "invalid_unicode",
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, f"{path}.{key!r}" if path else repr(key))
            check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_unicode(item, f"{path}[{index}]")
