"""Reasoning models through the API, read by the unmodified openai client: the thinking apart from
the answer (whole and streamed alike), counted in usage, bounded by the server's budget, turned off
by reasoning_effort; tiny random Qwen3 models with real reasoning templates (tests/conftest.py)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.e2e.server import RunningServer, engine_loader, serve

MODEL = "thinker"
ASK = [{"role": "user", "content": "Count the primes below 20."}]
BUDGET = 5


@pytest.fixture(scope="module")
def opened(tiny_thinker_factory) -> RunningServer:
    """The R1 distills' later template opens <think> in the prompt; the server caps thinking at BUDGET."""
    loader = engine_loader(str(tiny_thinker_factory("r1_opened")), speculative="off")
    with serve(loader, served_model_name=(MODEL,), reasoning_budget=BUDGET) as running:
        yield running


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


def test_thinking_and_answer_apart_whole_and_streamed(opened: RunningServer) -> None:
    args = dict(model=MODEL, messages=ASK, max_tokens=24, temperature=0.0, extra_body={"ignore_eos": True})
    whole = client(opened).chat.completions.create(**args)  # type: ignore[call-overload]
    message = whole.choices[0].message
    thinking = message.model_extra["reasoning_content"]
    assert thinking and message.model_extra["reasoning"] == thinking and message.content
    assert "<think>" not in message.content and "</think>" not in thinking + message.content
    details = whole.usage.completion_tokens_details
    assert details is not None and details.reasoning_tokens == BUDGET + 1  # the budget, then the end tag
    streamed_thinking, streamed_content, usage = "", "", None
    stream = client(opened).chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            streamed_thinking += extra.get("reasoning_content") or ""
            streamed_content += choice.delta.content or ""
    assert (streamed_thinking, streamed_content) == (thinking, message.content)
    assert usage is not None and usage.completion_tokens_details.reasoning_tokens == BUDGET + 1


def test_effort_none_means_no_thinking(opened: RunningServer) -> None:
    """The template opened the block; effort none closes it in the prompt: no thinking token at all."""
    response = client(opened).chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=8, temperature=0.0, reasoning_effort="none"
    )  # type: ignore[call-overload]
    message = response.choices[0].message
    assert message.model_extra["reasoning_content"] is None and message.content
    assert response.usage.completion_tokens_details.reasoning_tokens == 0


