"""fulmine: a latency-first LLM inference engine.

    from fulmine import LLM, SamplingParams
    llm = LLM()  # the embedded SmolLM2-135M-Instruct
    print(llm.generate("The capital of France is", SamplingParams(max_tokens=16))[0].text)
"""

from fulmine.config import ConfigError, EngineConfig
from fulmine.engine.outputs import RequestOutput
from fulmine.llm import LLM
from fulmine.request import FinishReason, SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "FinishReason", "ConfigError"]
__version__ = "0.1.0"
