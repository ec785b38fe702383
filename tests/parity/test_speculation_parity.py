"""Speculation on == off: greedy output identical with drafting forced on every step it can."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from fulmine import LLM, SamplingParams
from tests.conftest import draft_always

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    "Numbers: 0 1 2 3 4 5 6 7 8 9. Numbers: 0 1 2 3",
    "def main(): return 42",
]


def forced(llm: LLM) -> LLM:
    governor = llm.engine.governor
    assert governor is not None
    draft_always(governor)
    governor.proposer.min_n = 1  # random tiny models rarely repeat 2-grams: draft from single tokens too
    return llm


class OracleProposer:
    """Drafts the true greedy continuation (from a run without speculation), every other proposal
    with its third token wrong, so verification both accepts and rejects in every batch shape."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]]) -> None:
        self.continuations = continuations
        self.calls = 0

    def propose(self, request_id: str, tokens: list[int], k: int) -> list[int]:
        for prompt, output in self.continuations.items():
            if tuple(tokens[: len(prompt)]) == prompt and tokens[len(prompt) :] == output[: len(tokens) - len(prompt)]:
                drafts = output[len(tokens) - len(prompt) : len(tokens) - len(prompt) + k]
                self.calls += 1
                if self.calls % 2 and len(drafts) >= 3:
                    drafts[2] = (drafts[2] + 1) % 50
                return drafts
        return []

    def release(self, request_id: str) -> None:
        pass


@pytest.mark.parametrize("family", ["llama", "mistral_window", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("weights", [{"weight_dtype": "float32"}, {"quantization": "int4"}], ids=["float32", "int4"])
def test_greedy_is_identical_with_speculation(tiny_model_factory, family: str, weights: dict) -> None:
    if family == "gemma3" and "quantization" in weights:
        weights = {"weight_dtype": "float32"}  # (same test; gemma runs the PyTorch layers either way)
    path = str(tiny_model_factory(family))
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),  # max_tokens inside a draft run
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[" fox", "4 5"]),
    ]
    plain = LLM(path, dtype="float32", speculative="off", progress=False, **weights)
    spec = forced(LLM(path, dtype="float32", num_speculative_tokens=5, progress=False, **weights))
    for p in params:
        expected = plain.generate(PROMPTS, p)
        governor = spec.engine.governor
        assert governor is not None
        governor.proposer = OracleProposer(  # type: ignore[assignment]
            {tuple(o.prompt_token_ids): o.token_ids for o in expected}
        )
        got = spec.generate(PROMPTS, p)  # all three batched: drafts of several requests in one step
        assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [
            (o.token_ids, o.text, o.finish_reason) for o in expected
        ]
    assert 0 < governor.num_accepted < governor.num_drafted


@pytest.mark.slow
def test_embedded_model_greedy_is_identical_with_speculation() -> None:
    chat = [{"role": "user", "content": "Repeat exactly: red, green, blue, red, green, blue, red, green, blue."}]
    params = SamplingParams(temperature=0.0, max_tokens=48)
    expected = LLM(speculative="off", progress=False).chat(chat, params)
    spec = forced(LLM(progress=False))
    got = spec.chat(chat, params)
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert spec.engine.governor is not None and spec.engine.governor.num_accepted > 0


def test_seeded_sampling_is_unchanged_by_speculation(tiny_llama) -> None:
    params = SamplingParams(temperature=0.9, seed=7, max_tokens=24, ignore_eos=True)
    plain = LLM(str(tiny_llama), dtype="float32", speculative="off", progress=False)
    spec = forced(LLM(str(tiny_llama), dtype="float32", progress=False))
    assert spec.generate(PROMPTS, params)[0].token_ids == plain.generate(PROMPTS, params)[0].token_ids


