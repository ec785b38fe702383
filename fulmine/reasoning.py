"""Reasoning formats: how a model keeps its thinking apart from its answer, read from its chat
template and vocabulary (or named by `--reasoning-parser`), and the text-exact split of an answer
into reasoning and content, whole or as it streams.

Think tags (Qwen3, QwQ, the DeepSeek-R1 distills): the thinking sits between `<think>` and
`</think>`, tags that are single tokens where the vocabulary has them, text otherwise. A model may
open the tag itself (Qwen3: the first thing it writes) or the generation prompt opens it (the R1
distills, QwQ, Qwen3 asked not to think gets an empty block instead): `prompt_opens` tells, from the
prompt's last tokens. The engine reads the same format to count thinking tokens and close the
thinking at a budget (engine/output_processor.py); the server splits the text (server/events.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fulmine.config import ConfigError

PARSERS = ("auto", "none", "think")
THINK_START, THINK_END = "<think>", "</think>"
_NEWLINES = "\n"


@dataclass(frozen=True)
class ReasoningFormat:
    kind: str  # "think" or "none"
    start: str = THINK_START
    end: str = THINK_END
    end_ids: tuple[int, ...] = ()  # the end tag's tokens: what a budget forces
    switch: str | None = None  # the chat-template variable that turns thinking off (Qwen3: enable_thinking)

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


NONE = ReasoningFormat("none")


def detect(tokenizer: Any, parser: str = "auto") -> ReasoningFormat:
    """The model's reasoning format: `think` where its chat template writes think tags (or the
    vocabulary holds them as tokens and the template mentions them), else none; `parser` overrides."""
    if parser not in PARSERS:
        raise ConfigError(f"reasoning parser {parser!r}: use one of {', '.join(PARSERS)}", "reasoning_parser")
    if parser == "none":
        return NONE
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):  # several named templates: the default one
        template = str(template.get("default", "")) if isinstance(template, dict) else ""
    if parser == "auto" and THINK_START not in template and THINK_END not in template:
        return NONE
    end_ids = tuple(int(t) for t in tokenizer.encode(THINK_END, add_special_tokens=False))
    switch = "enable_thinking" if "enable_thinking" in template else None
    return ReasoningFormat("think", end_ids=end_ids, switch=switch)


def prompt_opens(fmt: ReasoningFormat, tokenizer: Any, prompt_ids: list[int]) -> bool:
    """Whether the prompt ends inside an open think block (the template opened it): the answer
    starts in reasoning."""
    if not fmt.enabled or not prompt_ids:
        return False
    tail = str(tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False)).rstrip()
    return tail.endswith(fmt.start)


class ReasoningParser:
    """Splits an answer's text into reasoning and content as it streams, text-exactly: what it
    returns over any cut of a text equals what it returns over the whole. Not opened by the prompt,
    the answer is reasoning only if it begins (after whitespace) with the start tag. The tags are
    dropped, so are the newlines just inside them and the newlines between the end tag and the
    content (as the templates write and read them). Unterminated reasoning (max_tokens) stays
    reasoning."""

    BEFORE, REASONING, CONTENT = "before", "reasoning", "content"

    def __init__(self, fmt: ReasoningFormat, opened: bool = False) -> None:
        self.fmt = fmt
        self.state = self.REASONING if opened else (self.BEFORE if fmt.enabled else self.CONTENT)
        self.pending = ""  # text held back: it may still be a tag, or whitespace a tag would drop
        self.reasoning_started = False  # any reasoning text emitted yet (leading newlines are dropped)
        self.content_started = False

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) that `text` adds; `final`: the answer ends here (release everything)."""
        self.pending += text
        reasoning, content = [], []
        while True:
            if self.state == self.CONTENT:
                out = self.pending
                if not self.content_started:
                    stripped = out.lstrip(_NEWLINES)
                    if not stripped and not final:
                        self.pending = out
                        break
                    out = stripped
                    self.content_started = bool(out)
                content.append(out)
                self.pending = ""
                break
            if self.state == self.BEFORE:
                head = self.pending.lstrip()
                if head.startswith(self.fmt.start):
                    self.pending = head[len(self.fmt.start) :]
                    self.state = self.REASONING
                    continue
                if self.fmt.start.startswith(head) and not final:
                    break  # still may become the start tag
                self.state, self.content_started = self.CONTENT, True  # an answer without reasoning: as is
                continue
            # in reasoning
            at = self.pending.find(self.fmt.end)
            if at >= 0:
                reasoning.append(self._reasoning(self.pending[:at].rstrip(_NEWLINES)))
                self.pending = self.pending[at + len(self.fmt.end) :]
                self.state = self.CONTENT
                continue
            if final:
                reasoning.append(self._reasoning(self.pending))
                self.pending = ""
                break
            keep = _partial_suffix(self.pending, self.fmt.end)
            body = self.pending[: len(self.pending) - keep]
            trailing = len(body) - len(body.rstrip(_NEWLINES))  # newlines that may sit before the end tag
            emit = body[: len(body) - trailing]
            reasoning.append(self._reasoning(emit))
            self.pending = self.pending[len(emit) :]
            break
        return "".join(reasoning), "".join(content)

    def _reasoning(self, text: str) -> str:
        if not self.reasoning_started:
            text = text.lstrip(_NEWLINES)
            self.reasoning_started = bool(text)
        return text


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (0 if none)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def split(fmt: ReasoningFormat, text: str, opened: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a whole answer: what a ReasoningParser returns over it."""
    return ReasoningParser(fmt, opened).feed(text, final=True)
