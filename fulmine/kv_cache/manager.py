"""Per-request block tables over the block pool: check (`can_allocate`) then act (`allocate`)."""

from __future__ import annotations

from fulmine.kv_cache.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_needed(self, request_id: str, num_total_tokens: int) -> int:
        """Blocks still to allocate so that `num_total_tokens` tokens of the request fit."""
        have = len(self.block_tables.get(request_id, ()))
        return max(0, cdiv(num_total_tokens, self.block_size) - have)

    def can_allocate(self, request_id: str, num_total_tokens: int) -> bool:
        return self.pool.can_allocate(self.num_blocks_needed(request_id, num_total_tokens))

    def allocate(self, request_id: str, num_total_tokens: int) -> list[int]:
        """Grow the request's block table to hold `num_total_tokens`; returns the table."""
        table = self.block_tables.setdefault(request_id, [])
        table.extend(self.pool.allocate(self.num_blocks_needed(request_id, num_total_tokens)))
        return table

    def free(self, request_id: str) -> None:
        table = self.block_tables.pop(request_id, None)
        if table:
            # Freed in table order so a later request tends to get the same run of blocks back:
            # a contiguous run lets attention read the cache as a view instead of a gather.
            self.pool.free(table)
