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
