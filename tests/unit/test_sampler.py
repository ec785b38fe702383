"""Sampler statistics with fixed seeds, truncation rules, penalties and logprobs."""

from __future__ import annotations

import pytest
import torch

from fulmine.request import SamplingParams
from fulmine.sampling.sampler import Sampler, SamplingBatch, _apply_penalties

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
VOCAB = len(PROBS)


def draw(params: SamplingParams, num_draws: int = 20000, seed: int = 0) -> torch.Tensor:
    """Sample `num_draws` rows of the same distribution in one batch; returns token counts."""
    sampler = Sampler(torch.device("cpu"), seed)
    batch = SamplingBatch.build(
        [params] * num_draws, [None] * num_draws, [([], [])] * num_draws, VOCAB, torch.device("cpu")
    )
    logits = PROBS.log().repeat(num_draws, 1)
    tokens = sampler(logits, batch).token_ids
    return torch.bincount(tokens, minlength=VOCAB).float() / num_draws


def test_temperature_one_follows_the_distribution() -> None:
    freq = draw(SamplingParams(temperature=1.0))
    torch.testing.assert_close(freq, PROBS, atol=0.015, rtol=0)


def test_temperature_sharpens() -> None:
    freq = draw(SamplingParams(temperature=0.5))
    expected = torch.softmax(PROBS.log() / 0.5, dim=0)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.8), {0, 1}),  # 0.5 + 0.3 reaches 0.8
        (SamplingParams(temperature=1.0, top_p=0.81), {0, 1, 2}),
        (SamplingParams(temperature=1.0, min_p=0.5), {0, 1}),  # keeps p >= 0.25
        (SamplingParams(temperature=0.0), {0}),
    ],
)
def test_truncation_keeps_only_allowed_tokens_renormalized(params: SamplingParams, allowed: set[int]) -> None:
    freq = draw(params)
    assert {int(i) for i in torch.nonzero(freq).flatten()} == allowed
    kept = torch.tensor(sorted(allowed))
    torch.testing.assert_close(freq[kept], PROBS[kept] / PROBS[kept].sum(), atol=0.015, rtol=0)


def test_seeded_rows_ignore_the_shared_generator_and_batch_company() -> None:
    logits = torch.randn(3, 50)
    seeded, unseeded = SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0)

    def run(shared_seed: int, params: list[SamplingParams]) -> list[int]:
        gens = [torch.Generator().manual_seed(5) if p.seed is not None else None for p in params]
        batch = SamplingBatch.build(params, gens, [([], [])] * 3, 50, torch.device("cpu"))
        return Sampler(torch.device("cpu"), shared_seed)(logits.clone(), batch).token_ids.tolist()

    all_seeded = run(1, [seeded] * 3)
    assert all_seeded == run(2, [seeded] * 3)
    assert run(3, [seeded, unseeded, unseeded])[0] == all_seeded[0]


def test_penalties_follow_their_definitions() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    batch = SamplingBatch.build([params], [None], [([0], [1, 1, 3])], VOCAB, torch.device("cpu"))
    out = _apply_penalties(logits.clone(), batch)
    # token 0: prompt only -> 2/2; token 1: output x2 -> -1*2 - 0.25*2 - 0.5; token 2: untouched;
    # token 3: output x1 -> 3/2 - 0.25 - 0.5
    torch.testing.assert_close(out, torch.tensor([[1.0, -3.0, 0.5, 0.75]]))


def test_logprobs_are_the_models_before_penalties() -> None:
    logits = torch.randn(2, 10)
    params = SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5)
    batch = SamplingBatch.build([params] * 2, [None] * 2, [([1], [2])] * 2, 10, torch.device("cpu"))
    out = Sampler(torch.device("cpu"), 0)(logits.clone(), batch)
    expected = logits.log_softmax(-1)
    assert out.logprobs is not None and out.top_logprobs is not None and out.top_ids is not None
    torch.testing.assert_close(out.logprobs, expected.gather(1, out.token_ids[:, None])[:, 0])
    torch.testing.assert_close(out.top_logprobs, expected.topk(3, dim=-1).values)


def test_logit_bias_can_force_or_forbid_a_token() -> None:
    forced = draw(SamplingParams(temperature=1.0, logit_bias={3: 100.0}), num_draws=1000)
    assert forced[3] == 1.0
    forbidden = draw(SamplingParams(temperature=0.0, logit_bias={0: -100.0}), num_draws=10)
    assert forbidden[0] == 0.0 and forbidden[1] == 1.0