def chi_square(a: list, b: list) -> tuple[float, int]:
    """Two-sample chi-square statistic of two equal-sized samples of categories, with its degrees of
    freedom (categories expected fewer than 5 times in both pooled into one)."""
    counts_a, counts_b = Counter(a), Counter(b)
    common = [c for c in set(a) | set(b) if counts_a[c] + counts_b[c] >= 10]
    rest_a, rest_b = len(a) - sum(counts_a[c] for c in common), len(b) - sum(counts_b[c] for c in common)
    cells = [(counts_a[c], counts_b[c]) for c in common] + ([(rest_a, rest_b)] if rest_a + rest_b else [])
    statistic = sum((x - y) ** 2 / (x + y) for x, y in cells)
    return statistic, len(cells) - 1


def chi_square_critical(df: int, z: float = 3.29) -> float:
    """The chi-square value exceeded with probability ~0.0005 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampled_tokens_keep_their_distribution_with_speculation(tiny_llama) -> None:
    """Unseeded sampling with drafts verified: the tokens are drawn from the same distribution as
    without drafts. The oracle drafts the greedy continuation after each likely first token, so
    nearly every answer verifies two drafts: a verifier that favoured them would skew positions 1
    and 2 toward them, one that rejected too often, away."""
    prompt, n = PROMPTS[1], 2000
    params = SamplingParams(temperature=1.0, top_k=4, max_tokens=4, ignore_eos=True)  # room for 2 drafts
    plain = LLM(str(tiny_llama), dtype="float32", speculative="off", progress=False)
    spec = LLM(str(tiny_llama), dtype="float32", num_speculative_tokens=2, progress=False)
    without = [o.token_ids for o in plain.generate([prompt] * n, params)]
    prompt_ids = tuple(plain.engine.encode_prompt(prompt))
    greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    continuations = {}
    for first in sorted({t[0] for t in without}):
        after = plain.generate([list(prompt_ids) + [first]], greedy)[0].token_ids
        continuations[prompt_ids + (first,)] = after
    governor = draft_always(spec.engine.governor)
    governor.proposer = OracleProposer(continuations)
    with_drafts = [o.token_ids for o in spec.generate([prompt] * n, params)]
    assert all(len(t) == 4 for t in without + with_drafts)
    assert governor.num_drafted > n and 0 < governor.num_accepted < governor.num_drafted
    for name, key in (
        ("first", lambda t: t[0]),
        ("second", lambda t: t[1]),
        ("third", lambda t: t[2]),
        ("first two", lambda t: (t[0], t[1])),
        ("last two", lambda t: (t[1], t[2])),
    ):
        statistic, df = chi_square([key(t) for t in without], [key(t) for t in with_drafts])
        assert df >= 2, "top_k=4 leaves several likely tokens at every position"
        assert statistic < chi_square_critical(df), (name, statistic, df)


@pytest.mark.parametrize("draft_family", ["llama", "qwen2"])
def test_draft_model_speculation_is_identical(tiny_model_factory, draft_family: str) -> None:
    """The target as its own draft accepts every draft; another model (same tokenizer) accepts some."""
    target, draft = str(tiny_model_factory("llama")), str(tiny_model_factory(draft_family))
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    plain = LLM(target, dtype="float32", speculative="off", progress=False)
    spec = LLM(
        target, dtype="float32", speculative="draft", draft_model=draft, num_speculative_tokens=4, progress=False
    )
    governor = spec.engine.governor
    assert governor is not None
    draft_always(governor)
    expected = [o.token_ids for o in plain.generate(PROMPTS, params)]
    assert [o.token_ids for o in spec.generate(PROMPTS, params)] == expected
    assert governor.num_drafted > 0
    if draft_family == "llama":
        assert governor.num_accepted == governor.num_drafted
    spec.generate(PROMPTS[0], params)  # a request after others: the draft's cache was freed and reused


def test_draft_model_must_share_the_vocabulary(tiny_llama) -> None:
    from fulmine.config import ConfigError
    from fulmine.models.source import default_model_path

    with pytest.raises(ConfigError, match="tokenizer"):
        LLM(str(tiny_llama), speculative="draft", draft_model=str(default_model_path()), progress=False)
    with pytest.raises(ConfigError, match="draft-model"):
        LLM(str(tiny_llama), speculative="draft", progress=False)
