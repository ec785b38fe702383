"""Structured outputs end to end: the embedded model behind a real server, driven by the official
openai client (response_format, chat.completions.parse, vLLM's guided_* extensions), and a schema
suite whose every finished output must validate (jsonschema, a validator nobody here wrote)."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from fulmine import SamplingParams
from fulmine.config import ConfigError, EngineConfig
from fulmine.engine.llm_engine import LLMEngine
from fulmine.engine.outputs import fold_all
from fulmine.request import FinishReason, StructuredOutput
from tests.conftest import draft_always
from tests.e2e.conftest import EMBEDDED_NAME
from tests.e2e.openai_schemas import validate
from tests.e2e.server import RunningServer

MODEL = EMBEDDED_NAME  # the conftest's server: the embedded model
ASK = [{"role": "user", "content": "Describe a fictional person as JSON."}]

SCHEMAS = {
    "nested_required_optional": {
        "type": "object",
        "properties": {  # strings bounded: the 135M model sampled at 1.0 can run on inside an unbounded one
            "name": {"type": "string", "maxLength": 40},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 40},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
            "nickname": {"type": "string", "maxLength": 40},
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "enum_and_bounds": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["color", "age", "score"],
        "additionalProperties": False,
    },
    "array_bounds": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "string", "enum": ["none", "many"]}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "string_lengths_and_unicode": {
        "type": "object",
        "properties": {
            "quote": {"type": "string", "minLength": 3, "maxLength": 40},
            "city": {"const": 'Zürich "東京" \\ ✓'},
        },
        "required": ["quote", "city"],
        "additionalProperties": False,
    },
    "top_level_array": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
}


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(None, progress=False)


def run(engine: LLMEngine, prompt, params: SamplingParams):
    request_id = engine.add_request(prompt, params)
    answers: dict = {}
    while engine.has_unfinished():
        for out in fold_all(answers, engine.step()):
            if out.request_id == request_id and out.finished:
                return out
    raise AssertionError("no output")


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_finished_output_validates(engine: LLMEngine, name: str, temperature: float) -> None:
    schema = SCHEMAS[name]
    params = SamplingParams(
        max_tokens=160, temperature=temperature, seed=7, structured=StructuredOutput("json_schema", json.dumps(schema))
    )
    out = run(engine, ASK, params)
    assert out.finish_reason == FinishReason.STOP, (out.text, out.finish_reason)
    jsonschema.validate(json.loads(out.text), schema)
    assert "  " not in out.text and "\n" not in out.text  # compact: no runaway whitespace


def test_length_inside_unfinished_json_is_reported_as_length(engine: LLMEngine) -> None:
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    out = run(engine, ASK, SamplingParams(max_tokens=5, structured=StructuredOutput("json_schema", json.dumps(schema))))
    assert out.finish_reason == FinishReason.LENGTH and len(out.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_regex_choice_and_grammar(engine: LLMEngine) -> None:
    out = run(
        engine,
        "My phone number is",
        SamplingParams(max_tokens=20, structured=StructuredOutput("regex", r"\d{3}-\d{4}")),
    )
    assert re.fullmatch(r"\d{3}-\d{4}", out.text) and out.finish_reason == FinishReason.STOP
    out = run(
        engine,
        "Is the sky blue?",
        SamplingParams(max_tokens=20, structured=StructuredOutput("choice", '["yes", "no"]')),
    )
    assert out.text in ("yes", "no")
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]+/'
    out = run(engine, "What is 6 times 7?", SamplingParams(max_tokens=20, structured=StructuredOutput("grammar", lark)))
    assert re.fullmatch(r"The answer is [0-9]+\.", out.text), out.text


@pytest.mark.parametrize(
    ("structured", "fragment"),
    [
        (StructuredOutput("json_schema", '{"type": "strin"}'), "strin"),
        (StructuredOutput("json_schema", '{"type": "string", "format": "bogus"}'), "bogus"),
        (StructuredOutput("json_schema", "{not json"), "not valid JSON"),
        (StructuredOutput("regex", "(("), "regex"),
        (StructuredOutput("grammar", "start: undefined_rule"), "undefined_rule"),
        (StructuredOutput("choice", "[]"), "choice"),
    ],
)
def test_unusable_constraints_are_refused_naming_why(engine: LLMEngine, structured, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        engine.add_request("x", SamplingParams(structured=structured))
    assert not engine.has_unfinished()


def test_constrained_and_free_requests_share_a_batch(engine: LLMEngine) -> None:
    """A constrained request beside free ones: the free ones' tokens are what they are alone."""
    free = SamplingParams(max_tokens=12, temperature=0.0)
    alone = run(engine, "Once upon a time", free).token_ids
    constrained = SamplingParams(max_tokens=40, structured=StructuredOutput("json_object"))
    ids = [engine.add_request(ASK, constrained), engine.add_request("Once upon a time", free)]
    outs, answers = {}, {}  # type: ignore[var-annotated]
    while engine.has_unfinished():
        for out in fold_all(answers, engine.step()):
            if out.finished:
                outs[out.request_id] = out
    assert outs[ids[1]].token_ids == alone
    if outs[ids[0]].finish_reason == FinishReason.STOP:
        assert isinstance(json.loads(outs[ids[0]].text), dict)


