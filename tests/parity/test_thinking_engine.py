"""The engine's side of thinking: reasoning tokens counted, a budget that closes the thinking with
no extra forward, constraints that wait for the answer. Tiny random Qwen3 models carry real
reasoning templates and <think> tags as tokens (tests/conftest.py: tiny_thinker_factory)."""

from __future__ import annotations

import json

import pytest

from fulmine import LLM, SamplingParams
from fulmine.reasoning import split
from fulmine.request import FinishReason, StructuredOutput

CHAT = [{"role": "user", "content": "Count the primes below 20."}]


def steps_and_answer(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[int, list[int], object]:
    """Engine steps that gave the request tokens, its tokens, and its last output."""
    engine = llm.engine
    request_id = engine.add_request(prompt, params)
    steps, tokens, last = 0, [], None
    while engine.has_unfinished():
        for output in engine.step():
            if output.request_id == request_id and output.new_token_ids:
                steps += 1
                tokens += output.new_token_ids
            last = output
    return steps, tokens, last


@pytest.fixture(scope="module")
def opened(tiny_thinker_factory) -> LLM:
    """The prompt opens the thinking (the R1 distills' later template): the answer starts inside it."""
    return LLM(str(tiny_thinker_factory("r1_opened")), dtype="float32", speculative="off", progress=False)


@pytest.mark.parametrize("budget", [0, 1, 5, 17])
def test_a_budget_closes_the_thinking_with_no_extra_step(opened: LLM, budget: int) -> None:
    engine = opened.engine
    end = engine.reasoning.end_ids[0]
    prompt = engine.encode_prompt(CHAT)
    params = SamplingParams(temperature=0.0, max_tokens=budget + 8, ignore_eos=True, reasoning_budget=budget)
    steps, tokens, last = steps_and_answer(opened, prompt, params)
    assert tokens[budget] == end and end not in tokens[:budget]  # budget thinking tokens, then the end tag
    assert last.num_reasoning_tokens == budget + 1  # (the end tag counts as thinking)
    # the step that samples the end tag also samples the answer's first token (drafted and forced),
    # so no step is added; budget 0 closes at the prompt's first token, which a step samples anyway
    assert steps == len(tokens) - (1 if budget else 0)
    free = opened.generate([prompt], SamplingParams(temperature=0.0, max_tokens=budget + 8, ignore_eos=True))[0]
    assert end not in free.token_ids[: budget + 1]  # unbudgeted, this random model would think on
    assert free.token_ids[:budget] == tokens[:budget]  # and up to the budget, it thought the same


def test_sampled_and_budgeted_rows_together(opened: LLM) -> None:
    """Budgets of several sizes in one batch, sampled and greedy: each closes at its own budget."""
    prompt = opened.engine.encode_prompt(CHAT)
    end = opened.engine.reasoning.end_ids[0]
    params = [
        SamplingParams(temperature=t, max_tokens=24, ignore_eos=True, reasoning_budget=b, seed=3)
        for t, b in ((0.0, 2), (0.9, 6), (0.7, 11), (0.0, None))
    ]
    outs = opened.generate([prompt] * len(params), params)
    for p, out in zip(params, outs):
        if p.reasoning_budget is None:
            assert out.num_reasoning_tokens == len(out.token_ids) or end in out.token_ids
            continue
        assert out.token_ids.index(end) == p.reasoning_budget, p
        assert out.num_reasoning_tokens == p.reasoning_budget + 1


def test_a_constraint_applies_to_the_answer_after_the_thinking(opened: LLM) -> None:
    prompt = opened.engine.encode_prompt(CHAT)
    schema = {
        "type": "object",
        "properties": {"n": {"enum": [2, 3, 5, 7]}},
        "required": ["n"],
        "additionalProperties": False,
    }
    structured = StructuredOutput("json_schema", json.dumps(schema))
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=60, reasoning_budget=6, structured=structured)
    out = opened.generate([prompt], params)[0]
    reasoning, content = split(opened.engine.reasoning, out.text, opened=True)
    assert out.num_reasoning_tokens == 7 and out.finish_reason is FinishReason.STOP
    assert json.loads(content)["n"] in (2, 3, 5, 7)  # the answer alone matches the schema
    assert reasoning  # the thinking was free text, not JSON


def test_qwen3_thinks_only_if_it_opens_the_tag(tiny_thinker_factory) -> None:
    """Qwen3's template leaves the tag to the model. Steered to open it (a logit bias on <think>), its
    thinking is counted and budgeted; steered away, nothing is reasoning."""
    llm = LLM(str(tiny_thinker_factory("qwen3")), dtype="float32", speculative="off", progress=False)
    engine = llm.engine
    start = engine.tokenizer.convert_tokens_to_ids("<think>")
    end = engine.reasoning.end_ids[0]
    prompt = engine.encode_prompt(CHAT)
    think = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, reasoning_budget=4, logit_bias={start: 100})
    out = llm.generate([prompt], think)[0]
    assert out.token_ids[0] == start and out.token_ids[4] == end and out.num_reasoning_tokens == 5
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logit_bias={start: -100, end: -100})
    out = llm.generate([prompt], plain)[0]
    assert out.num_reasoning_tokens == 0 and split(engine.reasoning, out.text) == ("", out.text)


def test_a_constrained_qwen3_answer_may_open_its_thinking_first(tiny_thinker_factory) -> None:
    """Its first row allows the grammar's tokens and <think>: a model that opens it thinks freely, then
    answers under the grammar."""
    llm = LLM(str(tiny_thinker_factory("qwen3")), dtype="float32", speculative="off", progress=False)
    engine = llm.engine
    start = engine.tokenizer.convert_tokens_to_ids("<think>")
    prompt = engine.encode_prompt(CHAT)
    choice = StructuredOutput("choice", json.dumps(["yes", "no"]))
    params = SamplingParams(
        temperature=0.0, max_tokens=20, reasoning_budget=3, structured=choice, logit_bias={start: 100}
    )
    out = llm.generate([prompt], params)[0]
    reasoning, content = split(engine.reasoning, out.text)
    assert out.token_ids[0] == start and out.num_reasoning_tokens == 4 and content in ("yes", "no")
    without = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, structured=choice))[0]
    assert without.text in ("yes", "no") and without.num_reasoning_tokens == 0


@pytest.mark.real_model
@pytest.mark.slow
def test_a_real_model_steered_to_think_is_budgeted_with_text_tags() -> None:
    """Qwen2.5-Coder-0.5B (a real Q4_K_M file; its vocabulary has no think tokens, so the tags are text
    of several tokens), told the thinking format and given a prompt that opens <think>: it thinks
    on, its budget closes the block with the tag's tokens forced in one step, and it answers."""
    from tests.parity.test_real_models import fetch

    llm = LLM(str(fetch("qwen2.5-coder-0.5b")), reasoning_parser="think", speculative="off", progress=False)
    engine = llm.engine
    chat = engine.encode_prompt([{"role": "user", "content": "Write a Python function that adds two numbers."}])
    prompt = chat + list(engine.tokenizer.encode("<think>\n", add_special_tokens=False))
    end = list(engine.reasoning.end_ids)
    assert len(end) > 1  # text tags: the closing is several forced tokens
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, reasoning_budget=12)
    steps, tokens, last = steps_and_answer(llm, prompt, params)
    assert tokens[12 : 12 + len(end)] == end and last.num_reasoning_tokens == 12 + len(end)
    assert steps == len(tokens) - len(end)  # the tag's tokens and the answer's first in one step
    reasoning, content = split(engine.reasoning, engine.tokenizer.decode(tokens), opened=True)
    assert reasoning and content.strip()
