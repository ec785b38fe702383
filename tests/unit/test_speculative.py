"""Speculative decoding parts without a model: the n-gram proposer, the governor, the rejection sampler."""

from __future__ import annotations

import pytest
import torch

from fulmine.executors.cost_model import StepShape
from fulmine.request import Request, SamplingParams
from fulmine.sampling.sampler import Sampler, SamplingBatch
from fulmine.speculative.governor import Governor, expected_tokens
from fulmine.speculative.ngram import NgramIndex
from tests.conftest import draft_always


def test_ngram_continues_the_latest_longest_match() -> None:
    index = NgramIndex(2, 4)
    tokens = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    assert index.propose(tokens, 3) == [4, 5, 9]
    tokens += [4]
    assert index.propose(tokens, 3) == [5, 9, 9]  # the index grew by the new token only
    assert NgramIndex(2, 4).propose([7, 8, 9], 3) == []  # no earlier occurrence
    # the longest n-gram wins over a more recent shorter one
    assert NgramIndex(1, 3).propose([5, 6, 7, 1, 7, 8, 5, 6, 7], 2) == [1, 7]


def test_expected_tokens() -> None:
    assert expected_tokens(0.5, 0) == 1
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-9


def request(tokens: list[int], **params) -> Request:
    return Request("r", tokens, SamplingParams(temperature=0.0, max_tokens=100, **params), (), 1000)


def test_governor_drafts_when_it_pays_and_stops_when_it_does_not() -> None:
    governor = Governor(4)
    for _ in range(20):  # steps cost 10 ms + 1 ms per token: drafting is cheap
        governor.cost.observe(StepShape(1, 1), 0.011)
        governor.cost.observe(StepShape(5, 5), 0.015)
    repetitive = request([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3])
    for _ in range(10):  # every draft accepted
        drafts = governor.drafts(repetitive, 4, 1)
        governor.observe("r", [*drafts, 0])
    assert len(governor.drafts(repetitive, 4, 1)) == 4
    governor.observe("r", [99])  # the first draft rejected
    for _ in range(30):  # drafts keep failing: the governor turns drafting off ...
        drafts = governor.drafts(repetitive, 4, 1)
        governor.observe("r", [99])
    assert governor.drafts(repetitive, 4, 1) == []
    for _ in range(30):  # ... yet keeps scoring a one-token shadow proposal, so it turns back on
        governor.drafts(repetitive, 4, 1)
        governor.observe("r", [4])
    assert governor.drafts(repetitive, 4, 1)


def test_governor_does_not_draft_when_verification_is_expensive() -> None:
    governor = Governor(4)
    for _ in range(20):  # each extra token costs as much as a whole step
        governor.cost.observe(StepShape(1, 1), 0.010)
        governor.cost.observe(StepShape(3, 3), 0.030)
    repetitive = request([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3])
    for _ in range(10):
        governor.drafts(repetitive, 4, 1)
        governor.observe("r", [4, 1, 2])  # 80 %+ acceptance is still not enough
    assert governor.drafts(repetitive, 4, 1) == []


def test_governor_skips_requests_it_would_change() -> None:
    governor = Governor(4)
    draft_always(governor)
    tokens = [1, 2, 3, 1, 2]
    assert governor.drafts(request(tokens), 4, 1) == [3, 1, 2]
    assert governor.drafts(request(tokens, repetition_penalty=1.2), 4, 1) == []
    assert governor.drafts(request(tokens, logprobs=2), 4, 1) == []
    seeded = Request("s", tokens, SamplingParams(temperature=0.8, seed=3, max_tokens=9), (), 1000)
    assert governor.drafts(seeded, 4, 1) == []


@pytest.mark.parametrize("kernel", ["c", "torch"])
@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0.7, min_p=0.3)], ids=["k5", "minp"]
)
def test_rejection_sampling_preserves_the_distribution(kernel: str, params: SamplingParams) -> None:
    """Draws through verification (draft accepted or replaced) follow the same law as plain draws,
    with the C sampler and the PyTorch one."""
    torch.manual_seed(0)
    vocab, rows = 6, 60_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5]).repeat(rows, 1)
    batch = SamplingBatch.build([params] * rows, [None] * rows, [([0], [])] * rows, vocab, torch.device("cpu"))
    expected = Sampler(torch.device("cpu"), 0)._probabilities(logits[:1].clone(), batch)[0]
    sampler = Sampler(torch.device("cpu"), seed=1)
    if kernel == "torch":
        sampler.kernel = None
    elif sampler.kernel is None:
        pytest.skip("the C kernels are not built")
    for draft in (0, 2, 4):  # a likely draft, an unlikely one, one that truncation removes
        out = sampler(logits.clone(), batch, torch.full((rows,), draft))
        empirical = torch.bincount(out.token_ids, minlength=vocab).float() / rows
        assert out.accepted is not None
        assert (empirical - expected).abs().max() < 0.01, (draft, empirical, expected)
        assert abs(out.accepted.float().mean() - expected[draft]) < 0.01


def test_greedy_verification_accepts_exactly_the_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    batch = SamplingBatch.build(
        [SamplingParams(temperature=0.0)] * 3, [None] * 3, [([0], [])] * 3, 3, torch.device("cpu")
    )
    out = Sampler(torch.device("cpu"), 0)(logits, batch, torch.tensor([1, 2, -1]))
    assert out.token_ids.tolist() == [1, 0, 2] and out.accepted is not None
    assert out.accepted.tolist() == [True, False, False]


def test_truncation_by_hand() -> None:
    """The reference law the tests above compare with, checked by hand: temperature, then the top k."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]])
    params = SamplingParams(temperature=0.7, top_k=5)
    batch = SamplingBatch.build([params], [None], [([0], [])], 6, torch.device("cpu"))
    scaled = logits[0] / params.temperature
    by_hand = torch.softmax(scaled.masked_fill(scaled < scaled.topk(5).values[-1], float("-inf")), dim=-1)
    torch.testing.assert_close(Sampler(torch.device("cpu"), 0)._probabilities(logits, batch)[0], by_hand)
