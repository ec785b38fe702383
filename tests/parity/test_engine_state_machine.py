"""The engine as a state machine, driven through its public API by hypothesis: requests from a pool
that invites accepted drafts and prefix hits, aborts and steps in any order, with random
max_tokens, stops, min_tokens, seeds, constraints and logprobs. After every step the engine checks
its own bookkeeping (FULMINE_CHECK_INVARIANTS, on in the suite: engine/invariants.py); here,
every greedy unconstrained answer must be a prefix of the one the request makes alone, ending where
its limits say, and an idle engine must hold nothing.

Three proposers: one drafting the model's own greedy continuation (known from a run alone),
sometimes with a wrong token, so finishes (end of sequence, max_tokens, stop strings, a grammar's
end) land inside accepted draft runs at every offset (the case that once killed the engine); n-gram
prompt lookup; and a draft model (the model itself, so its drafts are mostly accepted). CI runs a bounded number
of examples; FULMINE_STATEFUL_EXAMPLES=N runs more.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fulmine import EngineConfig, SamplingParams
from fulmine.engine.llm_engine import LLMEngine
from fulmine.engine.outputs import fold, fold_all
from fulmine.models.source import default_model_path
from fulmine.request import FinishReason, StructuredOutput
from tests.conftest import draft_always

EXAMPLES = int(os.environ.get("FULMINE_STATEFUL_EXAMPLES", "12"))
MAX_TOKENS = 40
PROMPTS = [
    [{"role": "user", "content": "Rewrite this code with better names: def f(a,b): return [x for x in a if x in b]"}],
    [{"role": "user", "content": "Repeat this exactly: the cat sat on the mat, the cat sat on the mat."}],
    [{"role": "user", "content": "Count from one to twenty in words."}],
    [{"role": "user", "content": "What is the capital of France?"}],
]
CONSTRAINTS = [
    StructuredOutput("regex", r"(yes|no)[.!]"),
    StructuredOutput("choice", '["Paris", "Lyon", "Marseille"]'),
    StructuredOutput("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'),
]


class OracleProposer:
    """Drafts the greedy continuation a prompt has alone (every third proposal with a wrong token
    in it), so draft runs are accepted whole, cut short, and run past every kind of finish."""

    def __init__(self) -> None:
        self.answers: dict[tuple[int, ...], list[int]] = {}
        self.calls = 0

    def propose(self, request_id: str, tokens: list[int], k: int) -> list[int]:
        for prompt, answer in self.answers.items():
            done = len(tokens) - len(prompt)
            if done >= 0 and tuple(tokens[: len(prompt)]) == prompt and tokens[len(prompt) :] == answer[:done]:
                drafts = list(answer[done : done + k])
                self.calls += 1
                if self.calls % 3 == 0 and drafts:
                    index = self.calls % len(drafts)
                    drafts[index] = (drafts[index] + 7) % 1000
                return drafts
        return []

    def release(self, request_id: str) -> None:
        pass


@pytest.fixture(scope="module")
def engines() -> dict[str, Any]:
    plain = LLMEngine(None, EngineConfig(speculative="off"), progress=False)
    answers = {}
    for index, messages in enumerate(PROMPTS):
        request_id = plain.add_request(messages, SamplingParams(temperature=0, max_tokens=MAX_TOKENS + 8))
        folded: dict[str, Any] = {}
        while plain.has_unfinished():
            for output in fold_all(folded, plain.step()):
                if output.finished and output.request_id == request_id:
                    answers[index] = (plain.encode_prompt(messages), output.token_ids)
    oracle = LLMEngine(None, EngineConfig(speculative="ngram", num_speculative_tokens=5), progress=False)
    assert oracle.governor is not None
    proposer = OracleProposer()
    proposer.answers = {tuple(prompt): tokens for prompt, tokens in answers.values()}
    oracle.governor.proposer = proposer
    draft_always(oracle.governor)
    ngram = LLMEngine(None, EngineConfig(speculative="ngram", num_speculative_tokens=4), progress=False)
    assert ngram.governor is not None
    draft_always(ngram.governor)
    ngram.governor.proposer.min_n = 1  # type: ignore[attr-defined]
    draft_config = EngineConfig(speculative="draft", draft_model=str(default_model_path()), num_speculative_tokens=3)
    draft = LLMEngine(None, draft_config, progress=False)  # the model drafting for itself: long accepted runs
    assert draft.governor is not None
    draft_always(draft.governor)
    return {"answers": answers, "oracle": oracle, "ngram": ngram, "draft": draft}


class EngineMachine(RuleBasedStateMachine):
    engine: LLMEngine
    answers: dict[int, tuple[list[int], list[int]]]

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[str, tuple[int, SamplingParams]] = {}
        self.finished: list[tuple[int, SamplingParams, Any]] = []
        self.added: list[str] = []
        self.answers_so_far: dict[str, Any] = {}

    @rule(
        prompt=st.integers(0, len(PROMPTS) - 1),
        max_tokens=st.integers(1, MAX_TOKENS),
        greedy=st.booleans(),
        seed=st.none() | st.integers(0, 2**31),
        stop=st.lists(st.sampled_from([".", "the", "\n", "x in", ","]), max_size=2),
        min_tokens=st.sampled_from([0, 0, 0, 2, 5]),
        constraint=st.none() | st.none() | st.sampled_from(CONSTRAINTS),
        logprobs=st.none() | st.none() | st.integers(0, 3),
        copies=st.integers(1, 2),
    )
    def add(self, prompt: int, max_tokens: int, greedy: bool, seed: int | None, stop: list[str], min_tokens: int,
            constraint: StructuredOutput | None, logprobs: int | None, copies: int) -> None:  # fmt: skip
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0 if greedy else 0.8, top_p=0.9, seed=seed, stop=stop,
            min_tokens=min(min_tokens, max_tokens), structured=constraint, logprobs=logprobs,
        )  # fmt: skip
        for _ in range(copies):  # n > 1, as the server asks for it
            request_id = self.engine.add_request(PROMPTS[prompt], params)
            self.live[request_id] = (prompt, params)
            self.added.append(request_id)

    @rule(pick=st.integers(0, 63))
    def abort(self, pick: int) -> None:
        """Abort one of the example's requests, finished or not (the draw must not depend on which
        are still running: that depends on the engine, and hypothesis replays draws)."""
        if not self.added:
            return
        request_id = self.added[pick % len(self.added)]
        output = self.engine.abort(request_id)
        if request_id not in self.live:
            assert output is None
            return
        prompt, params = self.live.pop(request_id)
        assert output is not None and output.finished
        output = fold(self.answers_so_far, output)
        self.finished.append((prompt, params, output))

    @rule(steps=st.integers(1, 8))
    def step(self, steps: int) -> None:
        for _ in range(steps):
            for output in fold_all(self.answers_so_far, self.engine.step()):
                assert output.finish_reason is not FinishReason.ERROR, output.error
                if output.finished:
                    prompt, params = self.live.pop(output.request_id)
                    self.finished.append((prompt, params, output))

    @invariant()
    def answers_are_right(self) -> None:
        for prompt, params, output in self.finished:
            tokens = output.token_ids
            assert len(tokens) <= (params.max_tokens or 0)
            if output.finish_reason is FinishReason.LENGTH:
                assert len(tokens) == params.max_tokens
            if params.logprobs is not None:
                assert output.logprobs is not None and len(output.logprobs) == len(tokens)
            if params.is_greedy and params.structured is None and output.finish_reason is not FinishReason.ABORT:
                alone = self.answers[prompt][1]
                assert tokens == alone[: len(tokens)], "a greedy answer left the one it makes alone"
                if not params.stop and output.finish_reason is FinishReason.STOP:
                    assert tokens == alone[: len(tokens)] and tokens[-1] in self.engine.eos_token_ids
        self.finished.clear()

    def teardown(self) -> None:
        for request_id in list(self.live):
            self.engine.abort(request_id)
        assert not self.engine.has_unfinished()
        outputs = self.engine.outputs
        assert self.engine.kv_cache.pool.usage == 0.0 and not outputs.detokenizers and not outputs.matchers


@pytest.mark.parametrize("proposer", ["oracle", "ngram", "draft"])
def test_engine_state_machine(engines: dict[str, Any], proposer: str) -> None:
    assert os.environ.get("FULMINE_CHECK_INVARIANTS") == "1"
    machine = type(f"Machine_{proposer}", (EngineMachine,), {})
    machine.engine = engines[proposer]
    machine.answers = engines["answers"]
    engine = engines[proposer]
    drops = []  # tokens verified past a finish, dropped by settle: the case this test is for
    original = engine.scheduler.settle
    engine.scheduler.settle = lambda request, dropped, reason: (
        drops.append(dropped) or original(request, dropped, reason)
    )
    run = machine.TestCase
    run.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=25,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    try:
        run().runTest()
    finally:
        engine.scheduler.settle = original
    assert engine.governor is not None and engine.governor.num_accepted > 0
    if proposer == "oracle":
        assert sum(1 for d in drops if d) >= 3, "no finish landed inside an accepted draft run"
