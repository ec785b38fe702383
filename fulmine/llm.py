"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))` and streaming forms."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any

from fulmine.config import EngineConfig
from fulmine.engine.llm_engine import LLMEngine
from fulmine.engine.outputs import RequestOutput, fold
from fulmine.request import FinishReason, SamplingParams
from fulmine.tokenizer import Message

Prompt = str | list[int] | list[Message]


class LLM:
    """An engine driven in-process. `LLM()` loads the embedded default model.

    Keyword arguments are EngineConfig fields, e.g. `LLM(path, max_num_seqs=8)`.
    """

    def __init__(self, model: str | None = None, *, progress: bool = True, **engine_args: Any) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(engine_args) - known
        if unknown:
            raise TypeError(f"unknown engine arguments {sorted(unknown)}; known: {sorted(known)}")
        self.engine = LLMEngine(model, EngineConfig(**engine_args), progress=progress)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self, prompts: str | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run a batch to completion; outputs in the order of `prompts`.

        A single string, or a single list of token ids, counts as one prompt.
        """
        if isinstance(prompts, str) or (prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)
        param_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompt_list)
        if len(param_list) != len(prompt_list):
            raise ValueError(f"{len(prompt_list)} prompts but {len(param_list)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompt_list, param_list):
                ids.append(self.engine.add_request(prompt, p))
            finals: dict[str, RequestOutput] = {}
            answers: dict[str, RequestOutput] = {}
            while len(finals) < len(ids):
                for delta in self.engine.step():
                    output = fold(answers, delta)
                    if output.finished:
                        finals[output.request_id] = output
        except BaseException:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        return [finals[i] for i in ids]

    def chat(self, messages: list[Message], params: SamplingParams | None = None) -> RequestOutput:
        """One chat turn with the model's chat template."""
        return self.generate([messages], params)[0]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """One request, yielding an output per step that released text or finished it.

        `output.new_text` is the text delta, `output.text` the whole so far (one output object, updated
        in place each step: copy what you keep). Closing the iterator early aborts the request. If the
        engine ends the request with an error (FinishReason.ERROR), RuntimeError says why.
        """
        request_id = self.engine.add_request(prompt, params)
        answers: dict[str, RequestOutput] = {}
        finished = False
        try:
            while not finished:
                for delta in self.engine.step():
                    if delta.request_id == request_id:
                        output = fold(answers, delta)
                        finished = output.finished
                        if output.finish_reason is FinishReason.ERROR:
                            raise RuntimeError(f"the engine could not run this request: {output.error}")
                        if output.new_text or finished:
                            yield output
        finally:
            if not finished:
                self.engine.abort(request_id)

    def stream_text(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one request."""
        for output in self.stream(prompt, params):
            if output.new_text:
                yield output.new_text
