"""The replica router's policy (replicas/router.py), on stand-in replicas: the longest cached
prefix wins unless its replica is loaded past the balance, keys the router sent count before the
replica reports them, round robin rotates, and requests that are not Jobs go to the least loaded."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("ray.serve.request_router")

from ray.serve._private.request_router.common import ReplicaQueueLengthCache  # noqa: E402

from fulmine.kv_cache import block_keys  # noqa: E402
from fulmine.replicas.replica import KEY_BYTES, Job  # noqa: E402
from fulmine.replicas.router import PrefixRouter  # noqa: E402
from fulmine.request import SamplingParams  # noqa: E402

BLOCK = 16


@dataclass(frozen=True)
class _Id:
    unique_id: str


@dataclass
class _Replica:
    name: str
    cached: list[int] = field(default_factory=list)  # token ids whose blocks it holds
    load: int = 0

    @property
    def replica_id(self) -> _Id:
        return _Id(self.name)

    @property
    def routing_stats(self) -> dict[str, Any]:
        keys = [k[:KEY_BYTES] for k in block_keys(self.cached, BLOCK)]
        return {"block_size": BLOCK, "keys": keys, "load": self.load}


@dataclass
class _Pending:
    args: list[Any]


def _router(policy: str = "prefix", replicas: list[_Replica] = ()) -> PrefixRouter:  # type: ignore[assignment]
    router = PrefixRouter.__new__(PrefixRouter)
    router._replica_queue_len_cache = ReplicaQueueLengthCache()
    router._replicas = {r.replica_id: r for r in replicas}
    router.initialize_state(policy=policy, balance=4)
    return router


def _choose(router: PrefixRouter, replicas: list[_Replica], request: Any) -> list[str]:
    ranks = asyncio.run(router.choose_replicas(replicas, _Pending([request])))  # type: ignore[arg-type]
    return [rank[0].replica_id.unique_id for rank in ranks]


def _job(tokens: list[int]) -> Job:
    return Job("r", tokens, SamplingParams(), 0.0)


CHAT = list(range(100, 180))  # five full blocks


def test_longest_cached_prefix_wins() -> None:
    a, b, c = _Replica("a", CHAT[:32]), _Replica("b", CHAT[:64], load=2), _Replica("c")
    assert _choose(_router(), [a, b, c], _job(CHAT + [7, 8]))[0] == "b"


def test_a_loaded_replica_yields_to_the_least_loaded() -> None:
    a, b = _Replica("a", CHAT[:64], load=9), _Replica("b", load=1)
    assert _choose(_router(), [a, b], _job(CHAT)) == ["b", "a"]


def test_no_prefix_anywhere_goes_to_the_least_loaded() -> None:
    a, b = _Replica("a", load=3), _Replica("b", load=1)
    assert _choose(_router(), [a, b], _job(CHAT))[0] == "b"
    assert _choose(_router(), [a, b], "not a job")[0] == "b"


def test_what_was_sent_counts_before_the_replica_reports_it() -> None:
    a, b = _Replica("a"), _Replica("b")
    router = _router(replicas=[a, b])
    router.on_request_routed(_Pending([_job(CHAT)]), a.replica_id, None)  # type: ignore[arg-type]
    b.load, a.load = 0, 1
    assert _choose(router, [a, b], _job(CHAT + list(range(40))))[0] == "a"  # the next turn follows the first


def test_a_burst_spreads_before_any_report() -> None:
    """Requests routed together: each counts on its replica at once, not at the next report."""
    a, b = _Replica("a"), _Replica("b")
    router = _router(replicas=[a, b])
    chosen = []
    for i in range(4):
        first = _choose(router, [a, b], _job([i] * 40))[0]
        router.on_request_routed(_Pending([_job([i] * 40)]), _Id(first), None)  # type: ignore[arg-type]
        chosen.append(first)
    assert sorted(chosen) == ["a", "a", "b", "b"]
    router.on_request_completed(_Id("a"), "x")
    router.on_request_completed(_Id("a"), "y")
    assert _choose(router, [a, b], _job([9] * 40))[0] == "a"


def test_round_robin_rotates() -> None:
    replicas = [_Replica("a", CHAT), _Replica("b"), _Replica("c")]
    router = _router("round_robin")
    firsts = [_choose(router, replicas, _job(CHAT))[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