def test_earlier_thinking_in_the_history_is_accepted(opened: RunningServer) -> None:
    history = [
        *ASK,
        {"role": "assistant", "content": "2, 3, 5, 7, 11, 13, 17, 19", "reasoning_content": "I listed them."},
        {"role": "user", "content": "And below 30?"},
    ]
    response = httpx.post(
        f"{opened.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": history, "max_tokens": 4},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    bad = [*history[:1], {"role": "assistant", "content": "x", "reasoning_content": 3}]
    response = httpx.post(f"{opened.base_url}/v1/chat/completions", json={"model": MODEL, "messages": bad}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[1].reasoning_content"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {f"v{i}": i for i in range(40)}}, "chat_template_kwargs"),
    ],
)
def test_bad_controls_are_a_400_naming_them(opened: RunningServer, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2, **extra}
    response = httpx.post(f"{opened.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_qwen3_effort_none_turns_its_own_switch_off(tiny_thinker_factory) -> None:
    """Qwen3's template writes an empty think block when enable_thinking is false: effort none sets it,
    as chat_template_kwargs does by hand."""
    with serve(engine_loader(str(tiny_thinker_factory("qwen3"))), served_model_name=(MODEL,)) as running:
        api = client(running)
        base = dict(model=MODEL, messages=ASK, max_tokens=2, temperature=0.0)
        default = api.chat.completions.create(**base).usage.prompt_tokens  # type: ignore[call-overload]
        off = api.chat.completions.create(**base, reasoning_effort="none").usage.prompt_tokens  # type: ignore[call-overload]
        by_hand = api.chat.completions.create(  # type: ignore[call-overload]
            **base, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
        ).usage.prompt_tokens
        tokenizer = running.engine.tokenizer
        empty_block = len(tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
        assert off == by_hand == default + empty_block


def test_responses_api_reasoning_items_whole_and_streamed(opened: RunningServer) -> None:
    api = client(opened)
    whole = api.responses.create(model=MODEL, input="Count the primes below 20.", max_output_tokens=20, temperature=0.0)
    kinds = [item.type for item in whole.output]
    assert kinds[0] == "reasoning" and "message" in kinds
    thinking = whole.output[0].content[0].text  # type: ignore[union-attr]
    assert thinking and whole.usage is not None and whole.usage.output_tokens_details.reasoning_tokens == BUDGET + 1
    deltas, done, text, final = "", None, "", None
    with api.responses.stream(
        model=MODEL, input="Count the primes below 20.", max_output_tokens=20, temperature=0.0
    ) as stream:
        for event in stream:
            if event.type == "response.reasoning_text.delta":
                deltas += event.delta
            elif event.type == "response.reasoning_text.done":
                done = event.text
            elif event.type == "response.output_text.delta":
                text += event.delta
            elif event.type in ("response.completed", "response.incomplete"):  # (max_output_tokens: incomplete)
                final = event.response
    assert final is not None and deltas == done == thinking and text == whole.output_text == final.output_text
    assert final.output[0].type == "reasoning"
    effort = api.responses.create(model=MODEL, input="Hi", max_output_tokens=6, reasoning={"effort": "none"})
    assert [item.type for item in effort.output] == ["message"]
    assert effort.reasoning is not None and effort.reasoning.effort == "none"


def test_anthropic_thinking_blocks_whole_and_streamed(opened: RunningServer) -> None:
    import anthropic

    api = anthropic.Anthropic(base_url=opened.base_url, api_key="key", max_retries=0)
    ask = [{"role": "user", "content": "Count the primes below 20."}]
    thinking = {"type": "enabled", "budget_tokens": 3}  # (temperature 0: the stream repeats the whole answer)
    whole = api.messages.create(
        model=MODEL, max_tokens=16, messages=ask, thinking=thinking, extra_body={"temperature": 0.0}
    )  # type: ignore[arg-type]
    assert [block.type for block in whole.content][:2] == ["thinking", "text"]
    thought = whole.content[0].thinking  # type: ignore[union-attr]
    with api.messages.stream(
        model=MODEL, max_tokens=16, messages=ask, thinking=thinking, extra_body={"temperature": 0.0}
    ) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking == thought  # type: ignore[union-attr]
    assert final.content[1].text == whole.content[1].text  # type: ignore[union-attr]
    plain = api.messages.create(model=MODEL, max_tokens=8, messages=ask)  # type: ignore[arg-type]
    assert [block.type for block in plain.content] == ["text"]  # thinking is off unless enabled
    # the thinking block goes back in the history, as Anthropic's clients send it
    history = [
        *ask,
        {"role": "assistant", "content": [b.model_dump() for b in whole.content]},
        {"role": "user", "content": "And below 30?"},
    ]
    api.messages.create(model=MODEL, max_tokens=4, messages=history)  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError):
        api.messages.create(model=MODEL, max_tokens=8, messages=ask, thinking={"type": "enabled", "budget_tokens": 8})  # type: ignore[arg-type]


def test_time_to_first_answer_token_is_reported(opened: RunningServer) -> None:
    response = httpx.post(
        f"{opened.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True},
        timeout=60,
    )
    timing = response.json()["timing"]
    assert 0 < timing["ttft_s"] < timing["ttfat_s"] <= timing["total_s"]  # the thinking came first
    assert "ttfat;dur=" in response.headers["server-timing"]
    metrics = httpx.get(f"{opened.base_url}/metrics", timeout=10).text
    assert "fulmine_time_to_first_answer_token_seconds_count" in metrics


def test_a_chat_template_file_replaces_the_models(tiny_llama, tmp_path) -> None:
    from fulmine.config import ConfigError, EngineConfig
    from fulmine.engine.llm_engine import LLMEngine
    from tests.conftest import DATA

    template = DATA / "qwen3_chat_template.jinja"
    engine = LLMEngine(str(tiny_llama), EngineConfig(chat_template=str(template)), progress=False)
    assert engine.tokenizer.chat_template == template.read_text()
    assert engine.reasoning.kind == "think" and engine.reasoning.switch == "enable_thinking"  # read from it
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ConfigError, match="line 1"):
        LLMEngine(str(tiny_llama), EngineConfig(chat_template=str(broken)), progress=False)
    with pytest.raises(ConfigError, match="no such file"):
        LLMEngine(str(tiny_llama), EngineConfig(chat_template=str(tmp_path / "missing.jinja")), progress=False)


