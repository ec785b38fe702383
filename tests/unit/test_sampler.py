"""Sampler statistics with fixed seeds, truncation rules, penalties and logprobs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fulmine import kernels
from fulmine.request import SamplingParams
from fulmine.sampling.sampler import Sampler, SamplingBatch, _apply_penalties

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
VOCAB = len(PROBS)


@pytest.fixture(params=["c", "torch"])
def make_sampler(request: pytest.FixtureRequest) -> Callable[[int], Sampler]:
    """Both samplers: the C one (CPU with the kernels) and the PyTorch one (CUDA, or no kernels)."""
    if request.param == "c" and kernels.cpu() is None:
        pytest.skip("the C kernels are not built")

    def make(seed: int) -> Sampler:
        sampler = Sampler(torch.device("cpu"), seed)
        if request.param == "torch":
            sampler.kernel = None
        return sampler

    return make


def draw(
    make_sampler: Callable[[int], Sampler],
    params: SamplingParams,
    num_draws: int = 20000,
    seed: int = 0,
    logits: torch.Tensor | None = None,  # default: PROBS' logits
) -> torch.Tensor:
    """Sample `num_draws` rows of the same distribution in one batch; returns token frequencies."""
    logits = PROBS.log() if logits is None else logits
    vocab = logits.shape[-1]
    batch = SamplingBatch.build(
        [params] * num_draws, [None] * num_draws, [([], [])] * num_draws, vocab, torch.device("cpu")
    )
    tokens = make_sampler(seed)(logits.repeat(num_draws, 1), batch).token_ids
    return torch.bincount(tokens, minlength=vocab).float() / num_draws


def test_temperature_one_follows_the_distribution(make_sampler) -> None:
    freq = draw(make_sampler, SamplingParams(temperature=1.0))
    torch.testing.assert_close(freq, PROBS, atol=0.015, rtol=0)


def test_temperature_sharpens(make_sampler) -> None:
    freq = draw(make_sampler, SamplingParams(temperature=0.5))
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
def test_truncation_keeps_only_allowed_tokens_renormalized(
    make_sampler, params: SamplingParams, allowed: set[int]
) -> None:
    freq = draw(make_sampler, params)
    assert {int(i) for i in torch.nonzero(freq).flatten()} == allowed
    kept = torch.tensor(sorted(allowed))
    torch.testing.assert_close(freq[kept], PROBS[kept] / PROBS[kept].sum(), atol=0.015, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),  # llama.cpp's default chain
        SamplingParams(temperature=1.3, top_k=300, min_p=0.01),
        SamplingParams(temperature=1.0, top_p=0.5),
    ],
    ids=["t0.7-p0.9", "llama.cpp", "t1.3-k300-minp", "p0.5"],
)
@pytest.mark.skipif(kernels.cpu() is None, reason="the C kernels are not built")
def test_a_real_vocabulary_follows_the_exact_distribution(params: SamplingParams) -> None:
    """Over 2000 tokens with LM-like logits, the C sampler's draws follow the distribution
    `_probabilities` defines (temperature, then top-k, top-p on that, min-p), support included.
    (The PyTorch sampler draws from `_probabilities` itself.)"""
    logits = _lm_logits()
    batch = SamplingBatch.build([params], [None], [([], [])], 2000, torch.device("cpu"))
    exact = Sampler(torch.device("cpu"), 0)._probabilities(logits.unsqueeze(0).clone(), batch)[0]
    exact = exact / exact.sum()
    freq = draw(lambda seed: Sampler(torch.device("cpu"), seed), params, num_draws=40000, logits=logits)
    assert set(torch.nonzero(freq).flatten().tolist()) <= set(torch.nonzero(exact).flatten().tolist())
    assert 0.5 * (freq - exact).abs().sum() < 0.03  # total variation, 40k draws


def _lm_logits() -> torch.Tensor:
    """2000 logits shaped like a language model's: a few likely tokens, a long tail, some ties."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, generator=g) * 2.5
    logits[:5] += torch.tensor([9.0, 8.5, 8.5, 7.0, 6.0])
    logits[100:110] = logits[100]  # a tie
    return logits


