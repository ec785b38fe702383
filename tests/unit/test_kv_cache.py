"""Block pool and KV cache manager invariants; how many blocks the cache gets."""

from __future__ import annotations

import pytest
import torch

from fulmine.config import ConfigError, EngineConfig
from fulmine.kv_cache import BlockPool, KVCacheManager, sizing
from fulmine.kv_cache.sizing import kv_cache_blocks


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
    assert len(table) == 4 and table == list(range(table[0], table[0] + 4))


def test_cached_blocks_survive_until_evicted_least_recent_first() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2), pool.allocate(2)
    pool.register(a[0], b"key-a")
    pool.register(b[0], b"key-b")
    pool.free(a)
    pool.free(b)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    assert pool.lookup(b"key-a") == a[0]
    pool.allocate(2)  # the two unregistered blocks: the cached ones survive
    assert pool.lookup(b"key-a") == a[0] and pool.lookup(b"key-b") == b[0]
    pool.allocate(1)  # evicts the least recently released cached block: a[0]
    assert pool.lookup(b"key-a") is None and pool.lookup(b"key-b") == b[0]


def test_touching_a_cached_block_takes_it_out_of_eviction() -> None:
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.register(block, b"key-c")
    pool.free([block])
    pool.touch([block])
    assert pool.ref_counts[block] == 1 and pool.num_free_blocks == 1
    other = pool.allocate(1)
    assert other != [block] and not pool.can_allocate(1)


def test_manager_counts_revived_blocks_against_capacity() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=2)
    from fulmine.request import Request, SamplingParams

    request = Request("a", [1, 2, 3, 4, 5], SamplingParams(), (), 100)
    manager.allocate("a", 5)
    request.num_computed_tokens = 5
    manager.cache_full_blocks(request)
    manager.free("a")
    matched = manager.match_prefix([1, 2, 3, 4, 5])
    assert len(matched) == 2
    assert manager.num_blocks_needed("b", 6, matched) == 3  # 1 new + 2 revived from eviction
    assert manager.can_allocate("b", 8, matched) and not manager.can_allocate("b", 10, matched)


def test_kv_cache_sizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen2.5-1.5B's KV cache in float32 (57 344 bytes a token, a 32 768-token context: 1.75 GB)."""
    cpu = torch.device("cpu")
    per_token, context = 57_344, 32_768
    per_request = context // 16
    # the default 1 GB is raised to one full context (it used to refuse to start)
    assert kv_cache_blocks(EngineConfig(max_num_seqs=4), per_token, context, cpu) == per_request
    # a small model: 1 GB, capped at max_num_seqs full contexts
    assert kv_cache_blocks(EngineConfig(max_num_seqs=4), 512, 256, cpu) == 4 * 16
    assert kv_cache_blocks(EngineConfig(max_num_seqs=10**6), 512, 256, cpu) == 2**30 // (16 * 512)
    # an explicit budget is kept, or refused when it cannot hold one context
    assert kv_cache_blocks(EngineConfig(kv_cache_memory_gb=4.0, max_num_seqs=64), per_token, context, cpu) == (
        4 * 2**30 // (16 * per_token)
    )
    with pytest.raises(ConfigError, match="raise kv_cache_memory_gb or lower max_model_len"):
        kv_cache_blocks(EngineConfig(kv_cache_memory_gb=1.0), per_token, context, cpu)
    # the default on a machine without the memory for one context says what to change
    monkeypatch.setattr(sizing, "_available_memory_bytes", lambda *args: 2**30)
    with pytest.raises(ConfigError, match="lower max_model_len"):
        kv_cache_blocks(EngineConfig(), per_token, context, cpu)


def test_the_default_context_is_cut_to_fit_the_memory(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A 32 768-token context of 57 344 bytes a token (1.75 GB) on a machine with 2 GB available: the
    default context becomes what half of it holds, said in one log line; an explicit one is kept."""
    from fulmine.config import ModelConfig

    model = ModelConfig("Qwen2ForCausalLM", 151936, 1536, 28, 12, 2, 128, 8960, 1e-6, 1e6, 32768, True)
    cpu = torch.device("cpu")
    monkeypatch.setattr(sizing, "_available_memory_bytes", lambda *args: 2 * 2**30)
    with caplog.at_level("WARNING", logger="fulmine.kv_cache"):
        assert sizing.fit_max_model_len(EngineConfig(), model, 57_344, cpu) == 18_720
    assert len(caplog.records) == 1 and "max_model_len is 18720" in caplog.text
    assert sizing.fit_max_model_len(EngineConfig(max_model_len=32768), model, 57_344, cpu) == 32768
    monkeypatch.setattr(sizing, "_available_memory_bytes", lambda *args: 8 * 2**30)
    assert sizing.fit_max_model_len(EngineConfig(), model, 57_344, cpu) == 32768


def test_block_keys_are_a_sha256_chain_over_the_prefix() -> None:
    """The documented scheme (kv_cache/keys.py), checked against hashlib directly: stable across
    processes and machines, so a router computes the keys a replica caches."""
    import hashlib
    import struct
    import subprocess
    import sys

    from fulmine.kv_cache import block_keys

    tokens = [1, 2, 3, 4, 70000, 6, 7]
    keys = block_keys(tokens, 2)
    assert len(keys) == 3  # full blocks only
    first = hashlib.sha256(struct.pack("<2I", 1, 2)).digest()
    assert keys[0] == first
    assert keys[1] == hashlib.sha256(first + struct.pack("<2I", 3, 4)).digest()
    assert block_keys(tokens[:4] + [5, 5], 2)[:2] == keys[:2] and block_keys([9, 2, 3, 4], 2)[1] != keys[1]
    assert block_keys(tokens, 2, start=keys[:1]) == keys and block_keys(tokens, 2, num_blocks=1) == keys[:1]
    assert block_keys(tokens, 3)[0] != block_keys(tokens, 2)[0]
    code = "from fulmine.kv_cache import block_keys; print(block_keys([1, 2, 3, 4, 70000, 6, 7], 2)[2].hex())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == keys[2].hex()
