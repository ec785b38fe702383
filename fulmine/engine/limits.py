"""What a request may ask of a model: a prompt that fits the context window, token ids inside the
vocabulary, an output constraint that compiles. Checked once, at the front door: the server (or a
front that serves replicas without holding weights, replicas/front.py, with the same words), or
LLMEngine.add_request for in-process callers; the engine thread only asserts."""

from __future__ import annotations

from typing import Any

from fulmine.config import ConfigError
from fulmine.request import SamplingParams, StructuredOutput


class RequestLimits:
    """Mixed into whatever knows the model's facts: `model_config`, `max_model_len`, `grammars`."""

    model_config: Any
    max_model_len: int
    grammars: Any

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ConfigError if the request cannot run as asked (thread-safe: reads only)."""
        self.check_prompt(prompt_ids, params)
        if params.structured is not None:
            self.check_constraint(params.structured)

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """The cheap half: the prompt fits the context window, the token ids it names are in the vocabulary."""
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:  # the prompt plus at least one generated token
            raise ConfigError(f"the prompt has {len(prompt_ids)} tokens; the context window is {self.max_model_len}")
        vocab = self.model_config.vocab_size
        for name, token_ids in (("logit_bias", list(params.logit_bias)), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise ConfigError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab})", name)

    def check_constraint(self, structured: StructuredOutput) -> None:
        """The costly half: the output constraint compiles (once per distinct constraint: cached);
        milliseconds for a complex schema, so the server runs it off its event loop."""
        self.grammars.check(structured)
