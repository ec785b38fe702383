"""What one engine step costs, in process: by the number of decode rows, and for a short prompt chunk
beside a stream at long context (what bounds the gap between a stream's tokens while prompts
prefill).

    python -m bench.steps                      # the embedded model
    python -m bench.steps --model FILE.gguf --rows 1 2 4 8 --context 2048

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from fulmine import SamplingParams
from fulmine.config import EngineConfig
from fulmine.engine.llm_engine import LLMEngine

FILLER = "The history of computing is a story of ever smaller, faster and cheaper machines. "


def decode_step_ms(engine: LLMEngine, rows: int, tokens: int = 70) -> float:
    """Median step time while `rows` greedy streams decode together (short context)."""
    for k in range(rows):
        prompt = [{"role": "user", "content": f"({k}) Write a story about a fox."}]
        engine.add_request(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        running = engine.scheduler.running
        decoding = len(running) == rows and all(r.output_token_ids for r in running)
        started = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def chunk_step_ms(engine: LLMEngine, context: int, chunk: int) -> tuple[float, float]:
    """(median step ms of a `chunk`-token prompt chunk over the last ~quarter of a `context`-token
    prompt, median decode step ms after it): one sequence, prefilled `chunk` tokens a step."""
    ids = engine.tokenizer.encode(FILLER * (context // 12 + 2))[:context]
    engine.scheduler.max_num_batched_tokens = chunk
    engine.add_request(ids, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    prefill, decode = [], []
    while engine.has_unfinished():
        [request] = engine.scheduler.running or list(engine.scheduler.waiting)
        late = request.num_computed_tokens >= context * 3 // 4
        was_decoding = bool(request.output_token_ids)
        started = time.perf_counter()
        engine.step()
        elapsed = (time.perf_counter() - started) * 1e3
        if was_decoding:
            decode.append(elapsed)
        elif late:
            prefill.append(elapsed)
    return statistics.median(prefill), statistics.median(decode)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=16)
    args = parser.parse_args()
    config = EngineConfig(speculative="off", num_threads=args.threads)
    engine = LLMEngine(args.model, config, progress=False)
    rows = {n: decode_step_ms(engine, n) for n in args.rows}
    chunk_ms, deep_decode_ms = chunk_step_ms(engine, args.context, args.chunk)
    one = rows[min(rows)]
    print(f"model {engine.source.name}, {args.threads} threads")
    for n, ms in rows.items():
        print(f"{n:3d} decode rows: {ms:6.1f} ms a step ({ms / one:.2f}x one row, {n / ms * 1e3:.0f} tok/s in all)")
    print(f"a {args.chunk}-token chunk near {args.context} tokens of context: {chunk_ms:.1f} ms a step")
    print(f"a decode step after {args.context} tokens: {deep_decode_ms:.1f} ms")
    result = {
        "model": engine.source.name,
        "threads": args.threads,
        "decode_step_ms": rows,
        "chunk_tokens": args.chunk,
        "context": args.context,
        "chunk_step_ms": chunk_ms,
        "deep_decode_step_ms": deep_decode_ms,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
