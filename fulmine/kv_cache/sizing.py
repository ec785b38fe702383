"""How large the context and the KV cache are: bytes a token, the configured or default budget, the machine."""

from __future__ import annotations

import logging

import torch

from fulmine.config import ConfigError, EngineConfig, ModelConfig

logger = logging.getLogger("fulmine.kv_cache")
# By default one full context's KV cache may take at most this share of the memory available.
MAX_CONTEXT_SHARE = 0.5


def kv_cache_dtype(
    config: EngineConfig, device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype
) -> torch.dtype:
    """The cache's element type: --kv-cache-dtype, else float16 on the CPU (the activations' dtype when
    full precision was asked for: float32 weights, or exact kernels, which promise a dequantized
    reference to rounding), else the activations' dtype."""
    chosen = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(config.kv_cache_dtype)
    if chosen is not None:
        return chosen
    full_precision = config.exact_kernels or weight_dtype == torch.float32
    return torch.float16 if device.type == "cpu" and not full_precision else dtype


def kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element


DEFAULT_KV_CACHE_GB = 1.0


def fit_max_model_len(config: EngineConfig, model: ModelConfig, bytes_per_token: int, device: torch.device) -> int:
    """The context window: the configured one, else the model's own, cut (with one log line saying so)
    to what fits when one full context's KV cache would take more than half the memory available."""
    if config.max_model_len is not None:
        return config.max_model_len
    native = model.max_position_embeddings
    available = _available_memory_bytes(device, model)
    if available is None or native * bytes_per_token <= available * MAX_CONTEXT_SHARE:
        return native
    fits = int(available * MAX_CONTEXT_SHARE) // bytes_per_token // config.block_size * config.block_size
    chosen = max(fits, config.block_size)
    logger.warning(
        "the model's context of %d tokens needs %.1f GB of KV cache, more than half of the %.1f GB available: "
        "max_model_len is %d (--max-model-len to choose another)",
        native,
        native * bytes_per_token / 2**30,
        available / 2**30,
        chosen,
    )
    return chosen


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
        available = _available_memory_bytes(device) if device.type == "cpu" else None
        if available is not None and per_request * bytes_per_block > available:
            raise ConfigError(
                f"one full context of {max_model_len} tokens needs {context_gb:.2f} GB of KV cache, more than "
                f"the {available / 2**30:.2f} GB of memory available: lower max_model_len"
            )
    return min(budget, per_request * config.max_num_seqs)


def _available_memory_bytes(device: torch.device, model: ModelConfig | None = None) -> int | None:
    """Memory a KV cache could use: the CPU's available memory, or the GPU's free memory less the
    weights still to load (estimated from the model's shape, two bytes a weight)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return max(free - 2 * _num_weights(model), 0) if model is not None else free
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _num_weights(model: ModelConfig) -> int:
    attention = model.hidden_size * model.head_dim * (2 * model.num_heads + 2 * model.num_kv_heads)
    mlp = 3 * model.hidden_size * model.intermediate_size
    tables = model.vocab_size * model.hidden_size * (1 if model.tie_word_embeddings else 2)
    return model.num_layers * (attention + mlp) + tables
