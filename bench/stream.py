"""Decode's weight traffic alone: every matrix of a GGUF model's layers (and its LM head) through the
one-row kernels, at each prefetch distance and in both layouts, as GB/s (what bounds decode on a CPU).

    python -m bench.stream --model ~/.cache/fulmine/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    python -m bench.stream --model FILE --threads 1

Medians of --reps passes (distances taking turns); prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fulmine import kernels
from fulmine.layers.quantized import QuantizedWeight
from fulmine.models.gguf_file import GGUFFile
from fulmine.models.source import default_model_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    if kernels.cpu() is None:
        raise SystemExit("the C kernels are not built")
    kernels.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    gguf = GGUFFile(args.model or default_model_path())
    groups: dict[str, list[QuantizedWeight]] = {}
    for name, info in gguf.tensors.items():
        is_head = name == "output.weight"
        if not (name.startswith("blk.") or is_head) or len(info.shape) != 2:
            continue
        tensor = gguf.load(name)
        if int(tensor.qtype) not in kernels.BLOCK_TYPES:
            continue
        weight = QuantizedWeight(torch.from_numpy(tensor.raw), int(tensor.qtype), tuple(info.shape))
        kind = f"{'LM head' if is_head else 'layers'} {tensor.qtype.name}"
        stored = QuantizedWeight(weight.raw.clone(), weight.qtype, weight.shape)
        groups.setdefault(f"{kind} as stored", []).append(stored)
        groups.setdefault(f"{kind} interleaved", []).append(weight.interleaved(in_place=True))
    rows = []
    print(f"{'matrices':<34}{'MB':>8}" + "".join(f"{'ahead ' + str(a):>14}" for a in kernels.PREFETCH_CHOICES))
    for label, weights in groups.items():
        total = sum(w.nbytes for w in weights)
        inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
        times: dict[int, list[float]] = {a: [] for a in kernels.PREFETCH_CHOICES}
        for _ in range(args.reps + 1):
            for ahead in kernels.PREFETCH_CHOICES:
                kernels.set_prefetch(ahead)
                started = time.perf_counter()
                for weight in weights:
                    weight.matmul(inputs[weight.shape[1]])
                times[ahead].append(time.perf_counter() - started)
        gb_s = {a: total / statistics.median(t[1:]) / 1e9 for a, t in times.items()}  # the first: warm-up
        rows.append({"matrices": label, "mb": total / 1e6, "gb_s_by_prefetch": gb_s})
        print(f"{label:<34}{total / 1e6:>8.0f}" + "".join(f"{gb_s[a]:>14.1f}" for a in kernels.PREFETCH_CHOICES))
    kernels.set_prefetch(kernels.DEFAULT_PREFETCH)
    print(json.dumps({"model": str(gguf.path), "threads": args.threads, "results": rows}))


if __name__ == "__main__":
    main()
