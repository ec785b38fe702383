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
    first_answer_time: float | None = None  # the first token after any thinking (the first token, without)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """What a step added to a request (a delta: the engine copies nothing it sent before), and, in a
    caller's accumulator (`folded`), the whole answer so far. The same type crosses from a replica to
    its front."""

    request_id: str
    prompt_token_ids: list[int]
    new_text: str  # released by this step
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    new_logprobs: list[TokenLogprobs] | None  # of the new tokens; None when not asked for
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprobs] | None = None  # for prompt tokens 1.., once the prompt is done
    error: str | None = None  # with FinishReason.ERROR: why the engine ended this request
    num_reasoning_tokens: int = 0  # output tokens that were thinking, so far (a count, not a delta)
    # the whole answer so far: an accumulator's (folded), empty in the engine's deltas
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None

    def folded(self, delta: RequestOutput | None = None) -> RequestOutput:
        """This accumulator with `delta` added, in place (amortized O(new tokens)); called on a delta
        with no argument, a new accumulator holding it."""
        if delta is None:
            new = RequestOutput(**{**self.__dict__, "token_ids": [], "logprobs": None, "text": ""})
            return new.folded(self)
        self.text += delta.new_text
        self.token_ids.extend(delta.new_token_ids)
        if delta.new_logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.new_logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.new_text, self.new_token_ids, self.new_logprobs = delta.new_text, delta.new_token_ids, delta.new_logprobs
        self.finished, self.finish_reason, self.error = delta.finished, delta.finish_reason, delta.error
        self.metrics, self.num_reasoning_tokens = delta.metrics, delta.num_reasoning_tokens
        return self

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


def fold(answers: dict[str, RequestOutput], delta: RequestOutput) -> RequestOutput:
    """Add an engine delta to its request's answer so far (kept in `answers` by request id)."""
    answer = answers.get(delta.request_id)
    answers[delta.request_id] = answer = delta.folded() if answer is None else answer.folded(delta)
    return answer


def fold_all(answers: dict[str, RequestOutput], deltas: list[RequestOutput]) -> list[RequestOutput]:
    """A step's deltas, each folded into its request's answer so far (`answers`, by request id)."""
    return [fold(answers, delta) for delta in deltas]
