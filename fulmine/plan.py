"""`fulmine plan`: how many users a replica, a rack or a power budget serves at a given speed.

The profile is the engine's step cost model (executors/cost_model.py, fitted at startup on this
machine's steps) and a replica's power while busy (energy.py: measured, or an estimate named as
one). Predictions come from simulating the scheduler's policy with that model: prompts chunked into
the token budget beside the streams, one token per stream per step. Users are closed-loop: each
sends its next request when the last one ends, their first requests spread over one request's
duration (steady state, not a burst). Speculative decoding is off in the profile (it only
adds speed where drafts are accepted).

`--validate` measures the engine at 1, 2 and 4 concurrent users (a burst of requests), after
predicting each, and prints both with the largest relative error.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fulmine.engine.admission import Streams
from fulmine.engine.outputs import fold_all
from fulmine.executors.cost_model import StepCostModel, StepShape

Limit = Callable[[Streams, int], int]


@dataclass
class Load:
    users: int
    prompt_tokens: int
    output_tokens: int


@dataclass
class Outcome:
    ttft_p50_s: float
    ttft_p90_s: float
    tok_s_per_user: float  # after the first token, per request


def simulate(
    cost: StepCostModel,
    load: Load,
    budget: int,
    cycles: int = 1,
    limit: Limit | None = None,
    stagger_s: float = 0.0,
) -> Outcome:
    """Steps of `load.users` users sending `cycles` requests each, back to back; user u's first at
    u * stagger_s / users (0: all at once, a burst). `limit(streams, start)`: the prompt tokens a step
    may take beside streams (the engine's Admission.chunk_limit: its inter-token target), the whole
    budget without one. With several cycles the first is a warm-up, not counted."""
    users = load.users
    # per user: tokens of the current request's prompt still to compute, tokens still to generate
    prompt, output = [load.prompt_tokens] * users, [load.output_tokens] * users
    started = [u * stagger_s / users for u in range(users)]
    first, done = [0.0] * users, [0] * users
    clock, ttfts, speeds = 0.0, [], []
    counted = 1 if cycles > 1 else 0  # requests of the first cycle are not counted

    def active(u: int) -> bool:
        return done[u] < cycles and started[u] <= clock

    while min(done) < cycles:
        if not any(active(u) for u in range(users)):  # idle until the next user arrives
            clock = min(started[u] for u in range(users) if done[u] < cycles)
        rows = [u for u in range(users) if active(u) and prompt[u] == 0]
        context = load.prompt_tokens + load.output_tokens // 2
        shape, room, chunks = StepShape.decode(len(rows), context), budget - len(rows), []
        prefill = limit(Streams(len(rows), context), 0) if limit is not None and rows else budget
        room = min(room, prefill)
        for u in range(users):
            if active(u) and prompt[u] > 0 and room > 0:
                n = min(prompt[u], room)
                shape = shape.plus_prompt(n, load.prompt_tokens - prompt[u])
                chunks.append((u, n))
                room -= n
        clock += cost.seconds(shape)
        for u in rows:
            output[u] -= 1
            if output[u] == 0:  # the request ends; the user sends the next
                if done[u] >= counted:
                    speeds.append((load.output_tokens - 1) / max(clock - first[u], 1e-9))
                done[u] += 1
                prompt[u], output[u], started[u] = load.prompt_tokens, load.output_tokens, clock
        for u, n in chunks:
            prompt[u] -= n
            if prompt[u] == 0:  # its first token comes from this step
                first[u] = clock
                if done[u] >= counted:
                    ttfts.append(clock - started[u])
                output[u] -= 1
    ttfts.sort()
    return Outcome(
        statistics.median(ttfts), ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))], statistics.median(speeds)
    )


def steady(
    cost: StepCostModel, args: argparse.Namespace, budget: int, users: int, limit: Limit | None = None
) -> Outcome:
    """`users` in steady state: their first requests spread over one request's duration (not all at
    once), three requests each, the first not counted."""
    one = simulate(cost, Load(1, args.prompt_tokens, args.output_tokens), budget, 1, limit)
    period = one.ttft_p50_s + (args.output_tokens - 1) / one.tok_s_per_user
    return simulate(cost, Load(users, args.prompt_tokens, args.output_tokens), budget, 3, limit, stagger_s=period)


def users_per_replica(
    cost: StepCostModel, args: argparse.Namespace, budget: int, max_users: int, limit: Limit | None = None
) -> int:
    """The most users one replica serves at --speed tok/s each with a TTFT p90 within --ttft-ms."""

    def fits(users: int) -> bool:
        outcome = steady(cost, args, budget, users, limit)
        return outcome.tok_s_per_user >= args.speed and outcome.ttft_p90_s * 1e3 <= args.ttft_ms

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= max_users and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, max_users + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plan")
    group.add_argument("--speed", type=float, default=20.0, help="tokens per second each user must get")
    group.add_argument("--ttft-ms", type=float, default=1000.0, help="time to first token, p90, at most")
    group.add_argument("--prompt-tokens", type=int, default=500, help="a request's prompt")
    group.add_argument("--output-tokens", type=int, default=200, help="a request's answer")
    group.add_argument("--users", type=int, default=10_000, help="the load to size replicas for")
    group.add_argument("--power-mw", type=float, default=750.0, help="a power budget: how many users it serves")
    group.add_argument("--pue", type=float, default=1.2, help="facility power / IT power")
    group.add_argument("--phases", type=float, nargs="+", default=None, metavar="MW", help="power at each phase")
    group.add_argument("--plot", default=None, metavar="FILE", help="per-user speed by users on a replica (PNG)")
    group.add_argument("--validate", action="store_true", help="measure 1, 2 and 4 users against the predictions")
    group.add_argument(
        "--max-rel-error", type=float, default=0.5,
        help="--validate exits 1 when a prediction is off by more than this (the target is 0.2: docs/BENCHMARKS.md)",
    )  # fmt: skip


def main(args: argparse.Namespace, engine: Any, watts_per_core: float) -> int:
    from fulmine.energy import EnergyMeter

    meter = EnergyMeter(watts_per_core)
    if args.validate:
        return _validate(engine, meter, args.max_rel_error)
    busy_watts = _busy_watts(engine, meter, engine.num_threads)
    budget, cost = engine.config.max_num_batched_tokens, engine.cost
    limit = engine.admission.chunk_limit
    per_replica = users_per_replica(cost, args, budget, engine.config.max_num_seqs, limit)
    one = simulate(cost, Load(1, args.prompt_tokens, args.output_tokens), budget, 1, limit)
    replica_kw = busy_watts * args.pue / 1e3
    replicas = math.ceil(args.users / per_replica) if per_replica else None
    phases = args.phases or [args.power_mw * f for f in (0.01, 0.1, 0.5, 1.0)]
    rows = []
    for mw in phases:
        count = int(mw * 1e3 / replica_kw) if replica_kw > 0 else 0
        rows.append({"power_mw": mw, "replicas": count, "users": count * per_replica})
    print(f"model {engine.source.name}: step {cost.seconds(StepShape.decode(1, args.prompt_tokens)) * 1e3:.1f} ms")
    print(f"one user: TTFT {one.ttft_p50_s * 1e3:.0f} ms, {one.tok_s_per_user:.1f} tok/s")
    print(f"users per replica at {args.speed:g} tok/s and TTFT p90 <= {args.ttft_ms:g} ms: {per_replica}")
    print(f"replica power {busy_watts:.0f} W busy ({meter.source}), x PUE {args.pue:g} = {replica_kw:.3f} kW")
    if replicas is not None:
        print(f"{args.users} users: {replicas} replicas, {replicas * replica_kw:.1f} kW")
    print(f"{'phase MW':>10} {'replicas':>12} {'users':>14}")
    for row in rows:
        print(f"{row['power_mw']:>10g} {row['replicas']:>12} {row['users']:>14}")
    if args.plot:
        _plot(cost, args, budget, engine.config.max_num_seqs, args.plot, limit)
    summary = {
        "model": engine.source.name,
        "users_per_replica": per_replica,
        "speed_tok_s": args.speed,
        "ttft_p90_ms": args.ttft_ms,
        "replica_watts": round(busy_watts, 1),
        "energy_source": meter.source,
        "replicas_for_users": replicas,
        "users": args.users,
        "kw_for_users": round(replicas * replica_kw, 3) if replicas is not None else None,
        "phases": rows,
        "cost_model": [round(c, 7) for c in cost.coef],
    }
    print(json.dumps(summary))
    return 0


def _busy_watts(engine: Any, meter: Any, threads: int) -> float:
    """A replica's power while it computes: measured over a few decode steps where a counter is
    readable, else the estimate for its threads (every one busy)."""
    if meter.source.startswith("estimate"):
        return threads * meter.watts_per_core
    before, started = meter.joules(), time.monotonic()
    _run_burst(engine, 4, 64, 32)
    return (meter.joules() - before) / (time.monotonic() - started)


def _run_burst(engine: Any, users: int, prompt_tokens: int, output_tokens: int) -> tuple[list[float], list[float]]:
    """`users` requests at once; per request its TTFT and tok/s after the first token."""
    from fulmine.request import SamplingParams

    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    start = time.monotonic()
    first: dict[str, float] = {}
    ttfts, speeds = [], []
    for u in range(users):  # distinct prompts: nothing from the prefix cache
        tokens = [(1000 + 31 * u + 7 * i + int(start * 1e3)) % (vocab // 2) + vocab // 4 for i in range(prompt_tokens)]
        engine.add_request(tokens, params, request_id=f"plan-{start}-{u}", arrival_time=start)
    answers: dict[str, Any] = {}
    while engine.has_unfinished():
        for out in fold_all(answers, engine.step()):
            now = time.monotonic()
            if out.request_id not in first and out.token_ids:
                first[out.request_id] = now
                ttfts.append(now - start)
            if out.finished:
                speeds.append((len(out.token_ids) - 1) / max(now - first[out.request_id], 1e-9))
    return ttfts, speeds


def _validate(engine: Any, meter: Any, max_rel_error: float) -> int:
    budget, prompt_tokens, output_tokens = engine.config.max_num_batched_tokens, 200, 64
    levels = (1, 2, 4)
    limit = engine.admission.chunk_limit
    predicted = {n: simulate(engine.cost, Load(n, prompt_tokens, output_tokens), budget, 1, limit) for n in levels}
    _run_burst(engine, 1, prompt_tokens, 8)  # warm-up, not measured
    joules, tokens, errors = meter.joules(), 0, []
    print(f"{'users':>5} {'TTFT p50 ms':>24} {'tok/s per user':>24}")
    print(f"{'':>5} {'predicted':>11} {'measured':>12} {'predicted':>11} {'measured':>12}")
    for n in levels:
        ttfts, speeds = _run_burst(engine, n, prompt_tokens, output_tokens)
        tokens += n * output_tokens
        ttft, speed = statistics.median(ttfts), statistics.median(speeds)
        p = predicted[n]
        errors += [abs(p.ttft_p50_s - ttft) / ttft, abs(p.tok_s_per_user - speed) / speed]
        print(f"{n:>5} {p.ttft_p50_s * 1e3:>11.1f} {ttft * 1e3:>12.1f} {p.tok_s_per_user:>11.1f} {speed:>12.1f}")
    used = meter.joules() - joules
    summary = {
        "max_rel_error": round(max(errors), 3),
        "joules_per_token": round(used / tokens, 4),
        "energy_source": meter.source,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
    }
    print(json.dumps(summary))
    if summary["max_rel_error"] > max_rel_error:
        print(f"fulmine plan: a prediction is off by {max(errors):.0%}, past --max-rel-error {max_rel_error}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _plot(cost: StepCostModel, args: argparse.Namespace, budget: int, max_users: int, path: str, limit: Limit) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no plot written")
        return
    users = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256} & set(range(1, max_users + 1)))
    speeds = [steady(cost, args, budget, n, limit).tok_s_per_user for n in users]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(users, speeds, marker="o")
    ax.axhline(args.speed, linestyle="--", color="grey")
    ax.set(xscale="log", xlabel="concurrent users on one replica", ylabel="tok/s per user")
    fig.tight_layout()
    fig.savefig(path)
