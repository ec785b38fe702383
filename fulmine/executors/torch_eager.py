"""The PyTorch executor: any step, any model, any device, one op at a time.

The step's attention layout (layers/attention.py) is chosen here: a fresh single prompt attends to
its own keys, a single sequence with contiguous blocks reads a view of the cache, otherwise each
sequence's context is gathered by slot and queries are padded to the longest.
"""

from __future__ import annotations

import torch

from fulmine.executors.base import ModelState
from fulmine.executors.step import StepBatch
from fulmine.layers.attention import AttentionMetadata


def unsupported_reason(state: ModelState) -> str | None:
    return None


class TorchExecutor:
    name = "torch"

    def __init__(self, state: ModelState) -> None:
        self.state = state
        self.num_threads = torch.get_num_threads()

    def accepts(self, batch: StepBatch) -> bool:
        return True

    def forward(self, batch: StepBatch) -> torch.Tensor:
        state = self.state
        if state.device.type == "cpu":
            use_torch_threads(self.num_threads)  # the GEMMs are PyTorch's: all threads
        input_ids = torch.tensor(batch.token_ids, dtype=torch.long, device=state.device)
        return state.model(input_ids, state.kv_caches, self._attention(batch))

    def _attention(self, batch: StepBatch) -> list[AttentionMetadata]:
        state, device = self.state, self.state.device
        position_ids = torch.tensor(batch.positions, dtype=torch.long, device=device)
        slots = [slot for s in batch.seqs for slot in s.slots(state.block_size)]
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
        window = state.model.config.sliding_window
        by_kind: dict[bool, AttentionMetadata] = {}
        for sliding in set(state.layer_is_sliding):  # full-context layers, sliding-window layers
            rotary = state.rotary_sliding if sliding else state.rotary
            by_kind[sliding] = AttentionMetadata(slot_mapping, *rotary.lookup(position_ids))
            self._layout(by_kind[sliding], batch, window if sliding else None)
        return [by_kind[sliding] for sliding in state.layer_is_sliding]

    def _layout(self, meta: AttentionMetadata, batch: StepBatch, window: int | None) -> None:
        """Choose how attention reads the cache this step (see layers/attention.py)."""
        bs, device, seqs = self.state.block_size, self.state.device, batch.seqs
        starts = [s.start for s in seqs]
        query_lens = [s.num_tokens for s in seqs]
        context_lens = [s.end for s in seqs]
        max_query, max_context = max(query_lens), max(context_lens)
        windowed = window is not None and window < max_context
        if len(seqs) == 1:
            if starts[0] == 0 and not windowed:
                meta.is_fresh = True
                return
            table = seqs[0].block_table[: -(-max_context // bs)]
            if table[-1] - table[0] == len(table) - 1 and table == list(range(table[0], table[-1] + 1)):
                meta.kv_range = (table[0] * bs, table[0] * bs + max_context)
            if max_query == 1 and not windowed:
                if meta.kv_range is None:
                    meta.kv_slots = self._slots([table], context_lens, max_context)
                return  # one query token sees its whole context: no mask
        if meta.kv_range is None:
            meta.kv_slots = self._slots([s.block_table for s in seqs], context_lens, max_context)
        # query positions, padded rows at position 0 (they see key 0 only and are discarded)
        query_pos = torch.zeros(len(seqs), max_query, dtype=torch.long)
        for row, (start, n) in enumerate(zip(starts, query_lens)):
            query_pos[row, :n] = torch.arange(start, start + n)
        query_pos = query_pos.to(device).unsqueeze(-1)  # [num_seqs, max_query, 1]
        key_pos = torch.arange(max_context, device=device)
        mask = key_pos <= query_pos
        if window is not None:
            mask &= key_pos > query_pos - window
        meta.attn_mask = mask.unsqueeze(1)  # [num_seqs, 1, max_query, max_context]
        if len(seqs) > 1:
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
        bs, device = self.state.block_size, self.state.device
        num_blocks = -(-max_context // bs)
        padded = [t[:num_blocks] + [0] * (num_blocks - len(t[:num_blocks])) for t in tables]
        block_ids = torch.tensor(padded, dtype=torch.long, device=device)
        positions = torch.arange(max_context, device=device)
        slots = block_ids[:, positions // bs] * bs + positions % bs
        lengths = torch.tensor(context_lens, dtype=torch.long, device=device).unsqueeze(1)
        return torch.where(positions < lengths, slots, self.state.null_slot)


def use_torch_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
