"""Calibration at startup, on throwaway tokens and KV blocks borrowed for the call, before the first
request: the kernels' prefetch distance that decodes fastest on this machine (the hardware
prefetchers differ: on one CPU the kernels' own requests doubled decode, on another they cost), then
the step cost model (executors/cost_model.py) fitted on steps of chosen shapes. Both are cached per
machine, file and configuration (beside the tokenizers): a later start restores them and only warms
up; every step refits the cost model online either way."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fulmine import kernels
from fulmine.executors.cost_model import StepShape
from fulmine.executors.step import SequenceStep, StepBatch
from fulmine.request import SamplingParams
from fulmine.tokenizer import cache_dir

if TYPE_CHECKING:
    from fulmine.engine.llm_engine import LLMEngine

Seqs = Callable[[int, int, int], list[SequenceStep]]  # (rows, start, tokens) -> throwaway sequences

# Calibration at startup: steps of chosen shapes on throwaway tokens, the most telling first (one
# decode row, eight, a prompt chunk, rows deep in a context, a deep chunk, then more row counts),
# each run a few times once warm: the first four always, the rest until CALIBRATION_SECONDS are
# spent (the embedded model: all of them, ~0.3 s; Qwen2.5-Coder-1.5B: the first four, ~0.9 s);
# later steps refine the fit as they come.
CALIBRATION_SECONDS = 0.5
CALIBRATION_DEPTH = 1024
REPEATS = 4  # runs of each decode shape (the median of the later half is kept)


def calibrate(engine: LLMEngine) -> bool:
    """Fit the engine's cost model on a few steps of throwaway tokens, on KV blocks borrowed for the
    call, or restore the fit cached for this machine, file and configuration. True if restored."""
    cached = _cached_path(engine)
    try:
        state = json.loads(cached.read_text())
        engine.cost.restore(state)
        prefetch = int(state.get("prefetch", kernels.DEFAULT_PREFETCH))
        if prefetch not in kernels.PREFETCH_CHOICES:
            raise ValueError(f"prefetch distance {prefetch}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    else:
        kernels.set_prefetch(prefetch)
        engine.prefetch = prefetch
        _with_borrowed_blocks(engine, lambda seqs, shallow, deep: _warm_up(engine, StepBatch(seqs(1, shallow, 1))))
        return True

    def measure(seqs: Seqs, shallow: int, deep: int) -> None:
        if engine.runner.device.type == "cpu" and kernels.cpu() is not None:
            engine.prefetch = _tune_prefetch(engine, StepBatch(seqs(1, shallow, 1)))
        _fit(engine, seqs, shallow, deep)

    _with_borrowed_blocks(engine, measure)
    if engine.cost.fitted:
        _save(cached, {**engine.cost.state(), "prefetch": engine.prefetch})
    return False


def _cached_path(engine: LLMEngine) -> Path:
    """Where this machine's fit of this file, in this configuration, is cached."""
    config, source = engine.config, engine.source
    stat = source.path.stat() if source.path.is_file() else None
    identity = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": engine.num_threads,
        "device": str(engine.runner.device),
        "file": str(source.path.resolve()),
        "size": stat.st_size if stat else None,
        "mtime": stat.st_mtime_ns if stat else None,
        "config": [getattr(config, name) for name in _STEP_FIELDS],
        "executors": [e.name for e in engine.runner.executors],
        "version": 2,  # 2: the prefetch distance
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / "calibration" / f"{key}.json"


