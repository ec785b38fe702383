"""Loading: how long it takes to be ready, and where the time goes."""

from __future__ import annotations

import json
import logging

from fulmine.engine.llm_engine import LLMEngine


def test_loading_reports_its_phases_in_one_line(tiny_llama, caplog) -> None:
    """Where time to ready goes, in one log line (issue: ready in a second)."""
    with caplog.at_level(logging.INFO, logger="fulmine.engine"):
        engine = LLMEngine(str(tiny_llama), progress=False)
    [line] = [r.getMessage() for r in caplog.records if "ready in" in r.getMessage()]
    for phase in ("reading the file", "weights", "tokenizer", "runner and caches", "calibration"):
        assert f"{phase} " in line, line
    assert engine.load_seconds > 0


def test_calibration_is_cached_per_machine_file_and_configuration(tiny_llama, caplog, tmp_path, monkeypatch) -> None:
    """A second start restores the step cost model's fit instead of measuring it again; another
    configuration (what a step costs differs) measures its own."""
    from fulmine.config import EngineConfig

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = LLMEngine(str(tiny_llama), progress=False)
    with caplog.at_level(logging.INFO, logger="fulmine.engine"):
        second = LLMEngine(str(tiny_llama), progress=False)
        other = LLMEngine(str(tiny_llama), EngineConfig(exact_kernels=True), progress=False)
    lines = [r.getMessage() for r in caplog.records if "ready in" in r.getMessage()]
    assert "calibration (cached)" in lines[0] and "calibration (cached)" not in lines[1]
    assert second.cost.coef == first.cost.coef and second.cost.fitted
    assert other.cost.fitted and len(list((tmp_path / "fulmine" / "calibration").glob("*.json"))) == 2
    for path in (tmp_path / "fulmine" / "calibration").glob("*.json"):
        path.write_text("{not json")  # a damaged cache is measured again, not an error
    assert LLMEngine(str(tiny_llama), progress=False).cost.fitted


def test_the_prefetch_distance_is_measured_then_restored(tiny_llama, tmp_path, monkeypatch) -> None:
    """The kernels' prefetch distance is chosen by measuring this machine on first start, cached with
    the fit and set again by a later start; outputs do not depend on it."""
    from fulmine import SamplingParams, kernels
    from fulmine.engine.llm_engine import LLMEngine

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = LLMEngine(str(tiny_llama), progress=False)
    assert first.prefetch in kernels.PREFETCH_CHOICES
    assert first.describe()["prefetch"] == first.prefetch
    [cached] = (tmp_path / "fulmine" / "calibration").glob("*.json")
    state = json.loads(cached.read_text())
    assert state["prefetch"] == first.prefetch
    other = next(d for d in kernels.PREFETCH_CHOICES if d != first.prefetch)
    cached.write_text(json.dumps({**state, "prefetch": other}))
    second = LLMEngine(str(tiny_llama), progress=False)
    assert second.prefetch == other
    outputs = []
    for ahead in kernels.PREFETCH_CHOICES:
        kernels.set_prefetch(ahead)
        request, tokens = second.add_request([5, 6, 7, 8], SamplingParams(max_tokens=8, temperature=0.0)), []
        while second.has_unfinished():
            tokens += [t for o in second.step() if o.request_id == request for t in o.new_token_ids]
        outputs.append(tokens)
    kernels.set_prefetch(kernels.DEFAULT_PREFETCH)
    assert all(o == outputs[0] for o in outputs)
    cached.write_text(json.dumps({**state, "prefetch": 99}))  # not a distance: measured again
    assert LLMEngine(str(tiny_llama), progress=False).prefetch in kernels.PREFETCH_CHOICES