def test_seeded_rows_ignore_the_shared_generator_and_batch_company(make_sampler) -> None:
    logits = torch.randn(3, 50)
    seeded, unseeded = SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0)

    def run(shared_seed: int, params: list[SamplingParams]) -> list[int]:
        gens = [torch.Generator().manual_seed(5) if p.seed is not None else None for p in params]
        batch = SamplingBatch.build(params, gens, [([], [])] * 3, 50, torch.device("cpu"))
        return make_sampler(shared_seed)(logits.clone(), batch).token_ids.tolist()

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


def test_logit_bias_can_force_or_forbid_a_token(make_sampler) -> None:
    forced = draw(make_sampler, SamplingParams(temperature=1.0, logit_bias={3: 100.0}), num_draws=1000)
    assert forced[3] == 1.0
    forbidden = draw(make_sampler, SamplingParams(temperature=0.0, logit_bias={0: -100.0}), num_draws=10)
    assert forbidden[0] == 0.0 and forbidden[1] == 1.0


@pytest.mark.skipif(kernels.cpu() is None, reason="the C kernels are not built")
def test_c_penalties_and_bias_equal_the_pytorch_ones() -> None:
    """The C sampler adjusts the logits (in place) exactly as the PyTorch path does: bias, then the
    repetition penalty over prompt and output, frequency and presence over the output."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 3
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(temperature=0.8, logit_bias={5: 2.5, 299: -100.0}),
        SamplingParams(temperature=0.0),  # untouched
        SamplingParams(temperature=1.0, repetition_penalty=0.8, frequency_penalty=-1.0, logit_bias={7: 1.0}),
    ]
    histories = [([1, 2, 2, 3], [3, 3, 4, 250]), ([9], [9, 10]), ([1], [1]), ([7, 8, 8], [8, 299, 7, 7])]
    batch = SamplingBatch.build(params, [None] * 4, histories, 300, torch.device("cpu"))
    expected = logits + batch.logit_bias
    expected = _apply_penalties(expected, batch)
    adjusted = logits.clone()
    Sampler(torch.device("cpu"), 0)(adjusted, batch)
    torch.testing.assert_close(adjusted, expected)


class _FixedMask:
    """A stand-in for a grammar matcher whose mask allows a fixed set of tokens."""

    def __init__(self, allowed: list[int], vocab: int) -> None:
        bits = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        for token in allowed:
            bits[token // 32] |= torch.tensor(1 << (token % 32)).to(torch.int32)
        self.bits = bits

    def unsafe_compute_mask_ptr(self, ptr: int, nbytes: int) -> None:
        import ctypes

        ctypes.memmove(ptr, self.bits.data_ptr(), nbytes)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e-3, 1e-30])
@pytest.mark.parametrize("extra", [{}, {"top_k": 3}, {"top_p": 1e-30}, {"min_p": 1.0}])
def test_a_masked_token_is_never_drawn_whatever_the_penalties(make_sampler, temperature: float, extra: dict) -> None:
    """A grammar's mask holds however extreme the other parameters: a repetition penalty so small
    that a penalized logit overflows float32 (the fuzzer found a 500 there: `repetition_penalty`
    1e-38 drew a token outside the grammar), a temperature that overflows the exp."""
    from fulmine.sampling.grammar import MaskEntry, TokenMasks

    vocab, allowed, rows = 300, [5, 17, 290], 8
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1)) * 4
    logits[:, 5] = 6.0  # in the history: the penalty would push it to inf
    params = [SamplingParams(temperature=temperature, repetition_penalty=1e-40, **extra)] * rows
    history = (list(range(0, vocab, 3)) + [5], [5, 17, 200])
    batch = SamplingBatch.build(params, [None] * rows, [history] * rows, vocab, torch.device("cpu"))
    ids = [f"r{i}" for i in range(rows)]
    batch.token_masks = TokenMasks({i: MaskEntry(_FixedMask(allowed, vocab), []) for i in ids}, vocab)
    batch.row_ids = ids
    tokens = make_sampler(0)(logits, batch).token_ids.tolist()
    assert set(tokens) <= set(allowed), tokens
