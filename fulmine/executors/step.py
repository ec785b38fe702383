"""The step batch: what the runner and its executors get from the scheduler, as plain data.

No live `Request` objects cross this line: per sequence, the ids of the tokens to compute, where
they start, the block table, how many of them are drafts and how to sample. That is what a worker
process, a captured CUDA graph or a tensor-parallel rank needs, and all it may rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from fulmine.request import SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from fulmine.sampling.grammar import TokenMasks


@dataclass
class SequenceStep:
    """One request's part of a step."""

    request_id: str
    token_ids: list[int]  # computed this step: new tokens, then drafts
    start: int  # position of token_ids[0] (the tokens before it are in the KV cache)
    block_table: list[int]
    num_drafts: int  # the last num_drafts of token_ids are speculated, verified this step
    samples: bool  # the step computes the last known token, so it samples the next one
    params: SamplingParams
    # The request's tokens so far, for penalties and prompt logprobs (read only).
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        """Context length once the step's tokens are in the cache."""
        return self.start + len(self.token_ids)

    @property
    def draft_token_ids(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_drafts :]

    def slots(self, block_size: int) -> list[int]:
        """The cache slot of each of the step's tokens."""
        table = self.block_table
        return [table[p // block_size] * block_size + p % block_size for p in range(self.start, self.end)]


@dataclass
class StepBatch:
    seqs: list[SequenceStep]
    # the allowed next tokens of the sequences whose output is constrained (sampling/grammar.py),
    # being computed while the forward runs; None when no sequence of the step is constrained
    token_masks: TokenMasks | None = None

    def subset(self, request_ids: set[str]) -> StepBatch:
        return StepBatch([s for s in self.seqs if s.request_id in request_ids], self.token_masks)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly one token and samples after it (no drafts, no prompt)."""
        return all(s.num_tokens == 1 and s.samples for s in self.seqs)

    @cached_property
    def token_ids(self) -> list[int]:
        return [t for s in self.seqs for t in s.token_ids]

    @cached_property
    def positions(self) -> list[int]:
        return [p for s in self.seqs for p in range(s.start, s.end)]

    @cached_property
    def seq_index(self) -> list[int]:
        """Per token, the index of its sequence."""
        return [i for i, s in enumerate(self.seqs) for _ in range(s.num_tokens)]

    @cached_property
    def row_offsets(self) -> list[int]:
        """Per sequence, the row of its first token in the flat batch."""
        offsets, row = [], 0
        for s in self.seqs:
            offsets.append(row)
            row += s.num_tokens
        return offsets


@dataclass
class ModelRunnerOutput:
    """One entry per scheduled request that sampled this step."""

    sampled: dict[str, list[int]]  # request id -> new tokens (several when drafts were accepted)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # this step's chunk

    def merge(self, other: ModelRunnerOutput) -> None:
        """Add the results of another part of the same step (disjoint requests)."""
        self.sampled.update(other.sampled)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs.update(other.prompt_logprobs)
