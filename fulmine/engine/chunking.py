"""How many prompt tokens a step may prefill beside running streams, so that their gap between tokens
stays under a target (`EngineConfig.max_itl_ms`).

A stream that is decoding waits one whole step for its next token, and a step that also prefills a
chunk of someone's long prompt lasts as long as that chunk takes. The chunk is sized by feedback on
measured steps: after a step that decoded and prefilled, the budget moves toward the prefill tokens
that would have filled the target at that step's speed (step time is close to linear in the tokens
of a chunk, and what a prompt token costs grows with the context it attends to, which feedback
follows without a model). Steps with no stream decoding prefill up to the engine's full token budget.
"""

from __future__ import annotations

MIN_CHUNK = 16  # a prompt beside streams always advances, even when one decode step exceeds the target
SMOOTHING = 0.5  # weight of the newest measurement
# steps are aimed at this fraction of the target: their times scatter around the fit, and a client's
# gap adds the stream's own overhead to the step (measured, 4 long prompts beside a stream: at 1.0
# the gaps' p90 was 106 ms for a 100 ms target, at 0.9 it is 94-96 ms for 5 % more prompt TTFT)
SETPOINT = 0.9


class PrefillBudget:
    def __init__(self, max_itl_ms: float, max_tokens: int) -> None:
        self.target_s = max_itl_ms / 1e3 * SETPOINT
        self.max_tokens = max_tokens
        self.tokens = float(min(max_tokens, 64))  # until the first mixed step is measured

    @property
    def enabled(self) -> bool:
        return self.target_s > 0

    def limit(self) -> int:
        """Prompt tokens the next step may prefill while streams are decoding."""
        if not self.enabled:
            return self.max_tokens
        return max(MIN_CHUNK, min(self.max_tokens, int(self.tokens)))

    def observe(self, prefill_tokens: int, seconds: float) -> None:
        """A step that decoded streams and prefilled `prefill_tokens` took `seconds`."""
        if not self.enabled or prefill_tokens <= 0 or seconds <= 0:
            return
        fits = prefill_tokens * self.target_s / seconds
        self.tokens = (1 - SMOOTHING) * self.tokens + SMOOTHING * min(fits, float(self.max_tokens))
