"""From a request's sampled tokens to what its caller reads: the one owner of each request's
detokenizer (text, stop strings), grammar matcher (advance, fast-forward, validating drafts) and
thinking (where it ends, how many tokens it took, closing it at its budget).

Per step the engine hands it each request's new tokens (`accept`: how many the output keeps and
why it ended), asks it for the tokens a grammar forces next, and turns what was kept into a
RequestOutput delta (`output`). The scheduler's `settle` applies the verdict to the bookkeeping.
"""

from __future__ import annotations

import time
from typing import Any

from fulmine.config import ConfigError
from fulmine.engine.detokenizer import IncrementalDetokenizer
from fulmine.engine.outputs import RequestMetrics, RequestOutput
from fulmine.reasoning import ReasoningFormat, ReasoningParser, prompt_opens
from fulmine.request import FinishReason, Request
from fulmine.sampling.grammar import Grammars, MaskEntry


class Thinking:
    """A request's thinking as its tokens arrive: the same text-exact parser the server splits the
    answer with, fed each token's text, says where the thinking ends; the tokens until then count."""

    def __init__(self, fmt: ReasoningFormat, opened: bool, budget: int | None, eager: bool = False) -> None:
        self.fmt, self.budget = fmt, budget
        self.eager = eager  # decide at the first token (a constrained answer: its first row allowed the start tag)
        self.parser = ReasoningParser(fmt, opened)
        self.tokens = 0  # thinking tokens so far (the one that completes the end tag included)
        self.undecided = 0  # tokens read before the answer showed whether it thinks
        self.seen = 0  # characters of the detokenized text fed to the parser

    @property
    def active(self) -> bool:
        """Still thinking, or not yet known whether it will (the grammar waits)."""
        return self.parser.state != ReasoningParser.CONTENT

    def read(self, text: str) -> None:
        """One more token whose detokenized text ends the answer so far at `text`."""
        was = self.parser.state
        self.parser.feed(text[self.seen :])
        self.seen = len(text)
        if was == ReasoningParser.BEFORE:
            if self.eager and self.parser.state == ReasoningParser.BEFORE:  # not the start tag: the answer
                self.parser.state, self.parser.content_started = ReasoningParser.CONTENT, True
            self.undecided += 1
            if self.parser.state == ReasoningParser.REASONING:
                self.tokens, self.undecided = self.undecided, 0
            elif self.parser.state == ReasoningParser.CONTENT:
                self.undecided = 0  # an answer without thinking: nothing counted
        elif was == ReasoningParser.REASONING:
            self.tokens += 1

    def closing(self, output_ids: list[int]) -> list[int]:
        """The end tag's tokens still to force once the budget is spent ([] otherwise): the part of
        the tag not already at the end of the output."""
        if self.budget is None or self.parser.state != ReasoningParser.REASONING or self.tokens < self.budget:
            return []
        end = list(self.fmt.end_ids)
        for size in range(min(len(end) - 1, len(output_ids)), 0, -1):
            if output_ids[-size:] == end[:size]:
                return end[size:]
        return end


