"""What the server needs of whatever stands behind it: the in-process engine on its thread
(async_engine.AsyncEngine) or engines as replicas (replicas/front.ReplicaSet). The server is written
against these two protocols only, and imports nothing from the replica tier above it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fulmine.engine.outputs import RequestOutput
from fulmine.request import SamplingParams

# receives a request's outputs on the event loop that submitted it; the last is a finished output
# or the exception that ended the request
Sink = Callable[[RequestOutput | BaseException], None]


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
    reasoning: Any  # its ReasoningFormat (fulmine/reasoning.py)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def check_constraint(self, structured: Any) -> None: ...

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

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        on_output: Sink,
        generated: list[int] | None = None,
    ) -> None:
        """Start a request the server checked (ModelFacts.check_request) and admitted; its outputs
        go to `on_output` on this event loop."""

    def abort(self, request_id: str) -> None:
        """Stop a request: nothing more reaches its `on_output`."""

    async def embed(self, prompt_ids: list[int], pooling: str, normalize: bool) -> list[float]: ...
