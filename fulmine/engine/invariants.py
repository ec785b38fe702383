"""The engine's bookkeeping, checked whole: what every request holds agrees with the KV pool.

Run after every step when FULMINE_CHECK_INVARIANTS=1 (the test suite turns it on; it costs a
pass over every request's tokens and the pool, too much for serving). A broken invariant raises
InvariantError naming it: the step that broke it is the one that just ran.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fulmine.kv_cache.keys import block_keys
from fulmine.request import RequestStatus

if TYPE_CHECKING:
    from fulmine.engine.llm_engine import LLMEngine


class InvariantError(AssertionError):
    """The engine's state contradicts itself."""


def enabled() -> bool:
    return os.environ.get("FULMINE_CHECK_INVARIANTS", "") not in ("", "0")


def check_invariants(engine: LLMEngine) -> None:
    scheduler, kv = engine.scheduler, engine.kv_cache
    block_size = kv.block_size

    def fail(message: str) -> None:
        raise InvariantError(message)

    running, waiting = set(map(id, scheduler.running)), set(map(id, scheduler.waiting))
    if len(running) != len(scheduler.running) or running & waiting:
        fail("a request is running twice, or running and waiting at once")
    if len(scheduler.requests) != len(scheduler.running) + len(scheduler.waiting):
        fail("the scheduler's requests are not exactly the running and the waiting ones")
    for request_id, request in scheduler.requests.items():
        table = kv.block_tables.get(request_id)
        computed, total = request.num_computed_tokens, request.num_tokens
        if request.status is RequestStatus.FINISHED:
            fail(f"{request_id}: finished but still scheduled")
        if not 0 <= computed <= total - 1:
            fail(f"{request_id}: {computed} positions computed of {total} tokens (at most {total - 1})")
        if request.status is RequestStatus.WAITING:
            if table or computed:
                fail(f"{request_id}: waiting but holds {len(table or ())} blocks, {computed} positions")
            continue
        if table is None or len(table) * block_size < computed:
            fail(f"{request_id}: {computed} positions computed, its table covers {len(table or ()) * block_size}")
        assert table is not None
        if request.draft_token_ids and computed != total - 1:
            fail(f"{request_id}: drafts while its next step does not sample")
        if len(request.output_logprobs) not in (0, len(request.output_token_ids)):
            fail(f"{request_id}: {len(request.output_logprobs)} logprobs for {len(request.output_token_ids)} tokens")
        keys = kv._keys.get(request_id, [])
        if len(keys) > computed // block_size:
            fail(f"{request_id}: {len(keys)} blocks registered, {computed // block_size} full and computed")
        if keys and keys != block_keys(request.all_token_ids, block_size, len(keys)):
            fail(f"{request_id}: a registered key does not hash its block's tokens")
        for index, key in enumerate(keys):
            if kv.pool._key_of.get(table[index], key) != key:
                fail(f"{request_id}: its block {index} is registered under another prefix's key")
        if engine.outputs.detokenizers.get(request_id) is None:
            fail(f"{request_id}: running without a detokenizer")
    _check_pool(engine)
    if not engine.has_unfinished():
        _check_idle(engine)


def _check_pool(engine: LLMEngine) -> None:
    kv, pool = engine.kv_cache, engine.kv_cache.pool
    references = [0] * pool.num_blocks
    for table in kv.block_tables.values():
        for block in table:
            references[block] += 1
    if references != pool.ref_counts:
        wrong = [b for b in range(pool.num_blocks) if references[b] != pool.ref_counts[b]]
        raise InvariantError(f"blocks {wrong[:8]}: reference counts disagree with the block tables")
    free, evictable = set(pool._free), set(pool._evictable)
    unreferenced = {b for b in range(pool.num_blocks) if not references[b]}
    if len(free) != len(pool._free) or free & evictable or free | evictable != unreferenced:
        raise InvariantError("free + cached + used blocks do not add up to the pool")
    if any(b not in pool._key_of for b in evictable):
        raise InvariantError("an evictable block has no key")
    if {pool._block_of[k] for k in pool._block_of} != set(pool._key_of) or any(
        pool._block_of[k] != b for b, k in pool._key_of.items()
    ):
        raise InvariantError("the prefix cache's two maps disagree")


def _check_idle(engine: LLMEngine) -> None:
    """Nothing is held for a request once none is left."""
    held: dict[str, dict[str, Any]] = {
        "block tables": engine.kv_cache.block_tables,
        "registered keys": engine.kv_cache._keys,
        "detokenizers": engine.outputs.detokenizers,
        "grammar matchers": engine.outputs.matchers,
        "generators": engine.runner.generators,
        "governor entries": engine.governor.requests if engine.governor is not None else {},
    }
    for name, value in held.items():
        if value:
            raise InvariantError(f"idle, but {name} are still held: {list(value)[:4]}")
    if engine.kv_cache.pool.usage != 0.0:
        raise InvariantError("idle, but blocks are still referenced")
