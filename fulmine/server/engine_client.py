"""What the server needs of whatever stands behind it: the in-process engine on its thread
(async_engine.AsyncEngine) or engines as replicas (replicas/front.ReplicaSet). The server is written
against these two protocols only, and imports nothing from the replica tier above it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fulmine.engine.outputs import RequestOutput
from fulmine.request import SamplingParams


class ModelFacts(Protocol):
    """The model's facts the server reads to check, template and tokenize requests (LLMEngine in
    process; replicas/front.FrontEngine, the same facts without weights, behind replicas)."""

    source: Any
    config: Any
    model_config: Any
    max_model_len: int
    tokenizer: Any
    grammars: Any
    admission: Any

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def admit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival_time: float) -> None: ...


class EngineClient(Protocol):
    engine: Any  # its ModelFacts (typed Any: LLMEngine's attributes are richer than the protocol's)
    on_resume: Callable[[], None] | None  # called per stream resumed on another replica

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def gauges(self) -> dict[str, float]: ...

    def replicas(self) -> tuple[int, int] | None:
        """Replicas (up, total) behind this client; None for one engine in this process."""

    def cpu_seconds(self) -> float | None:
        """CPU seconds its engines used outside this process (replicas), for the energy estimate."""

    def stop(self) -> None: ...

    def abort_all(self, error: BaseException) -> None: ...

    async def admitted(self, request_id: str) -> None:
        """Waits until the request is admitted by its latency targets where it runs (raises Refused)."""

    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        generated: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    async def embed(self, prompt_ids: list[int], pooling: str, normalize: bool) -> list[float]: ...
