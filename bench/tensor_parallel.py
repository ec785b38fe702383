"""A decode step alone vs split across ranks (tensor parallel on gloo): the same request, greedy.

python -m bench.tensor_parallel [--model FILE] [--size 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from fulmine import SamplingParams
from fulmine.config import EngineConfig
from fulmine.engine.llm_engine import LLMEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--size", type=int, default=3, help="ranks (must divide the heads, KV heads, MLP width)")
    args = parser.parse_args()
    for tp in (1, args.size, 1, args.size):
        config = EngineConfig(speculative="off", tensor_parallel_size=tp, executor="torch", weight_dtype="float32")
        engine = LLMEngine(args.model, config, progress=False)
        engine.add_request("The capital of France is", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
        times = []
        while engine.has_unfinished():
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        print(f"tensor parallel {tp}: decode step median {statistics.median(times[1:]) * 1e3:.1f} ms")
        if engine.ranks is not None:
            engine.ranks.close()


if __name__ == "__main__":
    main()
