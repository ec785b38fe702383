"""The model runner: scheduled requests -> input tensors -> forward -> sampled tokens.

It owns the device state: the model, the paged KV cache tensors, the rotary tables, the sampler
and each seeded request's generator. One device-to-host copy per step (the sampled tokens, with
their logprobs when asked for).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fulmine.engine.outputs import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from fulmine.layers.attention import AttentionMetadata
from fulmine.layers.rotary import RotaryEmbedding
from fulmine.models.decoder import DecoderModel
from fulmine.models.fused import FusedDecoder, unsupported_reason
from fulmine.request import Request, TokenLogprobs
from fulmine.sampling.sampler import Sampler, SamplerOutput, SamplingBatch, logprobs_of


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens], every scheduled request's new tokens, back to back
    attention: list[AttentionMetadata]  # per layer; layers of one kind share one object (PyTorch path)
    fused: tuple[list[int], list[int], list[int], list[list[int]]] | None = None  # FusedDecoder's arguments
    sample_index: torch.Tensor | None = None  # [num_sampling] rows of the hidden states to sample from
    sampling: SamplingBatch | None = None
    sampling_requests: list[Request] = field(default_factory=list)  # per sampled row
    draft_ids: torch.Tensor | None = None  # [num_sampling] draft token each row verifies, -1: none
    drafts: dict[str, list[int]] = field(default_factory=dict)  # request id -> its drafts this step
    row_offsets: list[int] = field(default_factory=list)  # first row of each scheduled request


class ModelRunner:
    def __init__(
        self,
        model: DecoderModel,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
        exact_kernels: bool = False,
    ) -> None:
        config = model.config
        self.model, self.config = model, config
        self.device, self.block_size = device, block_size
        # One spare slot past the blocks stays zero: padded context positions read it, so
        # attention never reads a never-written slot, and the cache can be allocated without
        # initialization (on CPU, pages become resident only as blocks are used).
        self.null_slot = num_blocks * block_size
        shape = (self.null_slot + 1, config.num_kv_heads, config.head_dim)
        self.kv_caches = []
        for _ in range(config.num_layers):
            k_cache, v_cache = (
                torch.empty(shape, dtype=dtype, device=device),
                torch.empty(shape, dtype=dtype, device=device),
            )
            k_cache[self.null_slot].zero_()
            v_cache[self.null_slot].zero_()
            self.kv_caches.append((k_cache, v_cache))
        self.rotary = RotaryEmbedding(
            config.head_dim, max_model_len, config.rope_theta, config.rope_scaling, device, dtype
        )
        self.rotary_sliding = self.rotary
        if config.rope_theta_sliding is not None:  # Gemma 3: local layers use their own base
            self.rotary_sliding = RotaryEmbedding(
                config.head_dim, max_model_len, config.rope_theta_sliding, None, device, dtype
            )
        self.layer_is_sliding = [config.is_sliding(layer) for layer in range(config.num_layers)]
        self.fused: FusedDecoder | None = None
        if unsupported_reason(model, device, dtype) is None:
            self.fused = FusedDecoder(
                model,
                self.kv_caches,
                self.rotary,
                self.rotary_sliding,
                self.layer_is_sliding,
                block_size,
                exact_kernels,
            )
        self.sampler = Sampler(device, seed)
        self.num_threads = torch.get_num_threads()
        self.generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_tables: dict[str, list[int]]) -> ModelRunnerOutput:
        step = self._prepare(out.scheduled, block_tables)
        # One owner for the cores: a fused step's matrices run in the C kernels' own pool, so what
        # PyTorch does around it (sampling extras, logprobs) runs on this thread alone, never waking
        # its OpenMP pool to spin against the kernels'. Larger steps' GEMMs are PyTorch's: all threads.
        _use_torch_threads(1 if step.fused is not None else self.num_threads)
        if step.fused is not None:
            assert self.fused is not None
            hidden = self.fused(*step.fused)
        else:
            hidden = self.model(step.input_ids, self.kv_caches, step.attention)
        prompt_logprobs = self._prompt_logprobs(out.scheduled, step.row_offsets, hidden)
        if step.sampling is None:  # only prefill chunks this step
            return ModelRunnerOutput(sampled={}, prompt_logprobs=prompt_logprobs)
        logits = self.model.compute_logits(hidden[step.sample_index])
        result = self.sampler(logits, step.sampling, step.draft_ids)
        token_ids = result.token_ids.tolist()  # the step's device-to-host copy
        requests = step.sampling_requests
        output = ModelRunnerOutput({}, {}, prompt_logprobs)
        if result.accepted is None:
            output.sampled = {r.request_id: [t] for r, t in zip(requests, token_ids)}
        else:
            output.sampled = _verified(requests, token_ids, result.accepted.tolist(), step.drafts)
        if result.logprobs is not None:
            output.logprobs = _pack_logprobs(requests, result)
        return output

    def _prompt_logprobs(
        self, scheduled: list[ScheduledRequest], row_offsets: list[int], hidden: torch.Tensor
    ) -> dict[str, list[TokenLogprobs]]:
        """Logprobs of each prompt token given the ones before it, for requests that ask for them.

        Prompt position p (computed this step) predicts prompt token p + 1; a chunk's rows are
        contiguous in `hidden`. The prompt's last position predicts the first generated token,
        which the sampler reports.
        """
        out: dict[str, list[TokenLogprobs]] = {}
        for s, offset in zip(scheduled, row_offsets):
            request = s.request
            k = request.sampling_params.prompt_logprobs
            start = request.num_computed_tokens
            end = min(start + s.num_new_tokens, request.num_prompt_tokens - 1)
            if k is None or end <= start:
                continue
            logprobs = self.model.compute_logits(hidden[offset : offset + end - start]).log_softmax(dim=-1)
            targets = torch.tensor(request.prompt_token_ids[start + 1 : end + 1], device=self.device)
            rows = _token_logprobs(logprobs_of(logprobs, targets, k), [k] * (end - start))
            out[request.request_id] = [row for row in rows if row is not None]
        return out

    def rng_states(self, requests: list[Request]) -> dict[str, torch.Tensor | None]:
        """Where each seeded request's generator stands (None: not made yet), to rewind a failed step."""
        if not self.generators:
            return {}
        return {r.request_id: g.get_state() if (g := self.generators.get(r.request_id)) else None for r in requests}

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

    def _prepare(self, scheduled: list[ScheduledRequest], block_tables: dict[str, list[int]]) -> StepInputs:
        bs, device = self.block_size, self.device
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        row_offsets: list[int] = []
        sample_requests: list[Request] = []
        row_drafts: list[int] = []  # per sampled row: the draft it verifies, -1 for none
        draw_indices: list[int] = []  # per sampled row: the index of the output token it draws
        for s in scheduled:
            request, start = s.request, s.request.num_computed_tokens
            drafts = s.draft_token_ids
            end = start + s.num_new_tokens + len(drafts)
            table = block_tables[request.request_id]
            row_offsets.append(len(token_ids))
            token_ids.extend(_token_slice(request, start, end - len(drafts)))
            token_ids.extend(drafts)
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if s.samples:  # the last real token's row, then one row per draft
                first = len(token_ids) - 1 - len(drafts)
                sample_rows.extend(range(first, len(token_ids)))
                sample_requests.extend([request] * (len(drafts) + 1))
                num_output = len(request.output_token_ids)
                draw_indices.extend(range(num_output, num_output + len(drafts) + 1))
                row_drafts.extend([*drafts, -1])
        if self.fused is not None and len(token_ids) <= self.fused.max_tokens:
            step = StepInputs(torch.empty(0), [])
            seq_index = [i for i, s in enumerate(scheduled) for _ in range(s.num_new_tokens + len(s.draft_token_ids))]
            tables = [block_tables[s.request.request_id] for s in scheduled]
            step.fused = (token_ids, positions, seq_index, tables)
        else:
            step = StepInputs(
                torch.tensor(token_ids, dtype=torch.long, device=device),
                self._attention(scheduled, block_tables, positions, slots),
            )
        step.row_offsets = row_offsets
        if sample_rows:
            requests = sample_requests
            step.sampling_requests = requests
            step.drafts = {s.request.request_id: s.draft_token_ids for s in scheduled if s.draft_token_ids}
            if step.drafts:
                step.draft_ids = torch.tensor(row_drafts, dtype=torch.long, device=device)
            step.sample_index = torch.tensor(sample_rows, dtype=torch.long, device=device)
            step.sampling = SamplingBatch.build(
                [r.sampling_params for r in requests],
                # the C sampler draws from counter-based keys: per-request generators only for PyTorch's
                [self._generator(r) if self.sampler.kernel is None else None for r in requests],
                [(r.prompt_token_ids, r.output_token_ids) for r in requests],
                self.config.vocab_size,
                device,
                draw_indices,
                dense_tables=self.sampler.kernel is None,
            )
        return step

    def _attention(
        self,
        scheduled: list[ScheduledRequest],
        block_tables: dict[str, list[int]],
        positions: list[int],
        slots: list[int],
    ) -> list[AttentionMetadata]:
        device = self.device
        position_ids = torch.tensor(positions, dtype=torch.long, device=device)
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
        by_kind: dict[bool, AttentionMetadata] = {}
        for sliding in set(self.layer_is_sliding):  # full-context layers, sliding-window layers
            rotary = self.rotary_sliding if sliding else self.rotary
            by_kind[sliding] = AttentionMetadata(slot_mapping, *rotary.lookup(position_ids))
            self._layout(by_kind[sliding], scheduled, block_tables, self.config.sliding_window if sliding else None)
        return [by_kind[sliding] for sliding in self.layer_is_sliding]

    def _layout(
        self,
        meta: AttentionMetadata,
        scheduled: list[ScheduledRequest],
        block_tables: dict[str, list[int]],
        window: int | None,
    ) -> None:
        """Choose how attention reads the cache this step (see layers/attention.py)."""
        bs, device = self.block_size, self.device
        starts = [s.request.num_computed_tokens for s in scheduled]
        query_lens = [s.num_new_tokens + len(s.draft_token_ids) for s in scheduled]
        context_lens = [a + n for a, n in zip(starts, query_lens)]
        max_query, max_context = max(query_lens), max(context_lens)
        windowed = window is not None and window < max_context
        if len(scheduled) == 1:
            if starts[0] == 0 and not windowed:
                meta.is_fresh = True
                return
            table = block_tables[scheduled[0].request.request_id][: -(-max_context // bs)]
            if table[-1] - table[0] == len(table) - 1 and table == list(range(table[0], table[-1] + 1)):
                meta.kv_range = (table[0] * bs, table[0] * bs + max_context)
            if max_query == 1 and not windowed:
                if meta.kv_range is None:
                    meta.kv_slots = self._slots([table], context_lens, max_context)
                return  # one query token sees its whole context: no mask
        if meta.kv_range is None:
            tables = [block_tables[s.request.request_id] for s in scheduled]
            meta.kv_slots = self._slots(tables, context_lens, max_context)
        # query positions, padded rows at position 0 (they see key 0 only and are discarded)
        query_pos = torch.zeros(len(scheduled), max_query, dtype=torch.long)
        for row, (start, n) in enumerate(zip(starts, query_lens)):
            query_pos[row, :n] = torch.arange(start, start + n)
        query_pos = query_pos.to(device).unsqueeze(-1)  # [num_seqs, max_query, 1]
        key_pos = torch.arange(max_context, device=device)
        mask = key_pos <= query_pos
        if window is not None:
            mask &= key_pos > query_pos - window
        meta.attn_mask = mask.unsqueeze(1)  # [num_seqs, 1, max_query, max_context]
        if len(scheduled) > 1:
            query_index: list[list[int]] = []
            output_index: list[int] = []
            offset = 0
            for row, n in enumerate(query_lens):
                query_index.append(list(range(offset, offset + n)) + [0] * (max_query - n))
                output_index.extend(range(row * max_query, row * max_query + n))
                offset += n
            meta.query_index = torch.tensor(query_index, dtype=torch.long, device=device)
            meta.output_index = torch.tensor(output_index, dtype=torch.long, device=device)

    def _slots(self, tables: list[list[int]], context_lens: list[int], max_context: int) -> torch.Tensor:
        """[num_seqs, max_context] cache slot of every context position; padding reads the null slot."""
        bs, device = self.block_size, self.device
        num_blocks = -(-max_context // bs)
        padded = [t[:num_blocks] + [0] * (num_blocks - len(t[:num_blocks])) for t in tables]
        block_ids = torch.tensor(padded, dtype=torch.long, device=device)
        positions = torch.arange(max_context, device=device)
        slots = block_ids[:, positions // bs] * bs + positions % bs
        lengths = torch.tensor(context_lens, dtype=torch.long, device=device).unsqueeze(1)
        return torch.where(positions < lengths, slots, self.null_slot)

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None or request.sampling_params.is_greedy:
            return None
        generator = self.generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self.generators[request.request_id] = generator
        return generator


def _use_torch_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _verified(
    requests: list[Request], token_ids: list[int], accepted: list[bool], drafts: dict[str, list[int]]
) -> dict[str, list[int]]:
    """Per request: its drafts up to the first rejected one, then the token sampled at that row."""
    out: dict[str, list[int]] = {}
    row = 0
    while row < len(requests):
        request_id = requests[row].request_id
        tokens = out[request_id] = []
        for draft in drafts.get(request_id, []):
            if not accepted[row]:
                break
            tokens.append(draft)
            row += 1
        tokens.append(token_ids[row])
        row += len(drafts.get(request_id, [])) - len(tokens) + 2  # to the request's next row
    return out


def _pack_logprobs(requests: list[Request], result: SamplerOutput) -> dict[str, TokenLogprobs]:
    rows = _token_logprobs(result, [r.sampling_params.logprobs for r in requests])
    return {r.request_id: row for r, row in zip(requests, rows) if row is not None}


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


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    prompt = request.prompt_token_ids
    if end <= len(prompt):
        return prompt[start:end]
    if start >= len(prompt):
        return request.output_token_ids[start - len(prompt) : end - len(prompt)]
    return prompt[start:] + request.output_token_ids[: end - len(prompt)]
