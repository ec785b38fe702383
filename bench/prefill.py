"""Time to the first token of one prompt by length, through the fused C decoder or the PyTorch path.

    python -m bench.prefill --path fused --lengths 512 1024 2048 4096 [--model FILE] [--budget 256]

Each length: three prompts (no prefix cache), the median. `--path torch` sends every step of more
than FUSED_MAX_TOKENS_EXACT tokens to the PyTorch executor (what the fast mode did past the 512th
position before the fused attention was shared by the heads of a KV head); run both in the same
session and compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", choices=["fused", "torch"], default="fused")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--model", default=None)
    parser.add_argument("--budget", type=int, default=256, help="tokens a step (max_num_batched_tokens)")
    args = parser.parse_args()

    from fulmine import SamplingParams
    from fulmine.config import EngineConfig
    from fulmine.engine.llm_engine import LLMEngine
    from fulmine.executors import cpu_fused

    config = EngineConfig(speculative="off", enable_prefix_caching=False, max_num_batched_tokens=args.budget)
    engine = LLMEngine(args.model, config, progress=False)
    if args.path == "torch":  # the fused executor takes only short steps, as in the exact mode
        for executor in engine.runner.executors:
            if isinstance(executor, cpu_fused.CpuFusedExecutor):
                executor.decoder.max_tokens = cpu_fused.FUSED_MAX_TOKENS_EXACT
    text = "The history of computing is a story of ever smaller, faster and cheaper machines. " * 1000
    ids = engine.tokenizer.encode(text)
    out = {}
    for length in args.lengths:
        times = []
        for rep in range(3):
            engine.add_request(ids[rep * 3 : rep * 3 + length], SamplingParams(max_tokens=1, temperature=0.0))
            started = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            times.append(time.perf_counter() - started)
        out[length] = round(statistics.median(times) * 1e3, 1)
    print(json.dumps({"path": args.path, "budget": args.budget, "ttft_ms": out}))


if __name__ == "__main__":
    main()
