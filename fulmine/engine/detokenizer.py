"""Incremental detokenization with stop strings.

Text is released token by token such that the concatenation of everything released equals the
final text exactly: a token that ends inside a multibyte UTF-8 character releases nothing until
the character completes, and while stop strings are set, the last (longest stop - 1) characters
are held back until they can no longer begin a stop string.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded in front of the output, so tokenizers that drop a leading space at the
# start of a text (sentencepiece) decode the first output token as it reads in context.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is the decoded context
        self.read_offset = len(self.ids)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all text decoded so far (cut at a stop string once one is found)
        self.num_released = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add_token(self, token_id: int) -> bool:
        """Decode one more token; True if the text now contains a stop string (the text is cut there)."""
        self.ids.append(token_id)
        context = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(context) or full.endswith("\ufffd"):
            return False  # mid-character, or a token that decodes to nothing yet
        return self._extend(full[len(context) :])

    def flush(self) -> None:
        """At the end of generation: release whatever is pending, incomplete characters included."""
        if self.read_offset < len(self.ids):
            context = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            if len(full) > len(context):
                self._extend(full[len(context) :])

    def _extend(self, new_text: str) -> bool:
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        search_from = max(0, len(self.text) - self.holdback)
        self.text += new_text
        found = [at for at in (self.text.find(stop, search_from) for stop in self.stop) if at != -1]
        if found:
            self.text = self.text[: min(found)]
        return bool(found)

    def release(self, finished: bool) -> str:
        """Text not released before; while running, keeps back what could start a stop string."""
        end = len(self.text) if finished or not self.stop else max(self.num_released, len(self.text) - self.holdback)
        delta = self.text[self.num_released : end]
        self.num_released = end
        return delta
