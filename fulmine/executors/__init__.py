"""Executors: how a step runs on a device. The runner tries its executors in order for each step;
the first that accepts the step's shape runs it, and the PyTorch executor accepts every step.

One file per executor: torch_eager.py (any device), cpu_fused.py (the C decoder), cuda_graph.py
(captured decode steps). A new one (tensor parallel, say) is one more file and one entry below.
"""

from __future__ import annotations

from fulmine.config import ConfigError
from fulmine.executors import cpu_fused, cuda_graph, torch_eager
from fulmine.executors.base import Executor, ModelState


def make_executors(state: ModelState, choice: str, max_num_seqs: int) -> list[Executor]:
    """The executors a runner tries in order: the chosen (or every supported) one, then PyTorch."""
    if state.device.type == "cpu":
        cpu_fused.tune_layers(state.model)
    specialized: list[Executor] = []
    if choice in ("auto", "cuda-graph") and _usable(cuda_graph, state, choice):
        specialized.append(cuda_graph.CudaGraphExecutor(state, max_num_seqs))
    if choice in ("auto", "cpu-fused") and _usable(cpu_fused, state, choice):
        specialized.append(cpu_fused.CpuFusedExecutor(state))
    if choice == "graph-eager":  # the graph executor's fixed shapes, uncaptured: any device
        specialized.append(cuda_graph.CudaGraphExecutor(state, max_num_seqs, capture=False))
    return [*specialized, torch_eager.TorchExecutor(state)]


def _usable(module: object, state: ModelState, choice: str) -> bool:
    reason = module.unsupported_reason(state)  # type: ignore[attr-defined]
    if reason is not None and choice != "auto":
        raise ConfigError(f"--executor {choice} cannot run this model here: {reason}")
    return reason is None