class OutputProcessor:
    def __init__(
        self, tokenizer: Any, grammars: Grammars, eos_token_ids: tuple[int, ...], reasoning: ReasoningFormat
    ) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.eos_token_ids = eos_token_ids
        self.reasoning = reasoning
        # the thinking's start as one token, where it is one: a constrained answer's first row allows it too
        start = tokenizer.encode(reasoning.start, add_special_tokens=False) if reasoning.enabled else []
        self.start_id: int | None = int(start[0]) if len(start) == 1 else None
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.matchers: dict[str, Any] = {}  # request id -> its grammar matcher (constrained requests)
        self.thinking: dict[str, Thinking] = {}  # request id -> its thinking (models with a reasoning format)
        self.num_constrained = 0  # constrained requests started, for /metrics

    def add(self, request: Request, generated: list[int]) -> None:
        """Start reading a request. `generated`: tokens it produced elsewhere (a replica that died
        mid-stream), read as if drawn here, their text counted as released already."""
        params, request_id = request.sampling_params, request.request_id
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.stop)
        if params.structured is not None:
            matcher = self.grammars.matcher(params.structured)
            if generated and not matcher.consume_tokens(generated):
                raise ConfigError("the generated tokens leave the request's grammar", "generated")
            self.matchers[request_id] = matcher
            self.num_constrained += 1
        thinking = None
        if self.reasoning.enabled:
            opened = prompt_opens(self.reasoning, self.tokenizer, request.prompt_token_ids)
            if opened or params.structured is None or self.start_id is not None:
                eager = params.structured is not None and not opened
                thinking = Thinking(self.reasoning, opened, params.reasoning_budget, eager)
        for token_id in generated:
            detokenizer.add_token(token_id)
            if thinking is not None:
                thinking.read(detokenizer.text)
        detokenizer.release(False)
        self.detokenizers[request_id] = detokenizer
        if thinking is not None:
            self.thinking[request_id] = thinking

    def accept(self, request: Request, tokens: list[int]) -> tuple[int, FinishReason | None]:
        """Read a request's new tokens (appended already) one by one until its output ends: while it
        thinks, the thinking reads each (no grammar); after, the grammar consumes each (a token it
        refuses once complete is not kept; its end ends the output); the detokenizer decodes each (a
        stop string ends the output there), then the stop tokens, max_tokens and the context window.
        Returns how many tokens it keeps and why it ended, if it did: the scheduler drops the rest
        (tokens verified past the end) where it registers and frees the request's blocks."""
        matcher = self.matchers.get(request.request_id)
        detokenizer = self.detokenizers[request.request_id]
        thinking = self.thinking.get(request.request_id)
        before = len(request.output_token_ids) - len(tokens)

        def ended(index: int, stop: bool) -> tuple[int, FinishReason] | None:
            """Whether the output ends after this token: a stop string, a stop token, the limits."""
            reason = FinishReason.STOP if stop else request.stop_reason(before + index + 1)
            return (index + 1, reason) if reason is not None else None

        for index, token in enumerate(tokens):
            if thinking is not None and thinking.active:  # the grammar applies to the answer only
                stop = detokenizer.add_token(token)
                thinking.read(detokenizer.text)
                if not thinking.active and not thinking.tokens:  # the answer began without thinking: its first
                    request.first_answer_time = request.first_answer_time or time.monotonic()
                    if matcher is not None and not matcher.consume_token(token):
                        raise RuntimeError(f"the output left its grammar: {matcher.get_error().splitlines()[0]}")
            else:
                request.first_answer_time = request.first_answer_time or time.monotonic()
                if matcher is not None and not (token in self.eos_token_ids and matcher.is_accepting()):
                    complete = matcher.is_accepting()
                    if not matcher.consume_token(token):
                        if not complete:
                            raise RuntimeError(f"the output left its grammar: {matcher.get_error().splitlines()[0]}")
                        return index, FinishReason.STOP  # drawn past a complete grammar (min_tokens held EOS back)
                    if matcher.is_stopped():  # its only continuation would be the end of sequence
                        detokenizer.add_token(token)
                        return index + 1, FinishReason.STOP
                stop = detokenizer.add_token(token)  # a stop string: the text is cut there
            if (end := ended(index, stop)) is not None:
                return end
        return len(tokens), None

    @property
    def steering(self) -> bool:
        """Whether some request's tokens are shaped (a grammar, or a thinking block: masks, forced drafts)."""
        return bool(self.matchers or self.thinking)

    def is_constrained(self, request_id: str) -> bool:
        """Its grammar applies to its next token (a thinking request's grammar waits for the answer)."""
        thinking = self.thinking.get(request_id)
        return request_id in self.matchers and (thinking is None or not thinking.active)

    def closing(self, request: Request) -> list[int]:
        """The end of its thinking to force now (its budget is spent), [] if none."""
        thinking = self.thinking.get(request.request_id)
        return thinking.closing(request.output_token_ids) if thinking is not None else []

    def reasoning_tokens(self, request_id: str) -> int:
        thinking = self.thinking.get(request_id)
        return thinking.tokens if thinking is not None else 0

    def mask(self, request: Request, drafts: list[int]) -> MaskEntry | None:
        """This step's mask of a sequence that samples (None: unconstrained): its grammar's, once its
        answer began (the thinking start allowed too while it is undecided), and the closing tokens
        of a spent thinking budget forced."""
        request_id = request.request_id
        thinking = self.thinking.get(request_id)
        matcher = self.matchers.get(request_id)
        forced = self.closing(request) if thinking is not None else []
        if thinking is not None and thinking.active:
            undecided = thinking.parser.state == ReasoningParser.BEFORE
            if matcher is not None and undecided and self.start_id is not None:
                return MaskEntry(matcher, drafts, forced, also=self.start_id)
            return MaskEntry(matcher, drafts, forced) if forced else None
        return MaskEntry(matcher, drafts) if matcher is not None else None

    def forced(self, request_id: str, limit: int) -> list[int]:
        """The tokens a request's grammar forces next (the rest of a key, a closing quote...), at most
        `limit`: drafts verified in the next forward, so a run of them costs one step, not one each."""
        return list(self.matchers[request_id].compute_ff_tokens()[:limit])

    def valid_drafts(self, request_id: str, proposal: list[int]) -> int:
        """How many of a proposer's drafts the request's grammar allows, from the first."""
        return int(self.matchers[request_id].validate_tokens(proposal)) if proposal else 0

    def output(self, request: Request, new_token_ids: list[int]) -> RequestOutput:
        """The delta of the tokens this step kept; a finished request's reading ends here."""
        detokenizer = self.detokenizers[request.request_id]
        reasoning_tokens = self.reasoning_tokens(request.request_id)
        if request.is_finished:
            detokenizer.flush()
            self.forget(request.request_id)
        return delta(request, detokenizer.release(request.is_finished), new_token_ids, reasoning_tokens)

    def failed(self, request: Request) -> RequestOutput:
        """The last delta of a request ended by an error (request.error says which)."""
        reasoning_tokens = self.reasoning_tokens(request.request_id)
        self.forget(request.request_id)
        return delta(request, "", [], reasoning_tokens)

    def forget(self, request_id: str) -> None:
        self.detokenizers.pop(request_id, None)
        self.matchers.pop(request_id, None)
        self.thinking.pop(request_id, None)