# -- the server, the openai client ------------------------------------------------------------


class Person(pydantic.BaseModel):
    name: str
    age: int
    city: str


def test_openai_parse_returns_the_pydantic_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person, temperature=0)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Person), message.content
    assert completion.choices[0].finish_reason == "stop"


def test_strict_schemas_allow_exactly_their_properties(client: openai.OpenAI) -> None:
    """`strict: true` (OpenAI's strict mode): objects that do not set additionalProperties take no keys
    beyond theirs, in a response format and in a function's parameters, nested ones too; without
    strict, JSON Schema's default (more keys allowed) holds."""
    from fulmine.sampling.grammar import closed_objects

    open_schema = {"type": "object", "properties": {"name": {"type": "string"}, "inner": {"type": "object"}}}
    assert closed_objects(open_schema) == {
        "type": "object",
        "properties": {"name": {"type": "string"}, "inner": {"type": "object", "additionalProperties": False}},
        "additionalProperties": False,
    }
    assert closed_objects({"type": "object", "additionalProperties": {"type": "integer"}})["additionalProperties"] == {
        "type": "integer"
    }
    schema = Person.model_json_schema()  # as pydantic writes it: no additionalProperties
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    answer = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, temperature=0, max_tokens=200
    )
    assert answer.choices[0].finish_reason == "stop"
    assert set(json.loads(answer.choices[0].message.content)) <= set(schema["properties"])
    tool = {"type": "function", "function": {"name": "person", "parameters": schema, "strict": True}}
    call = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "person"}},
        temperature=0,
        max_tokens=200,
    )
    assert call.choices[0].finish_reason == "tool_calls"
    [made] = call.choices[0].message.tool_calls  # a named function is called once
    assert set(json.loads(made.function.arguments)) <= set(schema["properties"])


