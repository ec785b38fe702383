"""How many blocks the KV cache gets: bytes a token, the configured or default budget, the machine."""

from __future__ import annotations

import torch

from fulmine.config import ConfigError, EngineConfig, ModelConfig


def kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element


DEFAULT_KV_CACHE_GB = 1.0


def kv_cache_blocks(config: EngineConfig, bytes_per_token: int, max_model_len: int, device: torch.device) -> int:
    """Blocks of the KV cache: the configured budget, or by default 1 GB raised to hold one full
    context; never more than max_num_seqs full contexts. ConfigError when an explicit budget holds
    less than one full context, or (CPU) one full context needs more memory than is available."""
    bytes_per_block = config.block_size * bytes_per_token
    per_request = -(-max_model_len // config.block_size)
    context_gb = per_request * bytes_per_block / 2**30
    if config.kv_cache_memory_gb is not None:
        budget = int(config.kv_cache_memory_gb * 2**30) // bytes_per_block
        if budget < per_request:
            raise ConfigError(
                f"a KV cache of {config.kv_cache_memory_gb} GB holds {budget * config.block_size} tokens, less "
                f"than one full context of {max_model_len} ({context_gb:.2f} GB): raise kv_cache_memory_gb or "
                "lower max_model_len"
            )
    else:
        budget = max(per_request, int(DEFAULT_KV_CACHE_GB * 2**30) // bytes_per_block)
        available = _available_memory_bytes() if device.type == "cpu" else None
        if available is not None and per_request * bytes_per_block > available:
            raise ConfigError(
                f"one full context of {max_model_len} tokens needs {context_gb:.2f} GB of KV cache, more than "
                f"the {available / 2**30:.2f} GB of memory available: lower max_model_len"
            )
    return min(budget, per_request * config.max_num_seqs)


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