def test_a_first_answer_target_budgets_the_thinking(tiny_thinker_factory) -> None:
    """slo.ttfat_ms: the thinking gets what the target leaves after the predicted first token (the
    step cost model's), so the answer starts in time; a target nothing fits in is a 429 at once."""
    loader = engine_loader(str(tiny_thinker_factory("r1_opened")), speculative="off")
    with serve(loader, served_model_name=(MODEL,)) as running:
        body = {"model": MODEL, "messages": ASK, "max_tokens": 200, "temperature": 0.0, "ignore_eos": True}
        free = httpx.post(f"{running.base_url}/v1/chat/completions", json=body, timeout=60).json()
        assert free["usage"]["completion_tokens_details"]["reasoning_tokens"] == 200  # it would think on
        timed = httpx.post(
            f"{running.base_url}/v1/chat/completions", json={**body, "slo": {"ttfat_ms": 60}}, timeout=60
        ).json()
        thinking = timed["usage"]["completion_tokens_details"]["reasoning_tokens"]
        assert 1 < thinking < 200 and timed["choices"][0]["message"]["content"]
        refused = httpx.post(
            f"{running.base_url}/v1/chat/completions", json={**body, "slo": {"ttfat_ms": 0.001}}, timeout=60
        )
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "slo_unattainable"


def test_litellm_and_the_agents_sdk_read_the_thinking(opened: RunningServer) -> None:
    """LiteLLM's message.reasoning_content; the Agents SDK's ReasoningItem (its Chat Completions model
    class here: its Responses one raises on a max-tokens answer, and the random model never ends its
    own; the openai SDK reads the Responses API's reasoning items above)."""
    import asyncio
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
    import litellm

    response = litellm.completion(
        model=f"openai/{MODEL}", api_base=f"{opened.base_url}/v1", api_key="unused",
        messages=ASK, max_tokens=16, temperature=0.0,
    )  # fmt: skip
    assert response.choices[0].message.reasoning_content  # type: ignore[union-attr]
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)

    # the random model never ends its answer itself; a stop string from its greedy answer ends it
    # (one that its thinking does not hold), so the run completes instead of hitting max tokens
    ask = "Count the primes below 20."
    first = (
        client(opened)
        .chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": ask}], max_tokens=24, temperature=0.0
        )
        .choices[0]
        .message
    )  # type: ignore[call-overload]
    thought, text = first.model_extra["reasoning_content"], first.content or ""
    stop = next(text[i : i + 3] for i in range(1, 12) if text[i : i + 3] not in thought)
    settings = agents.ModelSettings(max_tokens=24, temperature=0.0, extra_body={"stop": [stop]})

    async def scenario() -> list[str]:
        api = AsyncOpenAI(base_url=f"{opened.base_url}/v1", api_key="unused", max_retries=0)
        model = agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=api)
        agent = agents.Agent(name="thinker", model=model, model_settings=settings)
        result = await agents.Runner.run(agent, ask)
        return [type(item).__name__ for item in result.new_items]

    kinds = asyncio.run(scenario())
    assert "ReasoningItem" in kinds and "MessageOutputItem" in kinds


def test_a_response_format_applies_to_the_answer_after_free_thinking(opened: RunningServer) -> None:
    """The grammar constrains the answer only: the thinking is free text, then the JSON parses (the
    tool grammars of tool_choice required take the same path; this tiny model's 256-token context
    cannot hold a tools prompt)."""
    schema = {"type": "object", "properties": {"n": {"enum": [2, 3, 5]}}, "required": ["n"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}
    args = dict(model=MODEL, messages=ASK, max_tokens=40, temperature=0.0, response_format=response_format)
    whole = client(opened).chat.completions.create(**args)  # type: ignore[call-overload]
    message = whole.choices[0].message
    assert message.model_extra["reasoning_content"] and json.loads(message.content)["n"] in (2, 3, 5)
    thinking, content = "", ""
    for chunk in client(opened).chat.completions.create(**args, stream=True):  # type: ignore[call-overload]
        for choice in chunk.choices:
            thinking += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
    assert (thinking, content) == (message.model_extra["reasoning_content"], message.content)
