"""Prefix-cache block keys: a stable, documented, collision-resistant name for a block's contents.

    key(block i) = SHA-256( key(block i-1) | token ids of block i as little-endian uint32 )

(the first block with no parent key), `block_size` tokens per block. A key names the block's own
tokens and, through its parent, every token before them, so equal keys mean equal prefixes (up to
SHA-256's collision resistance, not a 64-bit hash's). The same in every process and on every
machine: a router that knows a replica's cached keys finds the longest cached prefix of a prompt
with this function alone, as the engine does (kv_cache/manager.py).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockKey = bytes  # 32 bytes


def block_keys(
    token_ids: Sequence[int], block_size: int, num_blocks: int | None = None, start: Sequence[BlockKey] = ()
) -> list[BlockKey]:
    """The keys of the first `num_blocks` full blocks of `token_ids` (all full blocks by default),
    continuing from `start` (the keys of its first blocks, already known)."""
    full = len(token_ids) // block_size
    num_blocks = full if num_blocks is None else min(num_blocks, full)
    keys = list(start[:num_blocks])
    pack = struct.Struct(f"<{block_size}I").pack
    for index in range(len(keys), num_blocks):
        digest = hashlib.sha256(keys[-1] if keys else b"")
        digest.update(pack(*token_ids[index * block_size : (index + 1) * block_size]))
        keys.append(digest.digest())
    return keys
