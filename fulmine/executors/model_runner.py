"""The model runner: a step batch -> an executor's forward -> sampled tokens.

It owns the device state (the model, the paged KV cache, the rotary tables, in `ModelState`), the
executors that run steps on it (executors/), the sampler and each seeded request's generator. It
sees only `StepBatch`es, plain data. One device-to-host copy per step (the sampled tokens, with
their logprobs when asked for).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fulmine.executors import make_executors
from fulmine.executors.base import Executor, allocate_model_state
from fulmine.executors.step import ModelRunnerOutput, SequenceStep, StepBatch
from fulmine.models.decoder import CausalLM
from fulmine.request import TokenLogprobs
from fulmine.sampling.sampler import Sampler, SamplerOutput, SamplingBatch, logprobs_of


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
        exact_kernels: bool = False,
        executor: str = "auto",
        max_num_seqs: int = 64,
        kv_dtype: torch.dtype | None = None,  # the KV cache's element type (default: dtype)
    ) -> None:
        self.model, self.config = model, model.config
        self.device, self.block_size = device, block_size
        self.state = allocate_model_state(
            model, num_blocks, block_size, max_model_len, device, dtype, exact_kernels, kv_dtype or dtype
        )
        self.kv_caches = self.state.kv_caches
        self.executors: list[Executor] = make_executors(self.state, executor, max_num_seqs)
        self.sampler = Sampler(device, seed)
        self.generators: dict[str, torch.Generator] = {}
        self.last_executor = ""  # which executor ran the latest step (tests, metrics)
        # tensor parallel: tells the other ranks to do what this one does (engine/ranks.py)
        self.tell: Callable[[tuple[str, Any]], None] | None = None

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> ModelRunnerOutput:
        if self.tell is not None:
            self.tell(("execute", batch))
        executor = next(e for e in self.executors if e.accepts(batch))
        self.last_executor = executor.name
        hidden = executor.forward(batch)
        prompt_logprobs = self._prompt_logprobs(batch, hidden)
        rows = [
            (s, i) for s, offset in zip(batch.seqs, batch.row_offsets) if s.samples for i in _sample_rows(s, offset)
        ]
        if not rows:  # only prefill chunks this step
            return ModelRunnerOutput(sampled={}, prompt_logprobs=prompt_logprobs)
        seqs = [s for s, _ in rows]
        sample_index = torch.tensor([i for _, i in rows], dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden[sample_index])
        sampling = self._sampling(batch, seqs)
        if batch.token_masks is not None:  # constrained rows: a sequence's rows are consecutive
            sampling.token_masks, sampling.row_ids = batch.token_masks, [s.request_id for s in seqs]
        result = self.sampler(logits, sampling, self._draft_ids(batch, seqs))
        token_ids = result.token_ids.tolist()  # the step's device-to-host copy
        output = ModelRunnerOutput({}, {}, prompt_logprobs)
        if result.accepted is None:
            output.sampled = {s.request_id: [t] for s, t in zip(seqs, token_ids)}
        else:
            output.sampled = _verified(seqs, token_ids, result.accepted.tolist())
        if result.logprobs is not None:
            output.logprobs = _pack_logprobs(seqs, result)
        return output

    @torch.inference_mode()
    def execute_isolated(self, batch: StepBatch) -> tuple[ModelRunnerOutput, list[tuple[str, Exception]]]:
        """Run the batch. If it raises, find the requests that make it raise by running halves of the
        batch (bisecting) and return, with the others' results, each failing request's id and error.

        Rerunning is safe: a request's KV slots are rewritten with the same values, and each seeded
        request's generator is rewound to where it stood before the step, so the requests that did
        not fail get the tokens they would have had in a step without the failing ones."""
        rng = self.rng_states([s.request_id for s in batch.seqs])
        try:
            return self.execute(batch), []
        except Exception as error:
            merged, failed = ModelRunnerOutput({}), []

            def bisect(group: StepBatch, error: Exception) -> None:
                if len(group.seqs) == 1:
                    failed.append((group.seqs[0].request_id, error))
                    return
                half, ids = len(group.seqs) // 2, [s.request_id for s in group.seqs]
                for part in (group.subset(set(ids[:half])), group.subset(set(ids[half:]))):
                    self.set_rng_states(rng, [s.request_id for s in part.seqs])
                    try:
                        merged.merge(self.execute(part))
                    except Exception as part_error:
                        bisect(part, part_error)

            bisect(batch, error)
            return merged, failed

    def hidden_states(self, batch: StepBatch) -> torch.Tensor:
        """[num_tokens, hidden] final (normed) hidden states of the batch's tokens, nothing sampled."""
        if self.tell is not None:
            self.tell(("hidden", batch))
        executor = next(e for e in self.executors if e.accepts(batch))
        return executor.forward(batch).float()

    def _sampling(self, batch: StepBatch, seqs: list[SequenceStep]) -> SamplingBatch:
        """Per sampled row (a sequence's last real token, then one per draft): how to sample it."""
        draw_indices: list[int] = []  # per row: the index of the output token it draws
        for s in batch.seqs:
            if s.samples:
                first = len(s.output_token_ids)
                draw_indices.extend(range(first, first + s.num_drafts + 1))
        return SamplingBatch.build(
            [s.params for s in seqs],
            # the C sampler draws from counter-based keys: per-request generators only for PyTorch's
            [self._generator(s) if self.sampler.kernel is None else None for s in seqs],
            [(s.prompt_token_ids, s.output_token_ids) for s in seqs],
            self.config.vocab_size,
            self.device,
            draw_indices,
            dense_tables=self.sampler.kernel is None,
        )

    def _draft_ids(self, batch: StepBatch, seqs: list[SequenceStep]) -> torch.Tensor | None:
        """Per sampled row, the draft token it verifies (-1: none); None when nothing is drafted."""
        if not any(s.num_drafts for s in batch.seqs):
            return None
        row_drafts = [d for s in batch.seqs if s.samples for d in (*s.draft_token_ids, -1)]
        return torch.tensor(row_drafts, dtype=torch.long, device=self.device)

    def _prompt_logprobs(self, batch: StepBatch, hidden: torch.Tensor) -> dict[str, list[TokenLogprobs]]:
        """Logprobs of each prompt token given the ones before it, for requests that ask for them.

        Prompt position p (computed this step) predicts prompt token p + 1; a sequence's rows are
        contiguous in `hidden`. The prompt's last position predicts the first generated token,
        which the sampler reports.
        """
        out: dict[str, list[TokenLogprobs]] = {}
        for s, offset in zip(batch.seqs, batch.row_offsets):
            k = s.params.prompt_logprobs
            end = min(s.end - s.num_drafts, len(s.prompt_token_ids) - 1)
            if k is None or end <= s.start:
                continue
            logprobs = self.model.compute_logits(hidden[offset : offset + end - s.start]).log_softmax(dim=-1)
            targets = torch.tensor(s.prompt_token_ids[s.start + 1 : end + 1], device=self.device)
            rows = _token_logprobs(logprobs_of(logprobs, targets, k), [k] * (end - s.start))
            out[s.request_id] = [row for row in rows if row is not None]
        return out

    def rng_states(self, request_ids: list[str]) -> dict[str, torch.Tensor | None]:
        """Where each seeded request's generator stands (None: not made yet), to rewind a failed step."""
        if not self.generators:
            return {}
        return {i: g.get_state() if (g := self.generators.get(i)) else None for i in request_ids}

    def set_rng_states(self, states: dict[str, torch.Tensor | None], request_ids: list[str]) -> None:
        for request_id in request_ids:
            state = states.get(request_id)
            if state is None:
                self.generators.pop(request_id, None)  # made by the failed attempt: made afresh
            else:
                self.generators[request_id].set_state(state)

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self.generators.pop(request_id, None)

    def _generator(self, seq: SequenceStep) -> torch.Generator | None:
        seed = seq.params.seed
        if seed is None or seq.params.is_greedy:
            return None
        generator = self.generators.get(seq.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self.generators[seq.request_id] = generator
        return generator


def _sample_rows(seq: SequenceStep, offset: int) -> range:
    """The rows a sampling sequence samples at: its last real token's, then one per draft."""
    end = offset + seq.num_tokens
    return range(end - 1 - seq.num_drafts, end)


def _verified(seqs: list[SequenceStep], token_ids: list[int], accepted: list[bool]) -> dict[str, list[int]]:
    """Per sequence: its drafts up to the first rejected one, then the token sampled at that row."""
    out: dict[str, list[int]] = {}
    row = 0
    while row < len(seqs):
        seq = seqs[row]
        tokens = out[seq.request_id] = []
        for draft in seq.draft_token_ids:
            if not accepted[row]:
                break
            tokens.append(draft)
            row += 1
        tokens.append(token_ids[row])
        row += seq.num_drafts - len(tokens) + 2  # to the sequence's next row
    return out


def _pack_logprobs(seqs: list[SequenceStep], result: SamplerOutput) -> dict[str, TokenLogprobs]:
    rows = _token_logprobs(result, [s.params.logprobs for s in seqs])
    return {s.request_id: row for s, row in zip(seqs, rows) if row is not None}


def _token_logprobs(result: SamplerOutput, ks: list[int | None]) -> list[TokenLogprobs | None]:
    """A batch's logprobs copied to the host once, each row cut to its own top k (None: not asked)."""
    assert result.logprobs is not None
    chosen = result.logprobs.tolist()
    top_ids = result.top_ids.tolist() if result.top_ids is not None else None
    top_logprobs = result.top_logprobs.tolist() if result.top_logprobs is not None else None
    rows: list[TokenLogprobs | None] = []
    for row, k in enumerate(ks):
        if k is None:
            rows.append(None)
            continue
        top = list(zip(top_ids[row][:k], top_logprobs[row][:k])) if top_ids and top_logprobs else []
        rows.append(TokenLogprobs(chosen[row], top))
    return rows
