"""Drafts from a smaller model that shares the target's tokenizer: k greedy tokens per step.

The draft model has its own weights, paged KV cache and runner (the same classes as the target's).
Per request it remembers which tokens its cache holds; each proposal first catches up from the
longest common prefix with the request's tokens (after a rejection the tail it drafted is simply
recomputed), then decodes k tokens greedily.
"""

from __future__ import annotations

import torch

from fulmine.config import ConfigError, EngineConfig
from fulmine.executors.model_runner import ModelRunner
from fulmine.executors.step import SequenceStep, StepBatch
from fulmine.kv_cache import KVCacheManager
from fulmine.kv_cache.sizing import kv_cache_blocks, kv_cache_bytes_per_token, kv_cache_dtype
from fulmine.models.loader import load_model
from fulmine.models.source import resolve
from fulmine.request import Request, SamplingParams


class DraftModelProposer:
    def __init__(
        self,
        path: str,
        config: EngineConfig,
        vocab_size: int,
        max_model_len: int,
        device: torch.device,
        dtype: torch.dtype,
        weight_dtype: torch.dtype,
    ) -> None:
        source = resolve(path)
        if source.config.vocab_size != vocab_size:
            raise ConfigError(
                f"draft model {path} has a vocabulary of {source.config.vocab_size}, the target {vocab_size}: "
                "a draft model must share the target's tokenizer"
            )
        self.max_model_len = min(max_model_len, source.config.max_position_embeddings)
        model = load_model(source, device, dtype, weight_dtype, False, config.quantization, config.exact_kernels)
        # the target's cache type: a draft that attends over other values than the target's disagrees more
        kv_dtype = kv_cache_dtype(config, device, dtype, weight_dtype)
        bytes_per_token = kv_cache_bytes_per_token(source.config, kv_dtype)
        num_blocks = kv_cache_blocks(config, bytes_per_token, self.max_model_len, device)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(
            model,
            num_blocks,
            config.block_size,
            self.max_model_len,
            device,
            dtype,
            0,
            config.exact_kernels,
            config.executor,
            config.max_num_seqs,
            kv_dtype,
        )
        self.requests: dict[str, Request] = {}  # the draft's view: its tokens and how many its cache holds
        self.greedy = SamplingParams(temperature=0.0)

    def propose(self, request_id: str, tokens: list[int], k: int) -> list[int]:
        if k <= 0 or len(tokens) >= self.max_model_len:
            return []
        view = self.requests.get(request_id)
        if view is None:
            view = self.requests[request_id] = Request(request_id, [], self.greedy, (), self.max_model_len)
        held = view.all_token_ids[: view.num_computed_tokens]
        common = 0
        for a, b in zip(held, tokens):
            if a != b:
                break
            common += 1
        view.prompt_token_ids, view.output_token_ids = list(tokens), []
        view.num_computed_tokens = min(common, len(tokens) - 1)
        drafts: list[int] = []
        while len(drafts) < k and view.num_tokens < self.max_model_len:
            num_new = view.num_tokens - view.num_computed_tokens
            if not self.kv_cache.can_allocate(request_id, view.num_tokens):
                break  # the draft's cache is full: propose what there is
            self.kv_cache.allocate(request_id, view.num_tokens)
            step = SequenceStep(
                request_id,
                view.all_token_ids[view.num_computed_tokens :],
                view.num_computed_tokens,
                self.kv_cache.block_tables[request_id],
                0,
                True,
                self.greedy,
            )
            result = self.runner.execute(StepBatch([step]))
            view.num_computed_tokens += num_new
            token = result.sampled[request_id][0]
            view.output_token_ids.append(token)
            drafts.append(token)
        return drafts

    def release(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.kv_cache.free(request_id)
