"""Time to ready: `LLM(path)` until it serves, warm (tokenizer and calibration cached) and on first
use (an empty cache), each its own process, with the engine's phases and the peak RSS.

    python -m bench.ready                                  # the embedded model
    python -m bench.ready --model FILE.gguf --runs 2

torch is imported before the clock starts (its ~1 s is every PyTorch program's); prints one line
per run, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, logging, resource, sys, time
import torch  # noqa: F401  (not load time)
records = []
class Keep(logging.Handler):
    def emit(self, record): records.append(record.getMessage())
logging.getLogger("fulmine.engine").addHandler(Keep()); logging.getLogger("fulmine.engine").setLevel(logging.INFO)
from fulmine import LLM
started = time.perf_counter()
llm = LLM(sys.argv[1] or None, progress=False)
ready = time.perf_counter() - started
phases = next((r for r in records if "ready in" in r), "")
print(json.dumps({"ready_s": ready, "phases": phases, "prefetch": llm.engine.prefetch,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="", help="a GGUF file or HF directory (default: the embedded model)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each kind")
    args = parser.parse_args()
    results: dict[str, list[dict[str, object]]] = {"first_use": [], "warm": []}
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            env = {"XDG_CACHE_HOME": cache}
            for kind in ("first_use", "warm"):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, args.model], capture_output=True, text=True, check=True,
                    env={**os.environ, **env},
                )  # fmt: skip
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results[kind].append(result)
                ready, rss = result["ready_s"], result["peak_rss_mb"]
                print(f"{kind:<10} {ready:.2f} s, peak RSS {rss:.0f} MB: {result['phases']}")
    print(json.dumps({"model": args.model or "embedded", "results": results}))


if __name__ == "__main__":
    main()
