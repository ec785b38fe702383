"""A request and its sampling parameters: plain Python, no torch.

A request's `num_computed_tokens` catches up with its `num_tokens` (prompt + generated) one
scheduled chunk at a time; when they meet, the step that computed the last chunk also samples
the next token.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

from fulmine.config import ConfigError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# Temperatures below this sample greedily: dividing logits by ~0 would overflow to inf and NaN.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match. kind: json_object (any JSON object), json_schema (spec: the schema
    as JSON text), regex (spec: the pattern), choice (spec: a JSON list of strings), grammar (spec: a
    Lark grammar, llguidance's dialect; GBNF is accepted too)."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ConfigError(f"structured output kind {self.kind!r} is not one of {', '.join(STRUCTURED_KINDS)}")
        if not isinstance(self.spec, str):
            raise ConfigError("a structured output's spec is text (a schema as JSON, a pattern, a grammar)")


@dataclass(frozen=True)
class SLO:
    """A request's latency targets: its first token within ttft_ms of arrival, then each next one
    within itl_ms of the last (None: no target). The engine admits a request only if it predicts
    both can be met (engine/admission.py), schedules tighter first tokens first, and sizes prompt
    chunks beside the request's stream to keep its inter-token target."""

    ttft_ms: float | None = None
    itl_ms: float | None = None
    # a reasoning model's first answer token (after its thinking) within this: its thinking budget is
    # what the target leaves after the predicted first token (none left: refused)
    ttfat_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "itl_ms", "ttfat_ms"):
            value = getattr(self, name)
            if value is not None and not (_is_real(value) and 0 < value <= 3.6e6):
                raise ConfigError(f"slo.{name} must be a number of milliseconds in (0, 3600000] (got {value!r})", name)

    @property
    def is_empty(self) -> bool:
        return self.ttft_ms is None and self.itl_ms is None and self.ttfat_ms is None


@dataclass
class SamplingParams:
    max_tokens: int | None = 256  # None: up to the context window
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF style: over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI style: over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return with each sampled token
    prompt_logprobs: int | None = None  # same for each prompt token after the first (no prefix cache)
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    structured: StructuredOutput | None = None  # the output must match this (sampling/grammar.py), after any thinking
    reasoning_budget: int | None = None  # at most this many thinking tokens, then the thinking is closed (None: no cap)
    slo: SLO | None = None  # latency targets (not sampling, but per request like the rest)

    def __post_init__(self) -> None:
        if self.stop is None:  # as in OpenAI's API: no stops
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self._check_types()
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.seed is None or INT64_MIN <= self.seed <= INT64_MAX, "seed", "must be a 64-bit signed integer"),
            (0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 or -1 disables it)"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs", "must be in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (self.reasoning_budget is None or self.reasoning_budget >= 0, "reasoning_budget", "must be >= 0"),
            (
                all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
                "logit_bias",
                "values must be in [-100, 100]",
            ),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ConfigError(f"{name} {message} (got {getattr(self, name)!r})", name)

    def _check_types(self) -> None:
        """Every value the engine will see is of its type: ints are ints (not bools), floats finite."""
        for name in ("max_tokens", "top_k", "seed", "logprobs", "prompt_logprobs", "min_tokens", "reasoning_budget"):
            value = getattr(self, name)
            optional = name not in ("top_k", "min_tokens")
            if not (_is_int(value) or (optional and value is None)):
                raise ConfigError(f"{name} must be an integer (got {value!r})", name)
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in floats:
            value = getattr(self, name)
            if not _is_real(value):
                raise ConfigError(f"{name} must be a finite number (got {value!r})", name)
            setattr(self, name, float(value))
        if not all(_is_int(t) for t in self.stop_token_ids):
            raise ConfigError(f"stop_token_ids must be integers (got {self.stop_token_ids!r})", "stop_token_ids")
        if not all(_is_int(t) and _is_real(b) for t, b in self.logit_bias.items()):
            raise ConfigError("logit_bias maps integer token ids to finite numbers", "logit_bias")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TokenLogprobs:
    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an EOS / stop token / stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the engine could not run this request (Request.error says why); others went on


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_total_tokens: int = 0  # prompt + output must stay within this (the context window)
    arrival_time: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[TokenLogprobs] = []  # one per output token, if asked for
        self.prompt_logprobs: list[TokenLogprobs] = []  # one per prompt token after the first, if asked for
        self.num_computed_tokens = 0
        self.draft_token_ids: list[int] = []  # proposed after the last step, verified in the next
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None  # with FinishReason.ERROR: what failed
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.first_answer_time: float | None = None  # its first token after any thinking
        self.finished_time: float | None = None
        self.num_preemptions = 0
        self.deadline = math.inf  # monotonic time its first token is due by (SLO.ttft_ms); inf: no target

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token_id)

    def drop_last(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` output tokens (a finish inside a verified draft run: a stop
        token, a stop string, a grammar's end, max_tokens), with their logprobs; the positions counted
        as computed never exceed the tokens kept. The scheduler calls it before it registers blocks."""
        if num_tokens > 0:
            del self.output_token_ids[-num_tokens:]
            del self.output_logprobs[len(self.output_token_ids) :]
            self.draft_token_ids = []
        self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens)

    def stop_reason(self, num_output: int) -> FinishReason | None:
        """Whether the output ends at its `num_output`-th token: EOS, a stop token id, max_tokens or the
        context window."""
        params = self.sampling_params
        last = self.output_token_ids[num_output - 1]
        if num_output >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                return FinishReason.STOP
            if last in params.stop_token_ids:
                return FinishReason.STOP
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return FinishReason.LENGTH
        if self.num_prompt_tokens + num_output >= self.max_total_tokens:
            return FinishReason.LENGTH
        return None
