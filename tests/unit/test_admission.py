"""The step cost model (executors/cost_model.py) and admission by latency targets (engine/admission.py)."""

from __future__ import annotations

import math

import pytest

from fulmine.engine.admission import MIN_CHUNK, SETPOINT, Admission, Refused, Streams
from fulmine.executors.cost_model import StepCostModel, StepShape
from fulmine.request import SLO


def true_seconds(shape: StepShape) -> float:
    """A machine: 10 ms a step, 1 ms a token (2 ms for each of the first 16), 0.2 ms per 1024 attended."""
    return 0.010 + 0.001 * shape.tokens + 0.001 * min(shape.tokens, 16) + 0.0002 * shape.attended / 1024


def fitted(steps: int = 60) -> StepCostModel:
    model = StepCostModel()
    shapes = [StepShape.decode(r, c) for r in (1, 2, 4, 8) for c in (10, 500, 2000)]
    shapes += [StepShape.decode(2, 300).plus_prompt(n, s) for n in (16, 64, 256) for s in (0, 1000)]
    for i in range(steps):
        shape = shapes[i % len(shapes)]
        model.observe(shape, true_seconds(shape))
    return model


def test_the_fit_recovers_a_machine_from_its_steps() -> None:
    model = fitted()
    for shape in (StepShape.decode(1, 100), StepShape.decode(6, 4000), StepShape(0, 0).plus_prompt(512, 2048)):
        assert model.seconds(shape) == pytest.approx(true_seconds(shape), rel=0.02)


def test_an_unvaried_history_keeps_the_prior_where_it_says_nothing() -> None:
    model = StepCostModel()
    for _ in range(50):  # always one row at one context: only the total is known
        model.observe(StepShape.decode(1, 100), 0.02)
    assert model.seconds(StepShape.decode(1, 100)) == pytest.approx(0.02, rel=0.01)
    assert all(math.isfinite(c) for c in model.coef)


def test_prompt_tokens_within_a_budget() -> None:
    model = fitted()
    base = StepShape.decode(4, 1000)
    n = model.prompt_tokens_within(0.100, base, 0, 4096)
    assert model.seconds(base.plus_prompt(n, 0)) <= 0.100 < model.seconds(base.plus_prompt(n + 1, 0))
    assert model.prompt_tokens_within(0.001, base, 0, 4096) == 0  # the streams alone exceed it


def admission(**kwargs) -> Admission:
    return Admission(fitted(), kwargs.pop("budget", 256), kwargs.pop("max_itl_ms", 0), kwargs.pop("default", None))


def test_chunks_beside_streams_keep_the_inter_token_target() -> None:
    gate = admission(max_itl_ms=100)
    streams = Streams(rows=2, context=500)
    chunk = gate.chunk_limit(streams, 0)
    decode = StepShape.decode(2, 500)
    assert true_seconds(decode.plus_prompt(chunk, 0)) <= 0.100 * SETPOINT * 1.02
    assert true_seconds(decode.plus_prompt(chunk + 8, 0)) > 0.100 * SETPOINT
    assert gate.chunk_limit(Streams(0, 0), 0) == 256  # no stream waits: the whole budget
    assert gate.chunk_limit(Streams(64, 8000), 0) == MIN_CHUNK  # streams alone exceed it: still advances
    assert admission().chunk_limit(streams, 0) == 256  # no target


def test_a_request_that_would_start_late_is_refused_at_once_with_the_predicted_time() -> None:
    gate = admission()
    gate.admit("long", 4000, SLO(ttft_ms=60_000), 0.0, Streams(0, 0))
    predicted = gate.time_to_first_token([4000], 100, Streams(0, 0))
    with pytest.raises(Refused) as refused:
        gate.admit("late", 100, SLO(ttft_ms=predicted * 1e3 * 0.5), 100.0, Streams(0, 0))  # due after "long"
    assert refused.value.predicted_ms == pytest.approx(predicted * 1e3)
    assert refused.value.retry_after_s >= 1 and "exceeds the requested" in str(refused.value)
    gate.admit("patient", 100, SLO(ttft_ms=predicted * 1e3 * 1.5), 100.0, Streams(0, 0))  # it fits
    # an earlier deadline is served first (EDF): prompts queued behind it do not count against it
    gate.admit("urgent", 100, SLO(ttft_ms=200), 0.0, Streams(0, 0))
    assert gate.num_refused == 1


def test_an_inter_token_target_below_one_decode_step_is_refused() -> None:
    gate = admission()
    with pytest.raises(Refused, match="inter-token"):
        gate.admit("r", 10, SLO(itl_ms=5), 0.0, Streams(rows=8, context=1000))
    gate.admit("ok", 10, SLO(itl_ms=200), 0.0, Streams(rows=8, context=1000))


def test_server_defaults_fill_what_a_request_leaves_unset() -> None:
    gate = admission(default=SLO(ttft_ms=500, itl_ms=80))
    assert gate.targets(None) == SLO(500, 80)
    assert gate.targets(SLO(ttft_ms=100)) == SLO(100, 80)
    assert admission().targets(None) is None


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "100"])
def test_bad_targets_are_refused(bad) -> None:
    from fulmine.config import ConfigError

    with pytest.raises(ConfigError):
        SLO(ttft_ms=bad)


def test_a_long_queue_is_predicted_at_once() -> None:
    """Admission runs on the server's thread: a thousand queued 32k-token prompts beside busy streams
    (chunks at their floor) must not stall it."""
    import time

    gate = admission(max_itl_ms=10)
    started = time.perf_counter()
    seconds = gate.time_to_first_token([32_000] * 1000, 32_000, Streams(rows=64, context=8000))
    assert time.perf_counter() - started < 0.1 and seconds > 0


def test_the_prediction_sums_the_steps_the_engine_will_run() -> None:
    """Equal chunks at increasing depth, summed in one product: the step-by-step sum, within 5 %."""
    gate = admission(budget=256)
    streams = Streams(rows=2, context=300)
    decode, total, done = StepShape.decode(2, 300), true_seconds(StepShape.decode(2, 300)), 0
    while done < 1000:  # no inter-token target: chunks of the whole budget
        chunk = min(256, 1000 - done)
        total += true_seconds(decode.plus_prompt(chunk, done))
        done += chunk
    assert gate.time_to_first_token([], 1000, streams) == pytest.approx(total, rel=0.05)
