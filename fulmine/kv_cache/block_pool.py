"""The pool of KV cache blocks: free list, reference counts, and the prefix cache.

Block ids index the physical cache tensors owned by the model runner; this module never touches
them. A full block whose contents are known is registered under its key (kv_cache/keys.py: a
SHA-256 chain over the prefix's token ids), so a later request with the same prefix can reuse it. A block with
no references is either plain free or, if registered, evictable: it keeps its contents until
the pool runs out of plain free blocks, and the least recently released goes first.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from fulmine.kv_cache.keys import BlockKey


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, no contents worth keeping
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, registered; LRU first
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by running requests, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        block_ids = []
        for _ in range(num_blocks):
            if self._free:
                block_id = self._free.popleft()
            else:  # reuse the least recently released cached block: its contents are forgotten
                block_id, _ = self._evictable.popitem(last=False)
                del self._block_of[self._key_of.pop(block_id)]
            self.ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            count = self.ref_counts[block_id]
            if count <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            self.ref_counts[block_id] = count - 1
            if count == 1:
                if block_id in self._key_of:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)

    # -- the prefix cache -------------------------------------------------------------------
    def cached_keys(self) -> list[BlockKey]:
        """Every cached block's key (one C-level copy: safe to call from another thread)."""
        return list(self._block_of)

    def lookup(self, key: BlockKey) -> int | None:
        return self._block_of.get(key)

    def is_evictable(self, block_id: int) -> bool:
        return block_id in self._evictable

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference to cached blocks (found by `lookup`)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self.ref_counts[block_id] += 1

    def register(self, block_id: int, key: BlockKey) -> None:
        """Record that a referenced, full block holds the tokens `key` names."""
        if key in self._block_of or block_id in self._key_of:
            return  # an identical block is already cached, or this one is
        self._key_of[block_id] = key
        self._block_of[key] = block_id
