"""Per-request block tables over the block pool, with prefix matching.

Check, then act: `match_prefix` finds the cached blocks a request can start from,
`can_allocate` says whether the rest fits, `allocate` takes them. `cache_full_blocks` registers
a request's blocks once they are full and computed, generated tokens included, so a follow-up
chat turn finds the whole previous conversation.
"""

from __future__ import annotations

from fulmine.kv_cache.block_pool import BlockPool
from fulmine.kv_cache.keys import BlockKey, block_keys
from fulmine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self._keys: dict[str, list[BlockKey]] = {}  # keys of each request's registered blocks, in order
        self.num_queried_tokens = 0  # prefix cache statistics
        self.num_hit_tokens = 0

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the longest known prefix of `token_ids`, leaving at least one
        token to compute (its logits are needed)."""
        matched = self.peek_prefix(token_ids)
        if self.enable_prefix_caching:
            self.num_queried_tokens += len(token_ids)
            self.num_hit_tokens += len(matched) * self.block_size
        return matched

    def peek_prefix(self, token_ids: list[int]) -> list[int]:
        """match_prefix without counting the query (admission predicts with it from another thread)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        matched = []
        for key in block_keys(token_ids, self.block_size, max_blocks):
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def num_blocks_needed(self, request_id: str, num_total_tokens: int, matched: list[int] | None = None) -> int:
        """Blocks to take from the pool so that `num_total_tokens` tokens fit (matched blocks included)."""
        have = len(self.block_tables.get(request_id, ())) + len(matched or ())
        revived = sum(1 for b in matched or () if self.pool.is_evictable(b))  # touching them uses capacity
        return max(0, cdiv(num_total_tokens, self.block_size) - have) + revived

    def can_allocate(self, request_id: str, num_total_tokens: int, matched: list[int] | None = None) -> bool:
        return self.pool.can_allocate(self.num_blocks_needed(request_id, num_total_tokens, matched))

    def allocate(self, request_id: str, num_total_tokens: int, matched: list[int] | None = None) -> list[int]:
        """Grow the request's block table to hold `num_total_tokens`, starting from `matched`."""
        table = self.block_tables.setdefault(request_id, [])
        if matched:
            assert not table, "a prefix is matched only when a request is admitted"
            self.pool.touch(matched)
            table.extend(matched)
        missing = max(0, cdiv(num_total_tokens, self.block_size) - len(table))
        table.extend(self.pool.allocate(missing))
        return table

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are full and computed."""
        if not self.enable_prefix_caching:
            return
        request_id = request.request_id
        table = self.block_tables[request_id]
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        known = self._keys.setdefault(request_id, [])
        if num_full <= len(known):
            return  # the common decode step: no block filled up
        keys = block_keys(request.all_token_ids, self.block_size, num_full, known)
        for index in range(len(known), num_full):
            self.pool.register(table[index], keys[index])
        self._keys[request_id] = keys

    def free(self, request_id: str) -> None:
        self._keys.pop(request_id, None)
        table = self.block_tables.pop(request_id, None)
        if table:
            # Tail first: a prefix's later blocks are evicted before its earlier, more shared ones.
            self.pool.free(table[::-1])