def test_json_schema_streamed_equals_plain(server: RunningServer, client: openai.OpenAI) -> None:
    schema = SCHEMAS["enum_and_bounds"]
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    body = {"model": MODEL, "messages": ASK, "response_format": fmt, "temperature": 0}
    plain = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60).json()
    validate(plain, "CreateChatCompletionResponse")
    text = plain["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(text), schema)
    stream = client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text


def test_json_object_and_completions_extensions(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, temperature=0, max_tokens=120
    )
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(chat.choices[0].message.content), dict)
    choice = client.completions.create(
        model=MODEL, prompt="Is water wet? Answer:", max_tokens=5, extra_body={"guided_choice": [" yes", " no"]}
    )
    assert choice.choices[0].text in (" yes", " no")
    regex = client.completions.create(
        model=MODEL, prompt="A year:", max_tokens=8, extra_body={"structured_outputs": {"regex": "[12][0-9]{3}"}}
    )
    assert re.fullmatch("[12][0-9]{3}", regex.choices[0].text)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "grammar"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "structured_outputs.regex"),
        ({"structured_outputs": {"frobnicate": 1}}, "structured_outputs"),
    ],
)
def test_bad_constraints_get_a_400_naming_the_field(server: RunningServer, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": ASK, **extra}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["param"] == param


def test_metrics_count_constrained_requests(server: RunningServer) -> None:
    text = httpx.get(f"{server.base_url}/metrics").text
    assert re.search(r"^fulmine_constrained_requests [1-9]", text, re.M), text
    assert re.search(r"^fulmine_token_mask_seconds [0-9.e-]+$", text, re.M)


def test_pytorch_sampler_masks_like_the_c_sampler(engine: LLMEngine) -> None:
    """Where the C sampler is not used (CUDA, no kernels), the mask is applied as tensor ops."""
    sampler = engine.runner.sampler
    kernel, sampler.kernel = sampler.kernel, None
    try:
        structured = StructuredOutput("regex", r"[A-Z][a-z]+, [0-9]{2}")
        out = run(
            engine, "Name and age:", SamplingParams(max_tokens=20, temperature=1.0, seed=3, structured=structured)
        )
    finally:
        sampler.kernel = kernel
    assert re.fullmatch(r"[A-Z][a-z]+, [0-9]{2}", out.text), out.text


def test_min_tokens_past_a_complete_grammar_stops_cleanly(engine: LLMEngine) -> None:
    """min_tokens holds back the end of sequence, but the grammar allows nothing else once complete:
    the answer ends at the grammar's end, not in an error (found by the API fuzzer)."""
    for choices in ('["yes", "no"]', '[""]'):
        params = SamplingParams(max_tokens=10, min_tokens=5, structured=StructuredOutput("choice", choices))
        out = run(engine, "Is the sky blue?", params)
        assert out.finish_reason == FinishReason.STOP and out.text in json.loads(choices), out.text


def test_fast_forward_changes_speed_not_tokens() -> None:
    """Forced tokens fed as drafts: the same tokens (greedy, and seeded sampling), in fewer steps.
    (Seeds 1-12 all give the same tokens; seed 11's answer runs 112 of its 120 tokens inside one free
    string, where there is nothing to force, so the steps are counted on seed 12's.)"""
    schema = json.dumps(SCHEMAS["nested_required_optional"])
    results = {}
    for fast_forward in (True, False):
        engine = LLMEngine(None, EngineConfig(grammar_fast_forward=fast_forward, speculative="off"), progress=False)
        outs, steps, answers = [], 0, {}  # type: ignore[var-annotated]
        for params in (
            SamplingParams(max_tokens=120, temperature=0.0, structured=StructuredOutput("json_schema", schema)),
            SamplingParams(
                max_tokens=120, temperature=0.9, seed=12, structured=StructuredOutput("json_schema", schema)
            ),
        ):
            engine.add_request(ASK, params)
            while engine.has_unfinished():
                steps += 1
                outs += [(o.token_ids, o.finish_reason) for o in fold_all(answers, engine.step()) if o.finished]
        results[fast_forward] = (outs, steps)
    assert results[True][0] == results[False][0]
    assert results[True][1] < 0.8 * results[False][1], (results[True][1], results[False][1])


def test_fast_forward_keeps_seeded_tokens_for_every_seed() -> None:
    """Seeded sampled answers equal with fast-forward on and off, seed after seed: a verified draft
    accepted only when it is the row's own draw, and an answer that completes its grammar inside a
    run of drafts ends there, as it would have without them (no end-of-sequence token after it)."""
    schema = StructuredOutput("json_schema", json.dumps(SCHEMAS["nested_required_optional"]))
    answers = {}
    for fast_forward in (True, False):
        engine = LLMEngine(None, EngineConfig(grammar_fast_forward=fast_forward, speculative="off"), progress=False)
        for seed in range(1, 13):
            engine.add_request(ASK, SamplingParams(max_tokens=60, temperature=0.9, seed=seed, structured=schema))
        answers[fast_forward], so_far = {}, {}
        while engine.has_unfinished():
            folded = fold_all(so_far, engine.step())
            answers[fast_forward].update({o.request_id: o.token_ids for o in folded if o.finished})
    assert answers[True] == answers[False]  # request ids: the same order in both engines


def test_a_refused_draft_leaves_the_grammar_usable(engine: LLMEngine) -> None:
    """A draft row the grammar refuses is masked and discarded by verification; the matcher is not
    left in llguidance's error state (a refused consume never recovers), so the request goes on."""
    from fulmine.sampling.grammar import MaskEntry, TokenMasks

    matcher = engine.grammars.matcher(StructuredOutput("choice", '["yes", "no"]'))
    refused = engine.tokenizer.encode("maybe", add_special_tokens=False)[:1]
    TokenMasks({"r": MaskEntry(matcher, refused)}, engine.model_config.vocab_size).wait()
    assert not matcher.is_error()
    assert matcher.consume_tokens(engine.tokenizer.encode("yes", add_special_tokens=False))


def test_ngram_speculation_under_a_grammar_changes_speed_not_tokens() -> None:
    """Where the grammar leaves a choice, n-gram drafts (an extraction answer copies the prompt) are
    cut at the first token the grammar refuses and verified under the grammar's masks: the same
    tokens as with no speculation at all, greedy and seeded, with drafts accepted."""
    record = "Name: Alice Johnson-Whitaker. Email: alice.johnson-whitaker@example.org. City: San Francisco."
    ask = [{"role": "user", "content": f"{record}\nExtract the name, email and city of this record as JSON."}]
    schema = json.dumps(
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": "string"}, "city": {"type": "string"}},
            "required": ["name", "email", "city"],
            "additionalProperties": False,
        }
    )
    results = {}
    for speculative in ("ngram", "off"):
        engine = LLMEngine(None, EngineConfig(speculative=speculative), progress=False)
        if engine.governor is not None:
            draft_always(engine.governor)
        outs = []
        for params in (
            SamplingParams(max_tokens=80, temperature=0.0, structured=StructuredOutput("json_schema", schema)),
            SamplingParams(max_tokens=80, temperature=0.8, seed=5, structured=StructuredOutput("json_schema", schema)),
        ):
            out = run(engine, ask, params)
            outs.append((out.token_ids, out.finish_reason))
            if out.finish_reason == FinishReason.STOP:  # (a sampled answer may run to max_tokens)
                jsonschema.validate(json.loads(out.text), json.loads(schema))
        results[speculative] = outs
        if engine.governor is not None:
            assert engine.governor.num_accepted > 0
    assert results["ngram"] == results["off"]