def delta(request: Request, new_text: str, new_token_ids: list[int], reasoning_tokens: int = 0) -> RequestOutput:
    """What this step added (its tokens, their text and logprobs), nothing sent before; the prompt's
    logprobs once, with the first tokens (or the finish)."""
    params = request.sampling_params
    new_logprobs = None
    if params.logprobs is not None:
        new_logprobs = (
            request.output_logprobs[len(request.output_logprobs) - len(new_token_ids) :] if new_token_ids else []
        )
    first = len(new_token_ids) == len(request.output_token_ids) and bool(new_token_ids)
    prompt_logprobs = None
    if params.prompt_logprobs is not None and (first or request.is_finished):
        prompt_logprobs = list(request.prompt_logprobs)
    return RequestOutput(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        new_text=new_text,
        new_token_ids=list(new_token_ids),
        finished=request.is_finished,
        finish_reason=request.finish_reason,
        error=request.error,
        new_logprobs=new_logprobs,
        num_cached_tokens=request.num_cached_tokens,
        prompt_logprobs=prompt_logprobs,
        num_reasoning_tokens=reasoning_tokens,
        metrics=RequestMetrics(
            request.arrival_time,
            request.first_scheduled_time,
            request.first_token_time,
            request.finished_time,
            request.first_answer_time,
        ),
    )
