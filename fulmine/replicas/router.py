"""Cache-aware routing for engine replicas, on Ray Serve's request-router API.

A request goes to the replica holding the longest prefix of its tokens in its prefix cache, unless
that replica carries `balance` more requests than the least loaded one (then the least loaded
first). What a replica holds: the block keys it reported in its last routing stats, and the keys of
the requests this router sent it since (a multi-turn chat's next turn arrives before the next
report). Keys are computed by kv_cache.block_keys, as the engine computes them. Requests that are
not a Job (the front asking a replica's facts, embeddings) go to the least loaded replica.

`policy="round_robin"` turns the cache off for comparison (the benchmark's baseline).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from fulmine.kv_cache.keys import block_keys
from fulmine.replicas import front
from fulmine.replicas.replica import KEY_BYTES, Job

_REMEMBERED = 1 << 16  # keys remembered per replica between its reports


class PrefixRouter(RequestRouter):
    def initialize_state(self, policy: str = "prefix", balance: int = 4, **_: Any) -> None:
        self.policy, self.balance = policy, balance
        self._sent: dict[ReplicaID, OrderedDict[bytes, None]] = {}
        self._reported: dict[ReplicaID, tuple[int, frozenset[bytes]]] = {}  # (id of the stats, their keys)
        self._ongoing: dict[ReplicaID, int] = {}  # requests this router sent that have not finished
        self._turn = itertools.count()
        front.ROUTERS.add(self)  # (Serve copies this module into the handle by value: the set lives there)

    # -- what a replica holds and carries -----------------------------------------------------
    def _keys(self, job: Job, replicas: list[RunningReplica]) -> list[bytes]:
        block_size = next((r.routing_stats["block_size"] for r in replicas if r.routing_stats), 16)
        return [key[:KEY_BYTES] for key in block_keys(job.token_ids, block_size)]

    def _held(self, replica: RunningReplica) -> frozenset[bytes]:
        stats = replica.routing_stats or {}
        known = self._reported.get(replica.replica_id)
        if known is None or known[0] != id(stats):
            known = (id(stats), frozenset(stats.get("keys", ())))
            self._reported[replica.replica_id] = known
        return known[1]

    def _matched(self, replica: RunningReplica, keys: list[bytes]) -> int:
        held = self._held(replica)
        sent: OrderedDict[bytes, None] | dict[bytes, None] = self._sent.get(replica.replica_id) or {}
        count = 0
        for key in keys:
            if key not in held and key not in sent:
                break
            count += 1
        return count

    def _load(self, replica: RunningReplica) -> int:
        """Requests on the replica: what this router sent it and has not seen finish (exact, at once:
        a burst arriving together spreads), or what it last reported (other fronts' too), the larger."""
        reported = int((replica.routing_stats or {}).get("load", 0))
        return max(self._ongoing.get(replica.replica_id, 0), reported)

    # -- Ray Serve's hooks ----------------------------------------------------------------------
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        replicas = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not replicas:
            return []
        job = _job(pending_request)
        if self.policy == "round_robin":
            turn = next(self._turn) % len(replicas)
            return [[r] for r in replicas[turn:] + replicas[:turn]]
        loads = {r.replica_id: self._load(r) for r in replicas}
        by_load = sorted(replicas, key=lambda r: loads[r.replica_id])
        if job is None:
            return [[r] for r in by_load]
        keys = self._keys(job, replicas)
        matched = {r.replica_id: self._matched(r, keys) for r in replicas}
        best = max(by_load, key=lambda r: matched[r.replica_id])  # ties: the least loaded
        least = loads[by_load[0].replica_id]
        if matched[best.replica_id] and loads[best.replica_id] - least <= self.balance:
            return [[best]] + [[r] for r in by_load if r is not best]
        return [[r] for r in by_load]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        self._ongoing[replica_id] = self._ongoing.get(replica_id, 0) + 1
        job = _job(pending_request)
        if job is None or self.policy != "prefix":
            return
        replica = self.curr_replicas.get(replica_id)
        sent = self._sent.setdefault(replica_id, OrderedDict())
        for key in self._keys(job, [replica] if replica is not None else []):
            sent[key] = None
            sent.move_to_end(key)
        while len(sent) > _REMEMBERED:
            sent.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._ongoing[replica_id] = max(0, self._ongoing.get(replica_id, 0) - 1)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for known in (self._sent, self._reported, self._ongoing):
            known.pop(replica_id, None)


def _job(pending_request: PendingRequest | None) -> Job | None:
    if pending_request is None or not pending_request.args:
        return None
    job = pending_request.args[0]
    return job if isinstance(job, Job) else None
