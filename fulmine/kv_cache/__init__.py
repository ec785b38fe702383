"""Paged KV cache bookkeeping: which fixed-size blocks of the cache tensors each request owns."""

from fulmine.kv_cache.block_pool import BlockPool
from fulmine.kv_cache.keys import block_keys
from fulmine.kv_cache.manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager", "block_keys"]
