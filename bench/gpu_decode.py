"""Decode speed of the executors against the memory roofline, on a random-weight model of a real shape.

    python -m bench.gpu_decode                       # Llama-3-8B's shape, bfloat16, on CUDA
    python -m bench.gpu_decode --shape tiny --device cpu --batch 1 2   # the script itself, anywhere

Drives the model runner directly with `StepBatch`es (no tokenizer, no scheduler): per executor and
batch size, a prompt is prefilled for every sequence, then decode steps are timed one by one (the
step's device-to-host copy of the sampled tokens included). The roofline is the device's measured
memory bandwidth (the better of a reduction over a 4 GiB tensor and a copy counting bytes read and
written): a decode step must read every matrix once and each sequence's keys and values, so bytes /
bandwidth bounds its time.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from fulmine.config import ModelConfig
from fulmine.executors.model_runner import ModelRunner
from fulmine.executors.step import SequenceStep, StepBatch
from fulmine.layers.linear import Embedding, Linear
from fulmine.models.loader import random_model
from fulmine.request import SamplingParams

SHAPES = {
    "llama3-8b": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "tiny": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=512,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
}
GREEDY = SamplingParams(temperature=0.0)
BLOCK = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth(device: torch.device, gib: float) -> dict[str, float]:
    """GB/s of a read-only reduction and of a copy (bytes read + written), medians of 10."""
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    out: dict[str, float] = {}
    for name, op, factor in (("read", lambda: x.sum(dtype=torch.float32), 1), ("copy", lambda: y.copy_(x), 2)):
        times = []
        for i in range(13):
            _sync(device)
            started = time.perf_counter()
            op()
            _sync(device)
            if i >= 3:
                times.append(time.perf_counter() - started)
        out[f"{name}_gb_s"] = factor * x.nbytes / statistics.median(times) / 1e9
    return out


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(m.weight.nbytes for m in model.modules() if isinstance(m, Linear) and not isinstance(m, Embedding))


def run(runner: ModelRunner, config: ModelConfig, batch: int, prompt_len: int, steps: int) -> dict[str, Any]:
    blocks_per_seq = -(-(prompt_len + steps + 1) // BLOCK)
    generator = torch.Generator().manual_seed(batch)
    seqs = []
    for i in range(batch):
        prompt = torch.randint(0, config.vocab_size, (prompt_len,), generator=generator).tolist()
        table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        first = runner.execute(StepBatch([SequenceStep(f"s{i}", prompt, 0, table, 0, True, GREEDY, prompt, [])]))
        seqs.append(SequenceStep(f"s{i}", first.sampled[f"s{i}"], prompt_len, table, 0, True, GREEDY, prompt, []))
    times, tokens = [], []
    for _ in range(steps):
        _sync(runner.device)
        started = time.perf_counter()
        out = runner.execute(StepBatch(seqs))  # ends with the sampled tokens' copy to the host
        times.append(time.perf_counter() - started)
        tokens.append(out.sampled["s0"][0])
        seqs = [
            SequenceStep(s.request_id, out.sampled[s.request_id], s.start + 1, s.block_table, 0, True, GREEDY)
            for s in seqs
        ]
    step = statistics.median(times[3:])  # the first steps capture graphs
    result = {"batch": batch, "step_ms": step * 1e3, "tok_s": batch / step, "executor": runner.last_executor}
    graphs = getattr(runner.executors[0], "graphs", None)
    if graphs:  # the GPU's share of a step: this batch's graph replayed alone
        graph, _ = graphs[min(k for k in graphs if k[0] >= batch)]
        replays = []
        for _ in range(20):
            _sync(runner.device)
            started = time.perf_counter()
            graph.replay()
            _sync(runner.device)
            replays.append(time.perf_counter() - started)
        result["replay_ms"] = statistics.median(replays) * 1e3
    return result | {"tokens": tokens}


def profile(runner: ModelRunner, prompt_len: int) -> str:
    """GPU kernel time of three eager batch-1 decode steps, by kernel: what a graph's replay is made of."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    table = list(range(-(-(prompt_len + 8) // BLOCK)))
    prompt = list(range(prompt_len))
    runner.execute(StepBatch([SequenceStep("p", prompt, 0, table, 0, True, GREEDY, prompt, [])]))
    cuda = runner.device.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for i in range(3):
            runner.execute(StepBatch([SequenceStep("p", [1], prompt_len + i, table, 0, True, GREEDY, prompt, [])]))
    return str(
        prof.key_averages().table(
            sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=18, max_name_column_width=60
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--executors", nargs="+", default=["torch", "cuda-graph"])
    parser.add_argument("--bandwidth-gib", type=float, default=4.0)
    parser.add_argument("--profile", action="store_true", help="also print a kernel profile of eager decode steps")
    args = parser.parse_args()
    device, dtype, config = torch.device(args.device), torch.bfloat16, SHAPES[args.shape]
    roof = bandwidth(device, args.bandwidth_gib)
    peak = max(roof.values())
    model = random_model(config, device, dtype)
    matrices = weight_bytes(model)
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize
    num_blocks = max(args.batch) * -(-(args.prompt + args.steps + 1) // BLOCK)
    max_len = -(-(args.prompt + args.steps + 1) // BLOCK) * BLOCK
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": args.shape,
        "weight_gb": matrices / 1e9,
        **roof,
        "results": [],
    }
    print(
        f"{info['device']}: read {roof['read_gb_s']:.0f} GB/s, copy {roof['copy_gb_s']:.0f} GB/s; "
        f"matrices {matrices / 1e9:.2f} GB"
    )
    print(
        f"{'executor':>12} {'batch':>5} {'step ms':>8} {'replay ms':>9} {'tok/s':>8} {'GB/s':>7} {'of roof':>7} "
        f"{'roof tok/s':>10}"
    )
    for name in args.executors:
        runner = ModelRunner(
            model, num_blocks, BLOCK, max_len, device, dtype, 0, executor=name, max_num_seqs=max(args.batch)
        )
        for batch in args.batch:
            result = run(runner, config, batch, args.prompt, args.steps)
            context = args.prompt + args.steps // 2
            step_bytes = matrices + batch * context * kv_per_token
            achieved = step_bytes / (result["step_ms"] / 1e3) / 1e9
            roof_step = step_bytes / (peak * 1e9)
            result |= {
                "name": name,
                "gb_s": achieved,
                "of_roof": achieved / peak,
                "roof_tok_s": batch / roof_step,
            }
            info["results"].append(result)
            replay = f"{result['replay_ms']:.2f}" if "replay_ms" in result else "-"
            print(
                f"{name:>12} {batch:>5} {result['step_ms']:>8.2f} {replay:>9} {result['tok_s']:>8.1f} {achieved:>7.0f} "
                f"{result['of_roof']:>7.1%} {result['roof_tok_s']:>10.1f}"
            )
        if args.profile and name == "torch":
            print(profile(runner, args.prompt))
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    first = [r["tokens"][:16] for r in info["results"] if r["batch"] == args.batch[0]]
    info["same_greedy_tokens_first_16"] = all(t == first[0] for t in first)
    for r in info["results"]:
        del r["tokens"]
    print(json.dumps(info))


if __name__ == "__main__":
    main()
