"""A started generation as API-neutral events, and the whole answers folded from the same events.

Every API surface (chat and text completions, Anthropic messages, the Responses API) starts a
`Generation` and adapts it: a stream translates each `Event` into its own chunks, a whole response
folds the same events into `Answer`s (`Generation.answers`). So a streamed answer and a whole one
are the same by construction: the reasoning (a thinking model's, taken out of the text first), the
content with tool-call text taken out, the calls, the finish reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fulmine.engine.outputs import RequestOutput
from fulmine.reasoning import NONE, ReasoningFormat, ReasoningParser
from fulmine.server import bodies
from fulmine.server.run import Choice, Run
from fulmine.server.tool_calls import CallDelta, StreamParser, ToolCall


@dataclass
class Event:
    """What one engine output adds to one choice."""

    choice: Choice
    output: RequestOutput  # token ids, logprobs, counts and timing so far
    content: str  # the new content (text that is, or may become, a tool call is held back)
    calls: list[CallDelta]  # tool-call deltas: a call's start, argument fragments, its end
    finish: str | None  # stop / length / tool_calls once the choice has ended, else None
    reasoning: str = ""  # the new thinking (a reasoning model's)


@dataclass
class Answer:
    """One choice's whole answer: its events folded."""

    choice: Choice
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    finish: str = "stop"
    reasoning: str = ""
    reasoning_tokens: int = 0

    def add(self, event: Event) -> None:
        self.reasoning += event.reasoning
        self.reasoning_tokens = event.output.num_reasoning_tokens
        self.content += event.content
        self.calls += [d.call for d in event.calls if d.started]
        self.finish = event.finish or self.finish


def finish_reason(output: RequestOutput | None, called: bool) -> str:
    """stop / length, and tool_calls for an answer that ended by calling tools."""
    reason = (bodies.finish_reason(output) if output is not None else None) or "stop"
    return "tool_calls" if called and reason == "stop" else reason


@dataclass
class Generation:
    """A started request (its run of n choices) and how its answers split into content and tool
    calls: the tool-call format and the callable names (none: all text is content)."""

    run: Run
    tool_format: str = "generic"
    tool_names: set[str] = field(default_factory=set)
    parallel: bool = True
    reasoning: ReasoningFormat = NONE  # the model's reasoning format
    opened: bool = False  # the prompt opened the thinking: the answer starts inside it

    async def events(self) -> AsyncIterator[Event]:
        """Each choice's events as its outputs arrive; the last one of a choice has its finish."""
        parsers = {c.index: self._parser() for c in self.run.choices} if self.tool_names else {}
        thinking = {c.index: ReasoningParser(self.reasoning, self.opened) for c in self.run.choices}
        async for c, output in self.run.outputs():
            ended = bodies.finish_reason(output) is not None
            reasoning, text = (
                thinking[c.index].feed(output.new_text, final=ended)
                if self.reasoning.enabled
                else ("", output.new_text)
            )
            parser = parsers.get(c.index)
            content, calls = parser.feed(text, final=ended) if parser else (text, [])
            finish = finish_reason(output, bool(parser and parser.calls)) if ended else None
            yield Event(c, output, content, calls, finish, reasoning)

    async def answers(self) -> list[Answer]:
        """Every choice's whole answer (in choice order), folded from the same events as a stream;
        a client that disconnects meanwhile aborts the run."""
        answers = {c.index: Answer(c) for c in self.run.choices}

        async def fold() -> None:
            async for event in self.events():
                answers[event.choice.index].add(event)

        await self.run.collect(fold)
        return list(answers.values())

    def _parser(self) -> StreamParser:
        return StreamParser(self.tool_format, self.tool_names, self.parallel)
