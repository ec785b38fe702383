"""Prometheus metrics, on a registry of the app's own (so servers in one process never clash)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fulmine.energy import EnergyMeter
from fulmine.server.async_engine import AsyncEngine

if TYPE_CHECKING:
    from fulmine.server.engine_client import EngineClient

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "fulmine_time_to_first_token_seconds", "Arrival to first token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttfat = Histogram(
            "fulmine_time_to_first_answer_token_seconds",
            "Arrival to the first answer token (after a reasoning model's thinking; the first token otherwise).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "fulmine_inter_token_latency_seconds", "Between tokens of one stream.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "fulmine_e2e_request_latency_seconds", "Arrival to finish.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue = Histogram(
            "fulmine_request_queue_time_seconds", "Arrival to first scheduled.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("fulmine_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("fulmine_generation_tokens", "Tokens generated.", registry=r)
        self.cached_tokens = Counter(
            "fulmine_prefix_cache_hit_tokens", "Prompt tokens served from the cache.", registry=r
        )
        self.requests = Counter("fulmine_requests", "Finished requests.", ["finish_reason"], registry=r)
        self.rejected = Counter("fulmine_requests_rejected", "Requests refused.", ["reason"], registry=r)
        self.slo = Counter(
            "fulmine_slo_requests",
            "Finished requests with a latency target, by target (ttft, itl: its gaps' p90) and whether it was met.",
            ["target", "met"],
            registry=r,
        )
        self.goodput = Counter(
            "fulmine_slo_goodput_requests",
            "Finished requests that met every latency target they had (rate(): goodput per second).",
            registry=r,
        )
        self.resumed = Counter(
            "fulmine_replica_resumed_streams",
            "Streams that went on on another replica after theirs failed (fulmine serve --replicas).",
            registry=r,
        )
        self.replicas = Gauge("fulmine_replicas", "Engine replicas by state: up, total.", ["state"], registry=r)
        self.engine_deaths = Counter(
            "fulmine_engine_deaths", "Engine failures no request could be blamed for (each restarts it).", registry=r
        )
        self.running = Gauge("fulmine_num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("fulmine_num_requests_waiting", "Requests waiting to run.", registry=r)
        self.kv_usage = Gauge("fulmine_kv_cache_usage_ratio", "Fraction of KV blocks in use.", registry=r)
        self.kv_used = Gauge("fulmine_kv_cache_used_blocks", "KV blocks held by requests.", registry=r)
        self.hit_rate = Gauge(
            "fulmine_prefix_cache_hit_rate", "Prompt tokens found in the cache / queried.", registry=r
        )
        self.weight_bytes = Gauge(
            "fulmine_model_weight_bytes", "Bytes of weight matrices a decode step reads.", registry=r
        )
        self.drafted = Gauge("fulmine_spec_draft_tokens", "Speculative tokens drafted and verified.", registry=r)
        self.accepted = Gauge("fulmine_spec_accepted_tokens", "Speculative tokens accepted.", registry=r)
        self.constrained = Gauge(
            "fulmine_constrained_requests", "Requests with a structured-output constraint admitted.", registry=r
        )
        self.mask_seconds = Gauge(
            "fulmine_token_mask_seconds", "Time computing constrained rows' allowed tokens.", registry=r
        )
        self.grammar_compiles = Gauge("fulmine_grammar_compiles", "Distinct constraints compiled.", registry=r)
        self.output_tokens = 0  # generated tokens in all, for joules per token
        self.energy: EnergyMeter | None = None
        self.joules = Gauge(
            "fulmine_energy_joules", "Energy used since the server started, by its source.", ["source"], registry=r
        )
        self.joules_per_token = Gauge(
            "fulmine_energy_joules_per_output_token",
            "Energy used since the server started per generated token, by its source.",
            ["source"],
            registry=r,
        )

    def meter(self, energy: EnergyMeter) -> None:
        """Energy from this meter (its source named on both series)."""
        self.energy = energy
        self.joules.labels(energy.source).set_function(energy.joules)
        self.joules_per_token.labels(energy.source).set_function(
            lambda: energy.joules() / self.output_tokens if self.output_tokens else 0.0
        )

    def watch(self, engine: AsyncEngine | Any) -> None:
        """Gauges read the engine at scrape time: its `gauges()` (one engine, or replicas summed)."""
        names = {
            self.running: "running", self.waiting: "waiting", self.kv_usage: "kv_usage", self.kv_used: "kv_used",
            self.hit_rate: "hit_rate",
            self.weight_bytes: "weight_bytes", self.drafted: "drafted", self.accepted: "accepted",
            self.constrained: "constrained", self.mask_seconds: "mask_seconds",
            self.grammar_compiles: "grammar_compiles",
        }  # fmt: skip
        for gauge, name in names.items():
            gauge.set_function(partial(_read, engine, name))

    def watch_replicas(self, replicas: EngineClient) -> None:
        """Replicas up and in all, from Serve's controller; each stream resumed elsewhere counted."""
        self.replicas.labels("up").set_function(lambda: (replicas.replicas() or (0, 0))[0])
        self.replicas.labels("total").set_function(lambda: (replicas.replicas() or (0, 0))[1])
        replicas.on_resume = self.resumed.inc

    def unwatch(self) -> None:
        """Let go of a dead engine: the gauges read zero until the next one is watched."""
        for gauge in (self.running, self.waiting, self.kv_usage, self.kv_used, self.hit_rate, self.weight_bytes):
            gauge.set_function(lambda: 0)
        for gauge in (self.drafted, self.accepted, self.constrained, self.mask_seconds, self.grammar_compiles):
            gauge.set_function(lambda: 0)


def _read(engine: Any, name: str) -> float:
    return float(engine.gauges()[name])
