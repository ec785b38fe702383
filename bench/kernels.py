"""The C kernel vs dequantize + GEMM for one quantized matrix, by number of rows: where the crossover is.

    python -m bench.kernels                 # the embedded model's 1536x576 Q4_1 shape, 2 threads
    python -m bench.kernels --rows 1 4 16 64 --shape 49152 576 --qtype q8_0
    python -m bench.kernels --gguf FILE --tensor blk.0.ffn_gate.weight    # a real file's matrix (Q4_K, ...)

The int8 kernel on the checkpoint's layout and on the interleaved one a fast-mode model gets at load.

Best of 5 repetitions each; prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from fulmine import kernels
from fulmine.layers.quantized import QuantizedWeight, quantize


def best_seconds(fn, repeat: int = 5, number: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - started) / number)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", nargs=2, type=int, default=[1536, 576], metavar=("N", "K"))
    parser.add_argument("--qtype", choices=["q4_1", "q8_0"], default="q4_1")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 24, 32, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gguf", help="take the matrix from this GGUF file (with --tensor) instead")
    parser.add_argument("--tensor", default="blk.0.ffn_gate.weight")
    args = parser.parse_args()
    module = kernels.cpu()
    if module is None:
        raise SystemExit("the C kernels are not built")
    torch.set_num_threads(args.threads)
    kernels.set_threads(args.threads)
    if args.gguf:
        from fulmine.models.gguf_file import GGUFFile

        tensor = GGUFFile(args.gguf).load(args.tensor)
        n, k = tensor.shape
        weight = QuantizedWeight(torch.from_numpy(tensor.raw.copy()), int(tensor.qtype), (n, k))
        args.qtype = f"{tensor.qtype.name} ({args.tensor})"
    else:
        n, k = args.shape
        weight = quantize(torch.randn(n, k), kernels.Q4_1 if args.qtype == "q4_1" else kernels.Q8_0)
    mixed = weight.interleaved()  # the layout a fast-mode model gets at load (itself if none)
    rows_out = []
    print(
        f"{'rows':>5}{'kernel fast us':>16}{'interleaved us':>16}{'kernel exact us':>17}"
        f"{'deq+bf16 GEMM us':>18}{'deq+fp32 GEMM us':>18}"
    )
    always = 1 << 30  # max_kernel_rows: the kernel whatever the rows
    for rows in args.rows:
        x = torch.randn(rows, k)

        def kernel(exact: bool, x: torch.Tensor = x) -> None:
            weight.matmul(x, exact, always)

        def interleaved(x: torch.Tensor = x) -> None:
            mixed.matmul(x, False, always)

        def gemm(dtype: torch.dtype, x: torch.Tensor = x) -> None:
            F.linear(x.to(dtype), weight.dequantize(dtype))

        result = {
            "rows": rows,
            "kernel_fast_us": best_seconds(lambda: kernel(False)) * 1e6,
            "interleaved_us": best_seconds(interleaved) * 1e6,
            "kernel_exact_us": best_seconds(lambda: kernel(True)) * 1e6,
            "gemm_bf16_us": best_seconds(lambda: gemm(torch.bfloat16)) * 1e6,
            "gemm_fp32_us": best_seconds(lambda: gemm(torch.float32)) * 1e6,
        }
        rows_out.append(result)
        print(
            f"{rows:>5}{result['kernel_fast_us']:>16.0f}{result['interleaved_us']:>16.0f}{result['kernel_exact_us']:>17.0f}"
            f"{result['gemm_bf16_us']:>18.0f}{result['gemm_fp32_us']:>18.0f}"
        )
    print(json.dumps({"shape": [n, k], "qtype": args.qtype, "threads": args.threads, "results": rows_out}))


if __name__ == "__main__":
    main()
