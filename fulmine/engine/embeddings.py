"""Embeddings as work cut into steps: each engine step computes at most one chunk of one embedding
(its size the prompt-chunk limit that keeps the streams' inter-token target), so a long input never
holds the engine thread longer than a step, and one whose caller left is dropped between chunks.

A job borrows KV blocks for its whole input when it starts (not shared with the prefix cache), sums
(mean pooling) or keeps (last) the final hidden states chunk by chunk, and reports to its callback.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fulmine.config import ConfigError
from fulmine.executors.model_runner import ModelRunner
from fulmine.executors.step import SequenceStep, StepBatch
from fulmine.kv_cache import KVCacheManager
from fulmine.request import SamplingParams

Done = Callable[[list[float] | None, BaseException | None], None]


@dataclass
class EmbeddingJob:
    job_id: str
    prompt_ids: list[int]
    pooling: str
    normalize: bool
    on_done: Done
    num_computed: int = 0
    total: torch.Tensor | None = field(default=None, repr=False)


class Embeddings:
    def __init__(self, runner: ModelRunner, kv_cache: KVCacheManager) -> None:
        self.runner, self.kv_cache = runner, kv_cache
        self.jobs: deque[EmbeddingJob] = deque()

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, job: EmbeddingJob) -> None:
        if job.pooling not in ("mean", "last"):
            raise ConfigError(f"pooling {job.pooling!r}: mean or last", "pooling")
        self.jobs.append(job)

    def abort(self, job_id: str) -> None:
        for job in list(self.jobs):
            if job.job_id == job_id:
                self.jobs.remove(job)
                self.kv_cache.free(job_id)

    def step(self, budget: int) -> None:
        """One chunk of the oldest job, at most `budget` tokens (a job whose blocks are not free yet
        waits; one that cannot ever fit is refused)."""
        if not self.jobs:
            return
        job = self.jobs[0]
        try:
            if job.num_computed == 0 and job.job_id not in self.kv_cache.block_tables:
                if not self.kv_cache.can_allocate(job.job_id, len(job.prompt_ids)):
                    raise ConfigError("the KV cache is full: retry shortly")
                self.kv_cache.allocate(job.job_id, len(job.prompt_ids))
            table = self.kv_cache.block_tables[job.job_id]
            start = job.num_computed
            ids = job.prompt_ids[start : start + max(budget, 1)]
            step = SequenceStep(job.job_id, ids, start, table, 0, False, SamplingParams(), job.prompt_ids, [])
            hidden = self.runner.hidden_states(StepBatch([step]))
            if job.pooling == "last":
                job.total = hidden[-1]
            else:
                job.total = hidden.sum(0) if job.total is None else job.total + hidden.sum(0)
            job.num_computed += len(ids)
            if job.num_computed < len(job.prompt_ids):
                return
            vector = job.total if job.pooling == "last" else job.total / len(job.prompt_ids)
            if job.normalize:
                vector = vector / vector.norm().clamp(min=1e-12)
            result: list[float] | None = vector.tolist()
            error: BaseException | None = None
        except Exception as failure:  # this job's error (a full cache, a failing forward), not the engine's
            result, error = None, failure
        self.jobs.popleft()
        self.kv_cache.free(job.job_id)
        job.on_done(result, error)
