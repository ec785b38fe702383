"""Block pool and KV cache manager invariants."""

from __future__ import annotations

import pytest

from fulmine.kv_cache import BlockPool, KVCacheManager


def test_pool_allocates_and_frees_every_block_once() -> None:
    pool = BlockPool(8)
    first = pool.allocate(5)
    assert len(set(first)) == 5 and pool.num_free_blocks == 3
    assert not pool.can_allocate(4)
    with pytest.raises(RuntimeError):
        pool.allocate(4)
    pool.free(first)
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(first[:1])


def test_manager_grows_tables_by_whole_blocks() -> None:
    manager = KVCacheManager(num_blocks=10, block_size=4)
    assert manager.num_blocks_needed("a", 9) == 3
    table = manager.allocate("a", 9)
    assert len(table) == 3
    assert manager.allocate("a", 12) == table  # 12 tokens still fit in 3 blocks
    assert len(manager.allocate("a", 13)) == 4
    assert manager.can_allocate("b", 24) and not manager.can_allocate("b", 25)
    manager.free("a")
    manager.free("a")  # freeing an unknown request is a no-op
    assert manager.pool.num_free_blocks == 10


def test_freed_run_comes_back_contiguous() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=4)
    manager.allocate("a", 16)
    manager.allocate("b", 8)
    manager.free("a")
    manager.allocate("c", 8)  # takes the tail of the never-used blocks first
    table = manager.allocate("d", 16)
    assert table == list(range(table[0], table[0] + len(table))) or len(table) == 4
