"""Latency as a contract: admit a request only if its targets (request.SLO) can be met, and size each
step's prompt tokens so that running streams keep theirs.

When a request arrives, its time to first token is predicted from the step cost model
(executors/cost_model.py): the prompt tokens that will be computed before its own (those of admitted
requests already prefilling, and of those with earlier deadlines, which the scheduler admits
first), then its own, in chunks sized
for the streams decoding meanwhile. A request whose target cannot be met is refused at once
(`Refused`: the server answers 429 with Retry-After and the predicted time) instead of being served
late, which would also delay everyone queued behind it. A request whose inter-token target is below
what one decode step takes is refused too.

Thread-safe: the server checks admission on its own thread (a refusal must not wait for the engine's
step to end); the engine reports progress after each step.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from fulmine.executors.cost_model import StepCostModel, StepShape
from fulmine.request import SLO, Request, RequestStatus

# Steps are aimed at this fraction of an inter-token target: their times scatter around the model's
# prediction, and a client's gap adds the stream's own overhead to the step (measured, 4 long prompts
# beside a stream: at 1.0 the gaps' p90 was 106 ms for a 100 ms target, at 0.9 it is 94-96 ms).
SETPOINT = 0.9
MIN_CHUNK = 16  # a prompt beside streams always advances, even when one decode step exceeds the target


class Refused(Exception):
    """The request's latency targets cannot be met now; retry after `retry_after_s`."""

    def __init__(self, message: str, predicted_ms: float, retry_after_s: int) -> None:
        super().__init__(message)
        self.predicted_ms = predicted_ms
        self.retry_after_s = retry_after_s


@dataclass
class _Admitted:
    deadline: float  # monotonic seconds by which its first token is due (inf: no target)
    remaining: int  # prompt tokens not computed yet
    added: bool = False  # the engine has it (until then, a step's progress report does not know it)
    started: bool = False  # its prompt is being computed: it goes on first, whatever its deadline


