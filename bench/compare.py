"""fulmine vs llama.cpp (and transformers fp32) on the same GGUF, in one run: medians and ratios.

    python -m bench.compare                     # the embedded SmolLM2-135M-Instruct Q4_1
    python -m bench.compare --reps 5 --engines fulmine llama.cpp
    python -m bench.compare --engines fulmine fulmine:speculative=off llama.cpp   # variants by config
    python -m bench.compare --engines fulmine llama-bench   # native llama.cpp (bash bench/build_llama_cpp.sh)
    python -m bench.compare --engines fulmine llama-bench --depth 4096   # also decode after 4k tokens

Each (engine, repetition) is its own process; repetitions alternate engines so machine noise
falls on all of them. Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

METRICS = [
    ("decode_tok_s", "decode tok/s greedy", True),
    ("decode_tok_s_t1.0", "  temperature 1.0", True),
    ("decode_tok_s_t0.7-p0.9", "  temperature 0.7, top_p 0.9", True),
    ("decode_tok_s_chain", "  llama.cpp chain k40 p.95 m.05 t.8", True),
    ("decode_tok_s_code", "decode tok/s, a code edit (greedy)", True),
    ("decode_tok_s_deep", "decode tok/s after --depth tokens", True),
    ("ttft_long_s", "TTFT 512-token prompt (s)", False),
    ("prefill_tok_s", "prefill tok/s", True),
    ("ttft_chat_s", "TTFT short chat (s)", False),
    ("load_s", "load (s)", False),
    ("peak_rss_mb", "peak RSS (MB)", False),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    parser.add_argument("--engines", nargs="+", default=["fulmine", "llama.cpp", "transformers"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=0, help="also decode after a prompt this long (e.g. 4096)")
    parser.add_argument("--decode-tokens", type=int, default=256, help="tokens of each timed story decode")
    args = parser.parse_args()
    if args.model is None:
        from fulmine.models.source import default_model_path

        args.model = str(default_model_path())
    runs: dict[str, list[dict[str, Any]]] = {engine: [] for engine in args.engines}
    for rep in range(args.reps):
        for engine in args.engines:
            command = [
                sys.executable,
                "-m",
                "bench.engines",
                engine,
                "--model",
                args.model,
                "--threads",
                str(args.threads),
                "--salt",
                str(rep),
                "--depth",
                str(args.depth),
                "--decode-tokens",
                str(args.decode_tokens),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{engine} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"rep {rep} {engine}: {runs[engine][-1]}", file=sys.stderr)
    medians = {  # a metric an engine does not measure (transformers samples nothing) is left out
        engine: {key: statistics.median(r[key] for r in results) for key, _, _ in METRICS if key in results[0]}
        for engine, results in runs.items()
        if results
    }
    engines = list(medians)
    print(f"\nmedians of {args.reps} runs, {args.threads} threads, model {args.model}\n")
    ours = [e for e in engines if e.startswith("fulmine")]
    others = [e for e in engines if not e.startswith("fulmine")]
    pairs = [(a, b) for a in ours for b in others]
    width = max([14, *(len(e) + 2 for e in engines)])
    print(
        f"{'metric':36}"
        + "".join(f"{e:>{width}}" for e in engines)
        + "".join(f"{a + '/' + b:>{len(a) + len(b) + 6}}" for a, b in pairs)
    )
    ratios: dict[str, dict[str, float]] = {}
    for key, label, higher_is_better in METRICS:
        row = f"{label:36}" + "".join(
            f"{medians[e][key]:{width}.3f}" if key in medians[e] else f"{'-':>{width}}" for e in engines
        )
        for a, b in pairs:
            if key not in medians[a] or key not in medians[b]:
                row += f"{'-':>{len(a) + len(b) + 6}}"
                continue
            ratio = medians[a][key] / medians[b][key]
            ratios.setdefault(b if a == "fulmine" else f"{a}/{b}", {})[key] = ratio
            better = ratio >= 1 if higher_is_better else ratio <= 1
            row += f"{ratio:{len(a) + len(b) + 4}.2f}{'✓' if better else '✗':>2}"
        print(row)
    sampled_over_greedy = {
        engine: {key: m[key] / m["decode_tok_s"] for key, _, _ in METRICS[1:4] if key in m}
        for engine, m in medians.items()
    }
    for engine, shares in sampled_over_greedy.items():
        if shares:
            print(f"{engine}: sampled / greedy decode " + ", ".join(f"{k[13:]} {v:.2f}" for k, v in shares.items()))
    print(
        json.dumps(
            {
                "model": args.model,
                "reps": args.reps,
                "threads": args.threads,
                "medians": medians,
                "fulmine_over": ratios,
                "sampled_over_greedy": sampled_over_greedy,
            }
        )
    )


if __name__ == "__main__":
    main()
