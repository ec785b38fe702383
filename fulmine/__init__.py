"""fulmine: a latency-first LLM inference engine.

    from fulmine import LLM, SamplingParams
    llm = LLM()  # the embedded SmolLM2-135M-Instruct
    print(llm.generate("The capital of France is", SamplingParams(max_tokens=16))[0].text)

Names are imported on first use, so `fulmine --help` and the CLI's first message do not wait
for torch to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "fulmine.llm",
    "SamplingParams": "fulmine.request",
    "FinishReason": "fulmine.request",
    "StructuredOutput": "fulmine.request",
    "EngineConfig": "fulmine.config",
    "ConfigError": "fulmine.config",
    "RequestOutput": "fulmine.engine.outputs",
}
__all__ = ["LLM", "SamplingParams", "FinishReason", "StructuredOutput", "EngineConfig", "ConfigError", "RequestOutput"]

if TYPE_CHECKING:
    from fulmine.config import ConfigError, EngineConfig
    from fulmine.engine.outputs import RequestOutput
    from fulmine.llm import LLM
    from fulmine.request import FinishReason, SamplingParams, StructuredOutput


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fulmine' has no attribute {name!r}")
