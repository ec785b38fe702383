"""The ranks of a tensor-parallel engine: rank 0 is the engine (scheduler, sampling, the API); ranks
1..N-1 are processes that load their part of the model and run every step rank 0 runs, each step
told to them by a broadcast of its plain-data StepBatch (the scheduler's decisions are rank 0's
alone). Every rank computes the whole step, collectives included; only rank 0's samples are used.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fulmine import kernels
from fulmine.config import ConfigError, EngineConfig, ModelConfig
from fulmine.distributed.tensor_parallel import TensorParallel, shard_config

# A rank that stops answering (killed, out of memory) fails the step's collective after this long
# instead of hanging the engine forever.
TIMEOUT = timedelta(seconds=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ranks(
    config: EngineConfig,
    model: str | None,
    model_config: ModelConfig,
    load_args: dict[str, Any],
    runner_args: dict[str, Any],
) -> Ranks:
    """Start ranks 1..N-1 loading `model`, join them as rank 0 (this process); the cores are shared
    among the ranks, and every rank runs the PyTorch executor (the fused C decoder runs whole layers)."""
    world = config.tensor_parallel_size
    if dist.is_initialized():
        raise ConfigError("a tensor-parallel engine already runs in this process: close it first (ranks.close())")
    if load_args["device"].type != "cpu":
        raise ConfigError("tensor parallel runs on the CPU (gloo) in this version; on GPUs it is not built yet")
    shard_config(model_config, TensorParallel(0, world))  # a size that does not divide the model: refused now
    threads = max(1, torch.get_num_threads() // world)
    torch.set_num_threads(threads)
    kernels.set_threads(threads)
    runner_args["executor"] = "torch"
    return Ranks(world, threads, {**load_args, "model": model}, runner_args)


class Ranks:
    """Rank 0's side: starts ranks 1..world-1 as processes, joins their group, tells them each step."""

    def __init__(self, world: int, threads: int, load_args: dict[str, Any], runner_args: dict[str, Any]) -> None:
        self.world = world
        address = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")
        self.processes = [
            context.Process(
                target=_rank_main,
                args=(rank, world, address, threads, load_args, runner_args),
                name=f"fulmine-rank-{rank}",
                daemon=True,
            )
            for rank in range(1, world)
        ]
        for process in self.processes:
            process.start()
        dist.init_process_group("gloo", init_method=address, rank=0, world_size=world, timeout=TIMEOUT)
        self.tp = TensorParallel(0, world)
        atexit.register(self.close)

    def tell(self, command: tuple[str, Any] | None) -> None:
        """Every other rank does `command`: ("execute", batch) or ("hidden", batch); None: stop."""
        if command is not None and command[0] in ("execute", "hidden"):  # token masks are rank 0's
            command = (command[0], dataclasses.replace(command[1], token_masks=None))
        dist.broadcast_object_list([command], src=0)

    def close(self) -> None:
        """Stop the other ranks and leave the group (also at exit)."""
        atexit.unregister(self.close)
        if not dist.is_initialized():
            return
        with contextlib.suppress(RuntimeError):  # a rank already gone: the others are stopped below
            self.tell(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        dist.destroy_process_group()


def _rank_main(
    rank: int, world: int, address: str, threads: int, load_args: dict[str, Any], runner_args: dict[str, Any]
) -> None:
    """A rank other than 0: load its part, then run what rank 0 runs until told to stop."""
    from fulmine.engine.model_runner import ModelRunner
    from fulmine.models.loader import load_model
    from fulmine.models.source import resolve

    torch.set_num_threads(threads)
    kernels.set_threads(threads)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world, timeout=TIMEOUT)
    tp = TensorParallel(rank, world)
    model = load_model(resolve(load_args.pop("model")), progress=False, tp=tp, **load_args)
    runner = ModelRunner(model, **runner_args)
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        command = box[0]
        if command is None:
            break
        kind, argument = command
        try:
            if kind == "execute":
                runner.execute(argument)
                runner.generators.clear()  # its samples are not used: no seeded state to keep
            elif kind == "hidden":
                runner.hidden_states(argument)
        except Exception:  # rank 0 meets the same error in the same step and reports it
            pass
    dist.destroy_process_group()
