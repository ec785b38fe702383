"""Chat and text completions: validate, tokenize (chat: through the template, with tools), submit n
choices as a `Generation` (events.py) that every chat-shaped API starts here, then OpenAI's adapters:
its chunks from the generation's events, or its whole bodies from the answers folded from them.

Each choice is its own engine request (they share the prompt's KV blocks through the prefix
cache). A client that disconnects, or a request past its deadline, leaves the output loop, which
aborts every choice in the engine within a step and frees its blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fastapi import Request

from fulmine import __version__
from fulmine.config import EFFORTS, ConfigError, ServerConfig
from fulmine.engine.admission import Refused
from fulmine.request import StructuredOutput
from fulmine.server import bodies, tools
from fulmine.server import logprobs as lp
from fulmine.server import protocol as p

if TYPE_CHECKING:
    from fulmine.server.engine_client import EngineClient
from fulmine.reasoning import prompt_opens
from fulmine.server.events import Answer, Generation
from fulmine.server.metrics import Metrics
from fulmine.server.run import Choice, Run
from fulmine.server.tool_calls import CallDelta
from fulmine.tokenizer import encode_prompt

logger = logging.getLogger("fulmine.server")


def _call_chunk(delta: CallDelta) -> dict[str, Any]:
    """A streamed call in OpenAI's chunk shape: its first chunk has id, type and name."""
    if delta.started:
        function = {"name": delta.call.name, "arguments": delta.arguments}
        return {"index": delta.index, "id": delta.call.id, "type": "function", "function": function}
    return {"index": delta.index, "function": {"arguments": delta.arguments}}


@dataclass
class ChatPrompt:
    """A chat request templated: its token ids, the messages and tools as rendered, and its thinking
    (whether the prompt opened it, its budget)."""

    ids: list[int]
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    opened: bool
    budget: int | None