@dataclass(frozen=True)
class Streams:
    """The streams decoding now: how many, and their mean context."""

    rows: int
    context: int

    @staticmethod
    def of(running: list[Request]) -> Streams:
        decoding = [r.num_tokens for r in running if r.output_token_ids]
        return Streams(len(decoding), sum(decoding) // len(decoding) if decoding else 0)


class Admission:
    def __init__(self, cost: StepCostModel, max_batched_tokens: int, max_itl_ms: float, default: SLO | None) -> None:
        self.cost = cost
        self.max_batched_tokens = max_batched_tokens
        self.max_itl_ms = max_itl_ms  # the engine-wide inter-token target (0: none)
        self.default = default if default is not None and not default.is_empty else None
        self._lock = threading.Lock()
        self._queued: dict[str, _Admitted] = {}  # admitted, first token not yet out
        self.num_refused = 0

    def targets(self, slo: SLO | None) -> SLO | None:
        """The request's targets, the engine's defaults filling what it leaves unset."""
        if self.default is None:
            return slo
        if slo is None:
            return self.default
        return SLO(slo.ttft_ms or self.default.ttft_ms, slo.itl_ms or self.default.itl_ms, slo.ttfat_ms)

    def admit(
        self, request_id: str, prompt_tokens: int, slo: SLO | None, arrival: float, streams: Streams
    ) -> int | None:
        """Admit the request, or raise Refused. `prompt_tokens`: what must be computed (cached ones
        excluded). With a time-to-first-answer target, returns the thinking tokens that fit in it."""
        deadline = arrival + slo.ttft_ms / 1e3 if slo is not None and slo.ttft_ms is not None else math.inf
        with self._lock:
            if slo is not None and slo.itl_ms is not None:
                step_ms = self.cost.seconds(StepShape.decode(streams.rows + 1, streams.context)) * 1e3
                if step_ms > slo.itl_ms:
                    self.num_refused += 1
                    raise Refused(
                        f"the requested inter-token latency ({slo.itl_ms:.0f} ms) is below one decode step now "
                        f"({step_ms:.0f} ms predicted with {streams.rows + 1} streams)",
                        step_ms,
                        max(1, math.ceil(step_ms / 1e3)),
                    )
            ttft_ms = slo.ttft_ms if slo is not None else None
            if ttft_ms is not None:
                ahead = [q.remaining for q in self._queued.values() if q.started or q.deadline <= deadline]
                predicted = self.time_to_first_token(ahead, prompt_tokens, streams)
                if predicted * 1e3 > ttft_ms:
                    self.num_refused += 1
                    raise Refused(
                        f"predicted time to first token {predicted * 1e3:.0f} ms exceeds the requested "
                        f"{ttft_ms:.0f} ms ({sum(ahead)} prompt tokens queued ahead)",
                        predicted * 1e3,
                        max(1, math.ceil(predicted - ttft_ms / 1e3)),
                    )
            budget = None
            if slo is not None and slo.ttfat_ms is not None:
                ahead = [q.remaining for q in self._queued.values() if q.started or q.deadline <= deadline]
                first = self.time_to_first_token(ahead, prompt_tokens, streams)
                step = self.cost.seconds(StepShape.decode(streams.rows + 1, streams.context))
                left = slo.ttfat_ms / 1e3 - first - step  # the step that closes the thinking also answers
                if left < 0:
                    self.num_refused += 1
                    raise Refused(
                        f"predicted time to first token {first * 1e3:.0f} ms leaves no room for a first answer "
                        f"token within the requested {slo.ttfat_ms:.0f} ms",
                        (first + step) * 1e3,
                        max(1, math.ceil(first + step - slo.ttfat_ms / 1e3)),
                    )
                budget = int(left / step) if step > 0 else None
            self._queued[request_id] = _Admitted(deadline, prompt_tokens)
            return budget

    def time_to_first_token(self, ahead: list[int], prompt_tokens: int, streams: Streams) -> float:
        """Seconds until a prompt of `prompt_tokens` gets its first token behind `ahead` prompts'
        remaining tokens, beside `streams`: the step now running, then chunks until its last. Each
        prompt in O(1) (admission runs on the server's thread, and queues can be long): its chunks
        sized at its middle depth, as many equal steps as they take; a step at the chunks' mean
        start attends to exactly the prompt's total."""
        decode = StepShape.decode(streams.rows, streams.context)
        seconds = self.cost.seconds(decode) if streams.rows else 0.0
        for tokens in [*ahead, prompt_tokens]:
            if tokens <= 0:
                continue
            chunk = min(tokens, self.chunk_limit(streams, tokens // 2))
            steps = -(-tokens // chunk)
            seconds += steps * self.cost.seconds(decode.plus_prompt(chunk, (steps - 1) * chunk // 2))
        return seconds

    def chunk_limit(self, streams: Streams, start: int, itl_ms: float | None = None) -> int:
        """Prompt tokens (from position `start`) a step may take beside `streams` and keep the
        inter-token target (`itl_ms`, else the engine's; the whole budget when none or no stream)."""
        target = itl_ms if itl_ms is not None else self.max_itl_ms
        if not streams.rows or not target:
            return self.max_batched_tokens
        decode = StepShape.decode(streams.rows, streams.context)
        fits = self.cost.prompt_tokens_within(target / 1e3 * SETPOINT, decode, start, self.max_batched_tokens)
        return max(MIN_CHUNK, fits)

    def step_limit(self, running: list[Request], waiting: Sequence[Request]) -> int | None:
        """The prompt tokens the next step may take while streams decode (None: no limit)."""
        targets = [self.max_itl_ms] if self.max_itl_ms else []
        targets += [
            slo.itl_ms
            for r in running
            if r.output_token_ids and (slo := self.targets(r.sampling_params.slo)) and slo.itl_ms
        ]
        if not targets:
            return None
        prompt = next((r for r in running if not r.output_token_ids), waiting[0] if waiting else None)
        start = prompt.num_computed_tokens if prompt is not None else 0
        return self.chunk_limit(Streams.of(running), start, min(targets))

    def is_admitted(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._queued

    def added(self, request_id: str) -> float:
        """The engine queued the admitted request; returns its deadline (inf: none)."""
        with self._lock:
            admitted = self._queued[request_id]
            admitted.added = True
            return admitted.deadline

    def progress(self, requests: dict[str, Request]) -> None:
        """After a step: prompt tokens still to compute; requests with a first token (or gone) leave."""
        with self._lock:
            for request_id, admitted in list(self._queued.items()):
                request = requests.get(request_id)
                if not admitted.added:
                    continue
                if request is None or request.output_token_ids:
                    del self._queued[request_id]
                else:
                    admitted.remaining = request.num_tokens - request.num_computed_tokens
                    admitted.started = request.status is RequestStatus.RUNNING

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._queued.pop(request_id, None)
