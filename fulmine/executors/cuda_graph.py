"""The CUDA-graph executor: decode steps replayed from captured graphs.

A decode step of a 32-layer model is some 500 kernel launches; issued one by one from Python they
take longer than the GPU needs to read the weights. Each step shape (batch size, context bucket) is
captured once, on first use, into a CUDA graph sharing one memory pool; a step then copies its
token ids, positions, slots, context lengths and block tables into fixed buffers and replays.

Shapes are fixed by padding: the batch to the next of BATCH_SIZES (padded rows read one key and
write theirs to the scratch slot), the context to the next power of two of at least
MIN_CONTEXT_BUCKET (keys past a row's length read the null slot and are masked). Attention is
layers/attention.py's gather layout, so a row's numbers are the PyTorch executor's.

Decode steps only (one new token per sequence, sampled); prompts and speculative verification go to
the PyTorch executor. Without `capture` the same fixed-shape step runs eagerly, on any device: how
the tests check the padding and masking on a machine without a GPU, and a way to debug a graph.
"""

from __future__ import annotations

from typing import Any

import torch

from fulmine.executors.base import ModelState
from fulmine.executors.step import StepBatch
from fulmine.layers.attention import AttentionMetadata

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_CONTEXT_BUCKET = 256


def unsupported_reason(state: ModelState) -> str | None:
    if state.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


class CudaGraphExecutor:
    name = "cuda-graph"

    def __init__(self, state: ModelState, max_num_seqs: int, capture: bool = True) -> None:
        self.state, self.capture = state, capture
        self.max_batch = next((b for b in BATCH_SIZES if b >= max_num_seqs), BATCH_SIZES[-1])
        bs, device = state.block_size, state.device
        self.max_context = _bucket(state.max_model_len, bs, state.max_model_len)
        max_blocks = self.max_context // bs
        # the fixed inputs every graph reads: [ids, positions, slots, context lengths] x rows, block tables
        self.rows = torch.zeros(4, self.max_batch, dtype=torch.long, device=device)
        self.tables = torch.zeros(self.max_batch, max_blocks, dtype=torch.long, device=device)
        self.key_positions = torch.arange(self.max_context, device=device)
        self.row_index = torch.arange(self.max_batch, device=device)
        pin = device.type == "cuda"
        self.host_rows = torch.zeros(4, self.max_batch, dtype=torch.long, pin_memory=pin)
        self.host_tables = torch.zeros(self.max_batch, max_blocks, dtype=torch.long, pin_memory=pin)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None  # the graphs' shared memory pool, once the first is captured

    def accepts(self, batch: StepBatch) -> bool:
        return batch.is_decode and len(batch.seqs) <= self.max_batch

    def forward(self, batch: StepBatch) -> torch.Tensor:
        n, bs = len(batch.seqs), self.state.block_size
        size = next(b for b in BATCH_SIZES if b >= n)
        bucket = _bucket(max(s.end for s in batch.seqs), bs, self.max_context)
        self._load(batch, size, bucket // bs)
        if not self.capture:
            return self._step(size, bucket)[:n]
        entry = self.graphs.get((size, bucket))
        if entry is None:
            entry = self.graphs[(size, bucket)] = self._record(size, bucket)
        else:
            entry[0].replay()
        return entry[1][:n]

    def _load(self, batch: StepBatch, size: int, num_blocks: int) -> None:
        """This step's rows into the fixed buffers: one host-to-device copy for the rows, one for the tables."""
        bs, seqs, n = self.state.block_size, batch.seqs, len(batch.seqs)
        pad = size - n  # padded rows: token 0 at position 0, writing the scratch slot, reading one key
        rows = [
            [s.token_ids[0] for s in seqs] + [0] * pad,
            [s.start for s in seqs] + [0] * pad,
            [s.block_table[s.start // bs] * bs + s.start % bs for s in seqs] + [self.state.scratch_slot] * pad,
            [s.start + 1 for s in seqs] + [1] * pad,
        ]
        tables = [(s.block_table[:num_blocks] + [0] * num_blocks)[:num_blocks] for s in seqs] + [[0] * num_blocks] * pad
        self.host_rows[:, :size] = torch.tensor(rows, dtype=torch.long)
        self.host_tables[:size, :num_blocks] = torch.tensor(tables, dtype=torch.long)
        self.rows[:, :size].copy_(self.host_rows[:, :size], non_blocking=True)
        self.tables[:size, :num_blocks].copy_(self.host_tables[:size, :num_blocks], non_blocking=True)
        if self.state.device.type == "cuda":  # the pinned host buffers are rewritten next step
            torch.cuda.current_stream().synchronize()

    def _step(self, size: int, bucket: int) -> torch.Tensor:
        """One decode step over the fixed buffers: only fixed-shape device work, so it can be captured."""
        state = self.state
        ids, positions, slots, lengths = self.rows[:, :size]
        keys = self.key_positions[:bucket]
        tables = self.tables[:size, : bucket // state.block_size]
        kv_slots = tables[:, keys // state.block_size] * state.block_size + keys % state.block_size
        visible = keys < lengths[:, None]  # [size, bucket]
        kv_slots = torch.where(visible, kv_slots, state.null_slot)
        window = state.model.config.sliding_window
        by_kind: dict[bool, AttentionMetadata] = {}
        for sliding in set(state.layer_is_sliding):
            rotary = state.rotary_sliding if sliding else state.rotary
            mask = visible & (keys > positions[:, None] - window) if sliding and window else visible
            by_kind[sliding] = AttentionMetadata(
                slots,
                *rotary.lookup(positions),
                kv_slots=kv_slots,
                query_index=self.row_index[:size, None],
                output_index=self.row_index[:size],
                attn_mask=mask[:, None, None, :],
            )
        metas = [by_kind[sliding] for sliding in state.layer_is_sliding]
        return state.model(ids, state.kv_caches, metas)

    def _record(self, size: int, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the step for this shape. The warm-up runs compute this very step (their cache
        writes are the values the step writes anyway), so capturing costs no step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(size, bucket)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._step(size, bucket)
        self.pool = graph.pool()
        graph.replay()
        return graph, out


def _bucket(context: int, block_size: int, limit: int) -> int:
    """The fixed context length a step of this context runs at: a power of two, whole blocks."""
    bucket = MIN_CONTEXT_BUCKET
    while bucket < context:
        bucket *= 2
    bucket = -(-bucket // block_size) * block_size
    return max(min(bucket, -(-limit // block_size) * block_size), -(-context // block_size) * block_size)
