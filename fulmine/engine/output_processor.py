"""From a request's sampled tokens to what its caller reads: the one owner of each request's
detokenizer (text, stop strings) and grammar matcher (advance, fast-forward, validating drafts).

Per step the engine hands it each request's new tokens (`accept`: how many the output keeps and
why it ended), asks it for the tokens a grammar forces next, and turns what was kept into a
RequestOutput delta (`output`). The scheduler's `settle` applies the verdict to the bookkeeping.
"""

from __future__ import annotations

from typing import Any

from fulmine.config import ConfigError
from fulmine.engine.detokenizer import IncrementalDetokenizer
from fulmine.engine.outputs import RequestMetrics, RequestOutput
from fulmine.request import FinishReason, Request
from fulmine.sampling.grammar import Grammars


class OutputProcessor:
    def __init__(self, tokenizer: Any, grammars: Grammars, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.eos_token_ids = eos_token_ids
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.matchers: dict[str, Any] = {}  # request id -> its grammar matcher (constrained requests)
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
        for token_id in generated:
            detokenizer.add_token(token_id)
        detokenizer.release(False)
        self.detokenizers[request_id] = detokenizer

    def accept(self, request: Request, tokens: list[int]) -> tuple[int, FinishReason | None]:
        """Read a request's new tokens (appended already) one by one until its output ends: the grammar
        consumes each (a token it refuses once complete is not kept; its end ends the output), the
        detokenizer decodes each (a stop string ends the output there), then the stop tokens,
        max_tokens and the context window. Returns how many tokens it keeps and why it ended, if it
        did: the scheduler drops the rest (tokens verified past the end) where it registers and frees
        the request's blocks."""
        matcher = self.matchers.get(request.request_id)
        detokenizer = self.detokenizers[request.request_id]
        before = len(request.output_token_ids) - len(tokens)
        for index, token in enumerate(tokens):
            if matcher is not None and not (token in self.eos_token_ids and matcher.is_accepting()):
                complete = matcher.is_accepting()
                if not matcher.consume_token(token):
                    if not complete:
                        raise RuntimeError(f"the output left its grammar: {matcher.get_error().splitlines()[0]}")
                    return index, FinishReason.STOP  # drawn past a complete grammar (min_tokens held EOS back)
                if matcher.is_stopped():  # its only continuation would be the end of sequence
                    detokenizer.add_token(token)
                    return index + 1, FinishReason.STOP
            if detokenizer.add_token(token):
                return index + 1, FinishReason.STOP  # a stop string: the text is cut there
            reason = request.stop_reason(before + index + 1)
            if reason is not None:
                return index + 1, reason
        return len(tokens), None

    def is_constrained(self, request_id: str) -> bool:
        return request_id in self.matchers

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
        if request.is_finished:
            detokenizer.flush()
            self.forget(request.request_id)
        return delta(request, detokenizer.release(request.is_finished), new_token_ids)

    def failed(self, request: Request) -> RequestOutput:
        """The last delta of a request ended by an error (request.error says which)."""
        self.forget(request.request_id)
        return delta(request, "", [])

    def forget(self, request_id: str) -> None:
        self.detokenizers.pop(request_id, None)
        self.matchers.pop(request_id, None)


def delta(request: Request, new_text: str, new_token_ids: list[int]) -> RequestOutput:
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
        metrics=RequestMetrics(
            request.arrival_time, request.first_scheduled_time, request.first_token_time, request.finished_time
        ),
    )
