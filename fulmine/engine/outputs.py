"""The contracts between engine parts: what the scheduler decides and what the engine hands its
caller (what the runner gets and gives back: executors/step.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fulmine.request import FinishReason, Request, TokenLogprobs


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens
    draft_token_ids: list[int] = field(default_factory=list)  # speculated tokens verified after them

    @property
    def samples(self) -> bool:
        """This step computes the request's last known token, so it also samples the next one."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens + len(s.draft_token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """What a caller sees of a request after a step: the new piece and the whole so far."""

    request_id: str
    prompt_token_ids: list[int]
    text: str  # all text released so far
    token_ids: list[int]  # all generated token ids
    new_text: str  # released by this step
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprobs] | None
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprobs] | None = None  # for prompt tokens 1.., if asked for
    error: str | None = None  # with FinishReason.ERROR: why the engine ended this request

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def usage(self) -> dict[str, int]:
        """Token counts in OpenAI's terms, plus the prompt tokens served from the prefix cache."""
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_output_tokens,
            "total_tokens": self.num_prompt_tokens + self.num_output_tokens,
            "cached_tokens": self.num_cached_tokens,
        }
