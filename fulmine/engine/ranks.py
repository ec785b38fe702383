"""The ranks of a tensor-parallel engine: rank 0 is the engine (scheduler, sampling, the API); ranks
1..N-1 are processes that load their part of the model and run every step rank 0 runs, each step
told to them by a broadcast of its plain-data StepBatch (the scheduler's decisions are rank 0's
alone). Every rank computes the whole step, collectives included; only rank 0's samples are used.

Across machines (`--nnodes`, `--node-rank`, `--master-addr`, `--master-port`, as SGLang and vLLM
name them): each node hosts tensor_parallel_size / nnodes consecutive ranks; the head (node 0)
serves the API, the others run headless (`fulmine serve --node-rank K ...`) until the head stops.
Or on an existing Ray cluster (`--distributed-backend ray`): ranks 1..N-1 are Ray actors that Ray
places on its nodes; the group and the steps are the same.
Every node needs the model at the same path. gloo picks the network interface from the host name;
set GLOO_SOCKET_IFNAME where that is not the one the nodes share.
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
from fulmine.layers.tensor_parallel import TensorParallel, shard_config

# A rank that stops answering (killed, out of memory) fails the step's collective after this long
# instead of hanging the engine forever; the nodes of a group have as long to join it.
JOIN_TIMEOUT = timedelta(seconds=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_ranks(config: EngineConfig) -> range:
    """The global ranks this node hosts: consecutive, world / nnodes of them."""
    per = config.tensor_parallel_size // config.nnodes
    return range(config.node_rank * per, (config.node_rank + 1) * per)


def _address(config: EngineConfig) -> str:
    if config.nnodes == 1 and not config.master_port:
        return f"tcp://127.0.0.1:{_free_port()}"
    return f"tcp://{config.master_addr}:{config.master_port}"


def _spawn(ranks: range, world: int, address: str, threads: int) -> list[Any]:
    context = mp.get_context("spawn")
    processes = [
        context.Process(target=_rank_main, args=(r, world, address, threads), name=f"fulmine-rank-{r}", daemon=True)
        for r in ranks
    ]
    for process in processes:
        process.start()
    return processes


def start_ranks(
    config: EngineConfig,
    model: str | None,
    model_config: ModelConfig,
    load_args: dict[str, Any],
    runner_args: dict[str, Any],
) -> Ranks:
    """On the head node: start this node's other ranks, join the group as rank 0 (this process) with
    every node's ranks, and send them what to load. The cores are shared among a node's ranks; every
    rank runs the PyTorch executor (the fused C decoder runs whole layers)."""
    world = config.tensor_parallel_size
    if dist.is_initialized():
        raise ConfigError("a tensor-parallel engine already runs in this process: close it first (ranks.close())")
    if load_args["device"].type != "cpu":
        raise ConfigError("tensor parallel runs on the CPU (gloo) in this version; on GPUs it is not built yet")
    shard_config(model_config, TensorParallel(0, world))  # a size that does not divide the model: refused now
    threads = max(1, torch.get_num_threads() // len(_node_ranks(config)))
    torch.set_num_threads(threads)
    kernels.set_threads(threads)
    runner_args["executor"] = "torch"
    if config.distributed_backend == "ray":
        address, processes = _ray_ranks(world, threads)
    else:
        address = _address(config)
        processes = _spawn(_node_ranks(config)[1:], world, address, threads)
    dist.init_process_group("gloo", init_method=address, rank=0, world_size=world, timeout=JOIN_TIMEOUT)
    # every rank loads what the head computed (the KV cache's blocks, dtypes): the same on every node
    dist.broadcast_object_list([({**load_args, "model": model}, runner_args)], src=0)
    return Ranks(world, processes)


def _ray_ranks(world: int, threads: int) -> tuple[str, list[Any]]:
    """Ranks 1..world-1 as Ray actors (`--distributed-backend ray`), spread over the cluster's nodes,
    meeting rank 0 at this node's address. Ray starts a local cluster when none is reachable."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--distributed-backend ray needs Ray: pip install 'fulmine[distributed]'") from None
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    address = f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"
    actor = ray.remote(num_cpus=threads, scheduling_strategy="SPREAD", max_restarts=0)(_RankActor)
    ranks = []
    for r in range(1, world):
        handle = actor.options(name=f"fulmine-rank-{r}-{address}").remote()
        ranks.append(_RayRank(handle, handle.run.remote(r, world, address, threads)))  # type: ignore[attr-defined]
    return address, ranks


class _RankActor:
    """A rank other than 0 in a Ray actor: its `run` is the rank's whole life (_rank_main)."""

    def run(self, rank: int, world: int, address: str, threads: int) -> None:
        _rank_main(rank, world, address, threads)


class _RayRank:
    """A rank running in a Ray actor, with a process's join / is_alive / kill."""

    def __init__(self, actor: Any, ref: Any) -> None:
        self.actor, self.ref = actor, ref

    def join(self, timeout: float) -> None:
        """Wait for the rank to end; then let its actor go (it would hold its CPUs in the cluster)."""
        import ray

        if ray.wait([self.ref], timeout=timeout)[0]:
            ray.kill(self.actor)

    def is_alive(self) -> bool:
        import ray

        return not ray.wait([self.ref], timeout=0)[0]

    def kill(self) -> None:
        import ray

        ray.kill(self.actor)


def run_node(config: EngineConfig) -> int:
    """A worker node (node_rank > 0): its ranks join the head's group and run until it stops them."""
    threads = max(1, torch.get_num_threads() // len(_node_ranks(config)))
    processes = _spawn(_node_ranks(config), config.tensor_parallel_size, _address(config), threads)
    for process in processes:
        process.join()
    return max((process.exitcode or 0 for process in processes), default=0)


class Ranks:
    """Rank 0's side: the group it leads, and this node's rank processes; tells every rank each step."""

    def __init__(self, world: int, processes: list[Any]) -> None:
        self.world, self.processes = world, processes
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
            # gloo's thread drops the broadcast's Python-made tensors after it completes; a barrier
            # after it makes sure that happens now, not while the interpreter is exiting (which
            # aborted the process: a thread taking the GIL during finalization)
            dist.barrier()
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        dist.destroy_process_group()


def _rank_main(rank: int, world: int, address: str, threads: int) -> None:
    """A rank other than 0: join the group, load the part the head names, run what it runs until told to stop."""
    from fulmine.executors.model_runner import ModelRunner
    from fulmine.models.loader import load_model
    from fulmine.models.source import resolve

    torch.set_num_threads(threads)
    kernels.set_threads(threads)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world, timeout=JOIN_TIMEOUT)
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    load_args, runner_args = box[0]
    tp = TensorParallel(rank, world)
    model = load_model(resolve(load_args.pop("model")), progress=False, tp=tp, **load_args)
    runner = ModelRunner(model, **runner_args)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        command = box[0]
        if command is None:
            dist.barrier()  # as rank 0 does (Ranks.close)
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
