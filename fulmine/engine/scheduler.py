"""The scheduler: decide, each step, which requests compute how many tokens.

One idea (vLLM v1's): a request's `num_computed_tokens` catches up with its `num_tokens`. Each
step has a token budget; running requests are served first (a decode needs one token, an
unfinished prefill takes what the budget allows), then waiting requests are admitted, the
earliest first-token deadline first (SLO.ttft_ms; those without one after, in arrival order),
starting from the longest cached prefix of their tokens, the rest chunked to fit. When
the KV cache runs out, the most recently admitted running request is preempted: its blocks are
freed and it is recomputed later. A decoding request may also carry the draft tokens the engine
proposed for it after the last step (`request.draft_token_ids`): they take budget and KV slots;
rejected ones are simply not counted as computed, and their slots are overwritten later. Pure
Python: nothing here runs a model.
"""

from __future__ import annotations

import time
from collections import deque

from fulmine.engine.outputs import ScheduledRequest, SchedulerOutput
from fulmine.executors.step import ModelRunnerOutput, SequenceStep, StepBatch
from fulmine.kv_cache import KVCacheManager
from fulmine.request import FinishReason, Request, RequestStatus


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        # by deadline: before the first waiting request due later (no deadline: at the end)
        index = next((i for i, r in enumerate(self.waiting) if r.deadline > request.deadline), len(self.waiting))
        self.waiting.insert(index, request)

    def schedule(self, prefill_limit: int | None = None) -> SchedulerOutput:
        """This step's requests and token counts. `prefill_limit`: the most prompt tokens the step may
        take while some request is decoding (its next token waits for this step), so that a long
        prompt arriving does not stretch the gap between a running stream's tokens."""
        budget = self.max_num_batched_tokens
        streaming = prefill_limit is not None and any(_decoding(r) for r in self.running)
        prefill = prefill_limit if streaming and prefill_limit is not None else budget
        out = SchedulerOutput(scheduled=[])
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = min(remaining, budget) if remaining == 1 else min(remaining, budget, max(prefill, 0))
            if num_new == 0:
                index += 1
                continue
            if remaining > 1:
                prefill -= num_new
            drafts = self._drafts(request, num_new, budget)
            if not self._allocate_or_preempt(request, num_new + len(drafts), out):
                break  # the request itself was preempted, so nothing after it can run either
            out.scheduled.append(ScheduledRequest(request, num_new, drafts))
            budget -= num_new + len(drafts)
            index += 1
        if out.preempted_ids:  # a step that had to preempt admits nobody new
            return out
        while self.waiting and min(budget, prefill) > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            # prompt logprobs need every prompt position computed, so such a request skips the cache
            wants_prompt_logprobs = request.sampling_params.prompt_logprobs is not None
            matched = [] if wants_prompt_logprobs else self.kv_cache.match_prefix(request.all_token_ids)
            num_cached = len(matched) * self.kv_cache.block_size
            num_new = min(request.num_tokens - num_cached, budget, prefill)
            if not self.kv_cache.can_allocate(request.request_id, num_cached + num_new, matched):
                break
            self.kv_cache.allocate(request.request_id, num_cached + num_new, matched)
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
            prefill -= num_new
        return out

    def batch(self, out: SchedulerOutput) -> StepBatch:
        """What the runner gets for this step: per scheduled request, its new tokens and drafts, where
        they start, its block table and how it samples (plain data)."""
        seqs = []
        for s in out.scheduled:
            request, start = s.request, s.request.num_computed_tokens
            new = _token_slice(request.prompt_token_ids, request.output_token_ids, start, start + s.num_new_tokens)
            seqs.append(
                SequenceStep(
                    request.request_id,
                    new + s.draft_token_ids,
                    start,
                    self.kv_cache.block_tables[request.request_id],
                    len(s.draft_token_ids),
                    s.samples,
                    request.sampling_params,
                    request.prompt_token_ids,
                    request.output_token_ids,
                )
            )
        return StepBatch(seqs)

    def _drafts(self, request: Request, num_new: int, budget: int) -> list[int]:
        if not request.draft_token_ids or request.num_computed_tokens + num_new != request.num_tokens:
            return []  # only a request about to sample its next token can verify drafts
        return request.draft_token_ids[: max(min(budget - num_new, draft_room(request)), 0)]

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Make room for `num_new` more tokens of a running request, preempting from the back."""
        total = request.num_computed_tokens + num_new
        while not self.kv_cache.can_allocate(request.request_id, total):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted_ids.append(victim.request_id)
            if victim is request:
                return False
        self.kv_cache.allocate(request.request_id, total)
        return True

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        request.num_computed_tokens = 0
        request.draft_token_ids = []
        request.prompt_logprobs.clear()  # recomputed with the prompt
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_from_output(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[tuple[Request, list[int]]]:
        """advance, then settle at the first stop token, for every scheduled request: the step's
        bookkeeping when nothing else reads the tokens (the engine puts its output processing between
        the two). Returns each request that got tokens this step with the tokens it kept."""
        updated = []
        for scheduled in out.scheduled:
            request = scheduled.request
            tokens = self.advance(scheduled, result)
            before = len(request.output_token_ids) - len(tokens)
            keep, reason = len(tokens), None
            for index in range(len(tokens)):
                reason = request.stop_reason(before + index + 1)
                if reason is not None:
                    keep = index + 1
                    break
            self.settle(request, len(tokens) - keep, reason)
            if tokens:
                updated.append((request, tokens[:keep]))
        return updated

    def advance(self, scheduled: ScheduledRequest, result: ModelRunnerOutput) -> list[int]:
        """The first half of a request's update: the positions this step computed are counted and its
        sampled tokens (accepted drafts, then the next token) appended, all of them; returns them.
        Nothing is registered or finished until `settle`, once the caller knows where the output ends."""
        request = scheduled.request
        tokens = result.sampled.get(request.request_id, [])
        # accepted drafts were computed with the right context; the last token is new
        request.num_computed_tokens += scheduled.num_new_tokens + max(len(tokens) - 1, 0)
        chunk_logprobs = result.prompt_logprobs.get(request.request_id)
        if chunk_logprobs:
            request.prompt_logprobs.extend(chunk_logprobs)
        logprobs = result.logprobs.get(request.request_id)
        for token_id in tokens:
            request.append_token(token_id)
            if logprobs is not None:
                request.output_logprobs.append(logprobs)
        return list(tokens)

    def settle(self, request: Request, num_dropped: int, reason: FinishReason | None) -> None:
        """The second half, the one place a request's holdings change together: its last `num_dropped`
        tokens dropped (an end inside the step's tokens) and its computed positions with them, its
        full computed blocks registered in the prefix cache, then, with a reason, finished (its blocks
        freed: registered ones stay cached for follow-ups)."""
        request.drop_last(num_dropped)
        self.kv_cache.cache_full_blocks(request)
        if reason is not None:
            self.finish_request(request.request_id, reason)

    def finish_request(self, request_id: str, reason: FinishReason) -> Request | None:
        """Finish (or abort) a request wherever it is; frees its KV blocks. Unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.kv_cache.free(request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finished_time = time.monotonic()
        return request


def draft_room(request: Request) -> int:
    """How many drafts the request could still use: its tokens left, keeping one for the sampled token."""
    room = request.max_total_tokens - request.num_tokens
    max_tokens = request.sampling_params.max_tokens
    if max_tokens is not None:
        room = min(room, max_tokens - len(request.output_token_ids) - 1)
    return room


def _decoding(request: Request) -> bool:
    """The request streams tokens and its next one is one step away (not a prompt, not a recompute)."""
    return bool(request.output_token_ids) and request.num_computed_tokens == request.num_tokens - 1


def _token_slice(prompt: list[int], output: list[int], start: int, end: int) -> list[int]:
    if end <= len(prompt):
        return prompt[start:end]
    if start >= len(prompt):
        return output[start - len(prompt) : end - len(prompt)]
    return prompt[start:] + output[: end - len(prompt)]
