"""SamplingParams at the edges of every type: each value is refused with a ConfigError naming it, or
accepted and then run by the engine without error (property-based, hypothesis)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fulmine import LLM, SamplingParams
from fulmine.config import ConfigError
from fulmine.request import INT64_MAX, INT64_MIN, FinishReason

_INTS = st.one_of(
    st.sampled_from([0, 1, -1, 2, 20, 21, 2**31, INT64_MAX, INT64_MIN, 2**63, -(2**63) - 1, 2**64, 10**40]),
    st.integers(-5, 50),
)
_FLOATS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.0, 1e-30, 1e-5, 1.0, 2.0, 100.0]),
    st.floats(-3, 3),
)
_BAD_TYPES = st.sampled_from([True, "1", None, 1.5, [1]])
_FIELDS: dict[str, Any] = {
    "max_tokens": st.one_of(_INTS, st.none(), _BAD_TYPES),
    "temperature": st.one_of(_FLOATS, _INTS, _BAD_TYPES),
    "top_k": st.one_of(_INTS, _BAD_TYPES),
    "top_p": st.one_of(_FLOATS, _BAD_TYPES),
    "min_p": st.one_of(_FLOATS, _BAD_TYPES),
    "repetition_penalty": st.one_of(_FLOATS, _BAD_TYPES),
    "presence_penalty": st.one_of(_FLOATS, _BAD_TYPES),
    "frequency_penalty": st.one_of(_FLOATS, _BAD_TYPES),
    "seed": st.one_of(_INTS, st.none(), _BAD_TYPES),
    "stop": st.lists(st.sampled_from(["", "a", "\x00", "🎉", "x" * 10_000])),
    "stop_token_ids": st.lists(_INTS, max_size=3),
    "logprobs": st.one_of(_INTS, st.none()),
    "prompt_logprobs": st.one_of(_INTS, st.none()),
    "min_tokens": st.one_of(_INTS, _BAD_TYPES),
    "logit_bias": st.dictionaries(_INTS, _FLOATS, max_size=3),
    "ignore_eos": st.booleans(),
}


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama), max_model_len=48, progress=False)


def test_any_sampling_params_are_refused_clearly_or_run(llm: LLM) -> None:
    accepted = []

    @settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(st.fixed_dictionaries({}, optional=_FIELDS))
    def check(fields: dict[str, Any]) -> None:
        try:
            params = SamplingParams(**fields)
            llm.engine.check_request([1, 2, 3], params)
        except ConfigError as error:
            assert error.param in fields and error.param in str(error), (fields, error)  # named, and it was set
            return
        output = llm.generate([1, 2, 3], params)[0]
        assert output.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), (fields, output.error)
        accepted.append(fields)

    check()
    assert len(accepted) >= 30  # some valid ones ran, not only refusals
    assert llm.engine.kv_cache.pool.usage == 0.0