# the configuration that changes what a step costs
_STEP_FIELDS = (
    "dtype", "weight_dtype", "quantization", "exact_kernels", "executor", "kv_cache_dtype", "block_size",
    "tensor_parallel_size", "num_threads",
)  # fmt: skip


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _save(path: Path, state: dict[str, object]) -> None:
    """Written whole or not at all (a read-only or raced cache is not an error)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(state, file)
        os.replace(staging, path)
    except OSError:
        pass


def _with_borrowed_blocks(engine: LLMEngine, work: Callable[[Seqs, int, int], None]) -> None:
    """Run `work` with a builder of throwaway sequences on KV blocks borrowed for the call, and a
    shallow and a deep position within them."""
    kv, request_id = engine.kv_cache, "calibration"
    room = min(engine.max_model_len, kv.pool.num_blocks * kv.block_size // 2)
    if room < 4 or not kv.can_allocate(request_id, room):
        return
    table = kv.allocate(request_id, room)
    # positions within the borrowed table: a deep chunk of 32 ends before `room`
    shallow, deep = min(64, room // 2), max(min(CALIBRATION_DEPTH, room - 33), room // 2)
    token = engine.model_config.vocab_size // 2
    greedy = SamplingParams(temperature=0.0)

    def seqs(rows: int, start: int, tokens: int) -> list[SequenceStep]:
        ids = [token] * min(tokens, room - 1, room - start)
        return [SequenceStep(f"{request_id}-{r}", ids, start, table, 0, True, greedy, ids, []) for r in range(rows)]

    try:
        work(seqs, shallow, deep)
    finally:
        kv.free(request_id)
        for r in range(8):
            engine.runner.release(f"{request_id}-{r}")


def _tune_prefetch(engine: LLMEngine, decode: StepBatch) -> int:
    """The prefetch distance whose one-row decode steps are fastest here (each distance's median of
    REPEATS steps, taking turns so the machine's noise falls on all; ~0.5 s on a 1.5B model)."""
    _warm_up(engine, decode)
    times: dict[int, list[float]] = {d: [] for d in kernels.PREFETCH_CHOICES}
    for _ in range(REPEATS):
        for ahead in kernels.PREFETCH_CHOICES:
            kernels.set_prefetch(ahead)
            started = time.perf_counter()
            engine.runner.execute(decode)
            times[ahead].append(time.perf_counter() - started)
    best = min(kernels.PREFETCH_CHOICES, key=lambda d: statistics.median(times[d]))
    kernels.set_prefetch(best)
    return best


def _fit(engine: LLMEngine, seqs: Seqs, shallow: int, deep: int) -> None:
    """The steps of chosen shapes, most telling first, until CALIBRATION_SECONDS are spent."""
    shapes = [seqs(1, shallow, 1), seqs(8, shallow, 1), seqs(1, 0, 64), seqs(4, deep, 1)]
    shapes += [seqs(1, max(deep - 32, 0), 32), seqs(2, shallow, 1), seqs(4, shallow, 1), seqs(1, 0, 16)]
    started = time.perf_counter()
    _warm_up(engine, StepBatch(shapes[0]))
    for index, steps in enumerate(shapes):
        batch, times = StepBatch(steps), []
        # a shape repeated until warm: the first decode steps after a long one run up to twice as
        # long (caches refilled, threads woken), which a stream of decode steps does not see
        for _ in range(REPEATS if steps[0].num_tokens == 1 else 2):
            step_started = time.perf_counter()
            engine.runner.execute(batch)
            times.append(time.perf_counter() - step_started)
        engine.cost.observe(StepShape.of(batch), statistics.median(times[len(times) // 2 :]))
        # the first four shapes always (the fit needs four steps; a 1.5B model's eight rows alone
        # take 0.4 s), the rest while the budget lasts
        if index >= 3 and time.perf_counter() - started > CALIBRATION_SECONDS:
            break


def _warm_up(engine: LLMEngine, batch: StepBatch) -> None:
    """Decode steps right after loading run up to twice as long as later ones (weights not yet in the
    caches, threads not yet spinning): run one until two in a row agree within 5 % (8 at most)."""
    last = math.inf
    for _ in range(8):
        started = time.perf_counter()
        engine.runner.execute(batch)
        seconds = time.perf_counter() - started
        if abs(seconds - last) < 0.05 * last:
            return
        last = seconds
