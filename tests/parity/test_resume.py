"""A request resumed from the tokens it already generated (LLMEngine.add_request's `generated`: a
stream whose replica died goes on on another, replicas/front.py) continues exactly as it would
have: the same tokens for greedy and seeded sampling, the same text after what was already released,
with stop strings and output constraints carried across the cut."""

from __future__ import annotations

import json

import pytest

from fulmine import LLM, SamplingParams
from fulmine.engine.outputs import fold_all
from fulmine.request import StructuredOutput

PROMPT = [{"role": "user", "content": "Write a short poem about the sea, then list three facts about whales."}]
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
)
CASES = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True),
    "seeded": SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=48, ignore_eos=True),
    "seeded with penalties": SamplingParams(
        temperature=0.8, seed=7, max_tokens=48, ignore_eos=True, frequency_penalty=0.5, presence_penalty=0.3
    ),
    "seeded, stop string": SamplingParams(temperature=0.8, seed=99, max_tokens=64, stop=["sea"]),
    "seeded, json schema": SamplingParams(
        temperature=0.7, seed=3, max_tokens=64, structured=StructuredOutput("json_schema", SCHEMA)
    ),
}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(progress=False)


def _run(llm: LLM, prompt_ids: list[int], params: SamplingParams, generated: list[int]) -> tuple[list[int], str]:
    engine = llm.engine
    request_id = engine.add_request(prompt_ids, params, generated=generated)
    text, token_ids = "", []
    answers: dict = {}
    while engine.has_unfinished():
        for output in fold_all(answers, engine.step()):
            if output.request_id == request_id:
                text += output.new_text
                token_ids = output.token_ids
    return generated + token_ids, text  # the engine's deltas carry only what it produced


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_request_continues_as_it_would_have(llm: LLM, case: str) -> None:
    params = CASES[case]
    prompt_ids = llm.engine.encode_prompt(PROMPT)
    whole_ids, whole_text = _run(llm, prompt_ids, params, [])
    assert len(whole_ids) > 8
    for cut in (1, len(whole_ids) // 2, len(whole_ids) - 1):
        generated = whole_ids[:cut]
        before = llm.engine.tokenizer.decode(generated, skip_special_tokens=True)
        token_ids, text = _run(llm, prompt_ids, params, generated)
        assert token_ids == whole_ids, (case, cut)
        # what the front already sent plus what the resumed request released: the whole text (the
        # front sends what was released before the cut: its prefix of the text, up to held-back
        # characters of a stop string, which the resumed request releases)
        assert whole_text.startswith(before[: len(whole_text)]) or before.startswith(whole_text)
        assert whole_text.endswith(text)


def test_generated_tokens_outside_the_grammar_are_refused(llm: LLM) -> None:
    params = CASES["seeded, json schema"]
    prompt_ids = llm.engine.encode_prompt(PROMPT)
    bad = llm.engine.tokenizer.encode("hello", add_special_tokens=False)
    with pytest.raises(ValueError, match="grammar"):
        llm.engine.add_request(prompt_ids, params, generated=bad)
    assert not llm.engine.has_unfinished()