class Completions:
    def __init__(self, engine: EngineClient, metrics: Metrics, config: ServerConfig, model_names: list[str]) -> None:
        self.engine, self.metrics, self.config, self.model_names = engine, metrics, config, model_names
        # The HTTP side encodes on one thread of its own (off the event loop; one long prompt at a
        # time), with the engine's tokenizer: nothing changes it after loading, so threads share it.
        # Decoding a few tokens stays on the loop.
        self.tokenizer = engine.engine.tokenizer
        # tokenizing, templating, compiling constraints: work that takes milliseconds, off the event loop
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fulmine-tokenizer")
        self.vocab_size = engine.engine.model_config.vocab_size
        self.max_model_len = engine.engine.max_model_len
        self.token_text = lru_cache(maxsize=65536)(self._token_text)
        # No token holds more UTF-8 bytes than the vocabulary's longest, so a text longer than this many
        # characters cannot fit the context: refused before it ties up the tokenizer thread that every
        # request shares (tokenizing megabytes takes seconds).
        longest = max((len(token.encode("utf-8", "replace")) for token in self.tokenizer.get_vocab()), default=64)
        self.max_prompt_chars = self.max_model_len * max(longest, 1)
        self.fingerprint = f"fulmine-{__version__}"
        self.tool_format = tools.detect_format(self.tokenizer.chat_template)
        self.tool_tokens = frozenset(tools.special_markers(self.tokenizer))
        thinking = engine.engine.reasoning
        # what closes a think block a template opened, for a request that asked not to think
        closing = f"\n{thinking.end}\n\n" if thinking.enabled else ""
        self._close_thinking = list(self.tokenizer.encode(closing, add_special_tokens=False)) if closing else []

    def _token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    # -- shared checks --------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model not in self.model_names:
            raise p.RequestError(
                f"The model {model!r} does not exist; this server serves {', '.join(map(repr, self.model_names))}",
                "model",
                "model_not_found",
                status=404,
            )

    async def encode(
        self,
        prompt: Any,
        param: str,
        tool_list: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """A prompt's token ids, tokenized off the event loop; 400 if it cannot fit the context."""
        if isinstance(prompt, str):
            too_long = len(prompt) > self.max_prompt_chars
        elif prompt and isinstance(prompt[0], dict):
            too_long = sum(len(message["content"]) for message in prompt) > self.max_prompt_chars
        else:  # token ids
            too_long = len(prompt) > self.max_model_len
        if too_long:
            raise p.RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; the {param} is longer than "
                "that could hold. Please reduce it.",
                param,
                "context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        try:  # tokenizing long prompts takes milliseconds: keep it off the event loop
            return await loop.run_in_executor(
                self.tokenizer_thread,
                encode_prompt,
                self.tokenizer,
                prompt,
                self.vocab_size,
                tool_list,
                template_kwargs,
            )
        except ConfigError as error:
            raise p.RequestError(str(error), param) from None

    async def _check_structured(
        self, body: p._Sampling, forced: StructuredOutput | None = None, param: str = "tool_choice"
    ) -> None:
        """Compile the request's output constraint off the event loop (the first one builds the
        grammar tokenizer, about a second; a complex schema takes milliseconds): 400 if unusable."""
        structured = forced or body.structured()
        if structured is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.tokenizer_thread, self.engine.engine.check_constraint, structured)
        except ConfigError as error:
            self.metrics.rejected.labels("bad_constraint").inc()
            raise p.RequestError(str(error), param if forced else error.param or "response_format") from None

    def _make_choices(
        self,
        body: p._Sampling,
        prompts: list[list[int]],
        max_tokens: int | None,
        num_logprobs: int | None,
        forced: StructuredOutput | None = None,
        reasoning_budget: int | None = None,
    ) -> list[Choice]:
        if body.n > self.config.max_n:
            raise p.RequestError(f"n must be <= {self.config.max_n}", "n")
        choices = []
        for prompt_index, prompt_ids in enumerate(prompts):
            if max_tokens is not None and len(prompt_ids) + max_tokens > self.max_model_len:
                raise p.RequestError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                    f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} in the "
                    "completion). Please reduce the prompt or max_tokens.",
                    "max_tokens",
                    "context_length_exceeded",
                )
            for i in range(body.n):
                try:
                    params = body.sampling_params(max_tokens, num_logprobs, seed_offset=i)
                    if forced is not None:  # a call the tool_choice requires, by grammar
                        params.structured = forced
                    params.reasoning_budget = reasoning_budget
                    self.engine.engine.check_prompt(prompt_ids, params)  # (its constraint: _check_structured)
                except ConfigError as error:
                    raise p.RequestError(
                        str(error),
                        error.param or ("messages" if isinstance(body, p.ChatCompletionRequest) else "prompt"),
                        "context_length_exceeded" if "context window" in str(error) else None,
                    ) from None
                choices.append(Choice(prompt_index * body.n + i, prompt_ids, params))
        waiting = self.engine.num_waiting
        if waiting + len(choices) > self.config.max_queue + max(
            0, self.engine.engine.config.max_num_seqs - self.engine.num_running
        ):
            self.metrics.rejected.labels("queue_full").inc()
            raise p.RequestError(
                f"the server is at capacity ({waiting} requests waiting); retry shortly",
                code="rate_limit_exceeded",
                status=429,
                error_type="rate_limit_error",
            )
        return choices

    # -- the two endpoints ----------------------------------------------------------------------
    async def chat_prompt(self, body: p.ChatCompletionRequest) -> ChatPrompt:
        """A chat request checked and templated: its prompt as the model reads it (what counting its
        tokens counts, too)."""
        p.check_unicode(body.model_dump(exclude_none=True))
        self.check_model(body.model)
        body.check_supported()
        tool_list, fmt = tools.checked_tools(body), self.tool_format
        turns = [m.as_dict(i) for i, m in enumerate(body.messages)]
        tools.check_call_ids(turns)
        for i, tool in enumerate(tool_list):  # a schema the grammar compiler refuses is a 400, whatever tool_choice
            parameters = tool["function"].get("parameters")
            if parameters:
                await self._check_structured(
                    body, StructuredOutput("json_schema", json.dumps(parameters)), f"tools[{i}].function.parameters"
                )
        messages = tools.render_messages(turns, tool_list, fmt)
        thinking = self.engine.engine.reasoning
        effort = body.reasoning_effort or self.config.reasoning_effort or None
        template_kwargs = dict(body.chat_template_kwargs or {})
        if effort == "none" and thinking.switch:  # the model's own switch, where its template has one
            template_kwargs.setdefault(thinking.switch, False)
        prompt_ids = await self.encode(messages, "messages", tool_list if fmt != "generic" else None, template_kwargs)
        budget = self._reasoning_budget(effort, body.reasoning_budget) if thinking.enabled else None
        opened = prompt_opens(thinking, self.tokenizer, prompt_ids)
        if opened and budget == 0:  # no thinking wanted: the prompt closes the block its template opened
            prompt_ids = prompt_ids + self._close_thinking
            opened = False
        return ChatPrompt(prompt_ids, messages, tool_list, opened, budget)

    async def start_chat(
        self, body: p.ChatCompletionRequest, request: Request, id_prefix: str = "chatcmpl"
    ) -> Generation:
        """A chat request checked, templated and started: what every chat-shaped API (OpenAI chat
        completions, Anthropic messages) turns into its own responses."""
        arrival = time.monotonic()
        prompt = await self.chat_prompt(body)
        tool_list, fmt = prompt.tools, self.tool_format
        max_tokens = body.max_completion_tokens or body.max_tokens
        parallel = body.parallel_tool_calls is not False
        choice = body.tool_choice_value()
        forced = tools.constraint(tool_list, choice, parallel, fmt, self.tool_tokens) if tool_list else None
        if forced is not None and body.structured() is not None:
            raise p.RequestError("a required tool call and a response_format cannot both constrain", "tool_choice")
        await self._check_structured(body, forced)
        choices = self._make_choices(body, [prompt.ids], max_tokens, body.num_logprobs, forced, prompt.budget)
        run = await self._run(body.model, id_prefix, choices, arrival, request)
        self._log_prompt(run.id, prompt.messages)
        names = {tools.function_name(t) for t in tool_list}
        return Generation(run, fmt, names, parallel, self.engine.engine.reasoning, prompt.opened)

    def _reasoning_budget(self, effort: str | None, asked: int | None = None) -> int | None:
        """Thinking tokens a request may spend: the smallest of its own budget, its effort's and the
        server's cap."""
        budget = EFFORTS[effort] if effort else None
        if asked is not None:
            budget = asked if budget is None else min(budget, asked)
        cap = self.config.reasoning_budget
        return cap if budget is None else budget if cap is None else min(budget, cap)

    async def chat(self, body: p.ChatCompletionRequest, request: Request) -> Any:
        generation = await self.start_chat(body, request)
        run = generation.run
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return run.stream_response(self._chat_chunks(generation, include_usage))
        choices = [self._chat_choice(answer, bool(body.logprobs)) for answer in await generation.answers()]
        return run.json_response(
            self._envelope(run, "chat.completion", choices, usage=run.usage(), timing=run.timing())
        )

    def _chat_choice(self, answer: Answer, logprobs: bool) -> dict[str, Any]:
        content, calls = answer.content, answer.calls
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
        if self.engine.engine.reasoning.enabled:  # (vLLM's two names for it: reasoning_content, then reasoning)
            message["reasoning_content"] = message["reasoning"] = answer.reasoning or None
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        message["refusal"] = None
        entries = lp.chat_logprobs(self.token_text, answer.choice, 0) if logprobs else None
        return {
            "index": answer.choice.index,
            "message": message,
            "logprobs": {"content": entries, "refusal": None} if logprobs else None,
            "finish_reason": answer.finish,
        }

    async def completions(self, body: p.CompletionRequest, request: Request) -> Any:
        arrival = time.monotonic()
        p.check_unicode(body.model_dump(exclude_none=True))
        self.check_model(body.model)
        body.check_supported()
        prompts = [await self.encode(prompt, "prompt") for prompt in body.prompts()]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default here
        await self._check_structured(body)
        choices = self._make_choices(body, prompts, max_tokens, body.logprobs)
        run = await self._run(body.model, "cmpl", choices, arrival, request)
        self._log_prompt(run.id, body.prompt)
        generation = Generation(run)  # no tools: all text is content
        echo = {c.index: self.tokenizer.decode(c.prompt_ids) for c in choices} if body.echo else {}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return run.stream_response(self._text_chunks(generation, include_usage, echo, body.logprobs is not None))
        text_choices = [
            {
                "index": a.choice.index,
                "text": echo.get(a.choice.index, "") + a.content,
                "logprobs": lp.echo_and_text_logprobs(self.token_text, a.choice, echo.get(a.choice.index))
                if body.logprobs is not None
                else None,
                "finish_reason": a.finish,
            }
            for a in await generation.answers()
        ]
        return run.json_response(
            self._envelope(run, "text_completion", text_choices, usage=run.usage(), timing=run.timing())
        )

    async def _run(self, model: str, id_prefix: str, choices: list[Choice], arrival: float, request: Request) -> Run:
        timeout_s = self.config.request_timeout_s
        run = Run(self.engine, self.metrics, timeout_s, model, bodies.new_id(id_prefix), choices, arrival, request)
        self._admit(run)
        try:
            await run.admitted()
        except p.RequestError as error:
            if error.code == "slo_unattainable":
                self.metrics.rejected.labels("slo").inc()
            raise
        return run

    def _admit(self, run: Run) -> None:
        """Every choice admitted by its latency targets (engine/admission.py), here on the server's
        thread so that a refusal does not wait for a step; or the whole request refused with 429."""
        engine, admitted = self.engine.engine, []
        try:
            for c in run.choices:
                engine.admit(c.request_id, c.prompt_ids, c.params, run.arrival)
                admitted.append(c.request_id)
        except Refused as refused:
            for request_id in admitted:
                engine.admission.forget(request_id)
            self.metrics.rejected.labels("slo").inc()
            raise p.RequestError(
                str(refused), "slo", "slo_unattainable", 429, "rate_limit_error", refused.retry_after_s
            ) from None

    def _envelope(
        self, run: Run, kind: str, choices: list[dict[str, Any]], stream_usage: bool = False, **extra: Any
    ) -> dict[str, Any]:
        """The fields every response and chunk shares; streamed chunks carry `usage: null` until the
        last one when the client asked for usage."""
        out = {
            "id": run.id,
            "object": kind,
            "created": run.created,
            "model": run.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            **extra,
        }
        if stream_usage:
            out.setdefault("usage", None)
        return out

    def _log_prompt(self, run_id: str, prompt: Any) -> None:
        """Prompts stay out of the logs unless the operator asked for them (--log-prompts)."""
        if self.config.log_prompts:
            logger.info("%s prompt: %s", run_id, json.dumps(prompt, ensure_ascii=False)[:4000])

    # -- streams --------------------------------------------------------------------------------
    async def _chat_chunks(self, generation: Generation, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        """The chat stream from the generation's events: content deltas, then each tool call's index,
        id and name, then fragments of its arguments; a last chunk per choice with its finish reason."""
        run = generation.run

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return self._envelope(run, "chat.completion.chunk", choices, stream_usage=include_usage, **extra)

        for c in run.choices:
            yield chunk(
                [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        async for event in generation.events():
            c, output = event.choice, event.output
            logprobs = None
            if c.params.logprobs is not None:
                logprobs = {"content": lp.chat_logprobs(self.token_text, c, c.logprobs_sent), "refusal": None}
                c.logprobs_sent = len(output.token_ids)
            if event.reasoning:
                yield chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"reasoning_content": event.reasoning, "reasoning": event.reasoning},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            if event.content or logprobs:
                yield chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"content": event.content},
                            "logprobs": logprobs,
                            "finish_reason": None,
                        }
                    ]
                )
            deltas = [_call_chunk(d) for d in event.calls if d.started or d.arguments]
            if deltas:
                yield chunk(
                    [{"index": c.index, "delta": {"tool_calls": deltas}, "logprobs": None, "finish_reason": None}]
                )
            if event.finish is not None:
                yield chunk(
                    [{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": event.finish}],
                    timing=bodies.timing(output),
                )
        if include_usage:
            yield chunk([], usage=run.usage(), timing=run.timing())

    async def _text_chunks(
        self, generation: Generation, include_usage: bool, echo: dict[int, str], logprobs: bool
    ) -> AsyncIterator[dict[str, Any]]:
        run = generation.run

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return self._envelope(run, "text_completion", choices, stream_usage=include_usage, **extra)

        if not logprobs:  # echoed prompts go first; with logprobs, once the prefill has scored them
            for index, text in echo.items():
                yield chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])
        async for event in generation.events():
            c, output, reason = event.choice, event.output, event.finish
            entry = None
            if logprobs:
                if c.index in echo and c.logprobs_sent == 0:
                    echo_entry = lp.echo_logprobs(self.token_text, c)
                    yield chunk(
                        [{"index": c.index, "text": echo[c.index], "logprobs": echo_entry, "finish_reason": None}]
                    )
                offset = len(echo.get(c.index, "")) + len("".join(c.text_parts[:-1]))
                entry = lp.text_logprobs(self.token_text, c, c.logprobs_sent, offset)
                c.logprobs_sent = len(output.token_ids)
            if event.content or entry or reason:
                yield chunk(
                    [{"index": c.index, "text": event.content, "logprobs": entry, "finish_reason": reason}],
                    **({"timing": bodies.timing(output)} if reason else {}),
                )
        if include_usage:
            yield chunk([], usage=run.usage(), timing=run.timing())
