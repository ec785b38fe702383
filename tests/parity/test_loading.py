"""Loading: how long it takes to be ready, and where the time goes."""

from __future__ import annotations

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
