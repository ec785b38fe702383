"""How many tokens to draft, per request and step, so speculation never costs more than it brings.

Two measurements drive it:
- acceptance: per request, the chance that a drafted token is accepted (exponentially weighted
  counts of accepted and rejected drafts). While drafting is off the proposer still makes a
  one-token "shadow" proposal each step, scored against the token the model then produces, so
  the estimate stays current without paying for verification.
- cost: step time as the engine's step cost model predicts it (executors/cost_model.py: fitted on
  every measured step), for the batch's rows plus the drafts, at the request's context.
- the proposer's cost: seconds per proposed token, timed around each proposal (a draft model runs a
  forward per token; n-gram lookup is ~free).
With per-token acceptance a, drafting k tokens yields (1 - a^(k+1)) / (1 - a) tokens for one
step costing t(batch + k) + c * k; the governor picks the k (0 included) with the most
tokens per second for the batch, so a request whose drafts are rarely accepted stops drafting. A
costly proposer's shadow proposals would tax every plain step, so while its drafting is off it
shadows only one step in SHADOW_EVERY (every step of a request's first WARMUP_SHADOWS).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from fulmine.executors.cost_model import StepCostModel, StepShape
from fulmine.request import Request
from fulmine.speculative.ngram import NgramProposer


class Proposer(Protocol):
    """Where drafts come from: n-gram lookup (ngram.py) or a draft model (draft.py)."""

    def propose(self, request_id: str, tokens: list[int], k: int) -> list[int]: ...

    def release(self, request_id: str) -> None: ...


# Before any measurement: an extra token costs this fraction of a one-token step (measured ~0.35
# for the embedded model's fused step on the 2-core CPU; the fit replaces it within a few steps).
PRIOR_COST_RATIO = 0.5
# Draft only when the model predicts at least this much more throughput than plain decoding: the
# fit is noisy, and a predicted 2 % gain measured as a 5 % loss (list-repeating chat, 52 % acceptance).
MIN_GAIN = 1.1
ACCEPTANCE_DECAY = 0.9  # weight of a request's older acceptance evidence per observation
PROPOSER_DECAY = 0.9  # weight of older proposals in the proposer's cost per token
COSTLY = 0.05  # a proposer whose token costs more than this share of a step's fixed cost is rationed
SHADOW_EVERY = 8
WARMUP_SHADOWS = 8


@dataclass
class _Acceptance:
    accepted: float = 1.0  # prior: one accepted, one rejected (a = 0.5)
    rejected: float = 1.0
    pending: list[int] | None = None  # this step's proposal (drafted or shadow)
    drafted: bool = False
    steps: int = 0  # proposals asked of the governor for this request

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, accepted: int, rejected: int) -> None:
        self.accepted = self.accepted * ACCEPTANCE_DECAY + accepted
        self.rejected = self.rejected * ACCEPTANCE_DECAY + rejected


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one step yields with k drafts, each accepted with `acceptance` until the first rejection."""
    return sum(acceptance**i for i in range(k + 1))


class Governor:
    def __init__(self, max_drafts: int, proposer: Proposer | None = None, cost: StepCostModel | None = None) -> None:
        self.max_drafts = max_drafts
        self.proposer: Proposer = proposer or NgramProposer()
        self.requests: dict[str, _Acceptance] = {}
        self.cost = cost or StepCostModel()
        self.proposer_seconds: float | None = None  # per proposed token (exponentially weighted)
        self.num_drafted = 0  # totals, for metrics
        self.num_accepted = 0

    def drafts(self, request: Request, limit: int, batch_size: int) -> list[int]:
        """Tokens to verify after the request's last token this step ([] to decode plainly)."""
        params = request.sampling_params
        if params.has_penalties or params.logprobs is not None:
            return []  # verification samples each position independently; these need the sequence
        if params.seed is not None and not params.is_greedy:
            return []  # a seed promises the same text; drafting (timing-driven) would change the draws
        state = self.requests.setdefault(request.request_id, _Acceptance())
        limit = min(limit, self.max_drafts)
        # k first: a draft model pays per drafted token (off, it still drafts one, to score it)
        k = self.choose(state.rate, limit, batch_size, request.num_tokens)
        state.steps += 1
        if k == 0 and self._costly() and state.steps > WARMUP_SHADOWS and state.steps % SHADOW_EVERY:
            state.pending = None  # no shadow this step
            return []
        started = time.perf_counter()
        proposal = self.proposer.propose(request.request_id, request.all_token_ids, max(k, 1))
        if proposal:
            self._time_proposer((time.perf_counter() - started) / len(proposal))
        k = min(k, len(proposal))
        state.pending, state.drafted = (proposal[:k], True) if k else (proposal[:1], False)
        return proposal[:k]

    def verified(self, request_id: str, num_drafts: int) -> None:
        """The scheduler verifies only the first `num_drafts` of the request's drafts (budget, room)."""
        state = self.requests.get(request_id)
        if state is not None and state.drafted and state.pending is not None and num_drafts < len(state.pending):
            state.pending = state.pending[:num_drafts] or None

    def _time_proposer(self, per_token: float) -> None:
        previous = self.proposer_seconds
        weighted = PROPOSER_DECAY * previous + (1 - PROPOSER_DECAY) * per_token if previous is not None else per_token
        self.proposer_seconds = weighted

    def _step_seconds(self, tokens: int, context: int) -> float:
        """A decode step of `tokens` rows at `context` (relative to a one-row step before the model is fitted)."""
        if not self.cost.fitted:
            return 1 + PRIOR_COST_RATIO * tokens
        return self.cost.seconds(StepShape.decode(tokens, context))

    def _proposer_ratio(self) -> float:
        """c / t0: a proposed token's cost relative to a step's fixed cost (0 until both are measured)."""
        fixed = self.cost.fixed_seconds if self.cost.fitted else 0.0
        if self.proposer_seconds is None or not fixed:
            return 0.0
        return self.proposer_seconds / fixed

    def _costly(self) -> bool:
        return self._proposer_ratio() > COSTLY

    def choose(self, acceptance: float, available: int, batch_size: int, context: int = 0) -> int:
        # seconds a proposed token costs (counted once the step cost is known, as the steps' seconds are)
        proposing = (self.proposer_seconds or 0.0) if self.cost.fitted else 0.0
        shadow = proposing / SHADOW_EVERY if self._costly() else proposing  # what staying off costs

        def tokens_per_cost(k: int) -> float:
            seconds = self._step_seconds(batch_size + k, context) + (proposing * k if k else shadow)
            return (batch_size - 1 + expected_tokens(acceptance, k)) / seconds

        best = max(range(available + 1), key=tokens_per_cost)
        return best if tokens_per_cost(best) >= MIN_GAIN * tokens_per_cost(0) else 0

    def observe(self, request_id: str, new_tokens: list[int]) -> None:
        """The tokens a request gained this step, scored against what was proposed for it."""
        state = self.requests.get(request_id)
        if state is None or not state.pending or not new_tokens:
            return
        proposal, drafted = state.pending, state.drafted
        state.pending = None
        matched = 0
        for draft, token in zip(proposal, new_tokens):
            if draft != token:
                break
            matched += 1
        if drafted:  # verification accepts drafts up to the first mismatch, so matched = accepted
            self.num_drafted += len(proposal)
            self.num_accepted += matched
            state.observe(matched, 1 if matched < len(proposal) else 0)
        else:
            state.observe(matched, 1 - matched)

    def release(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.proposer.release(request_id)

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted / self.num_drafted if self.num_drafted else None
