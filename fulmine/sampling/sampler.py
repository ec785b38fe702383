"""Batched sampling: penalties, temperature, top-k, top-p, min-p, seeded draws, logprobs.

On the CPU with fulmine's C kernels, logit bias, penalties and the draw (temperature, top-k,
top-p, min-p, draft verification; one token per row) are one C call over the batch
(kernels/sample.c: no sort of the vocabulary, no PyTorch thread pool woken between forwards);
only logprobs, when asked for, stay PyTorch ops.
Elsewhere everything runs as tensor ops over the whole batch on the logits' device; the only
host transfer is the caller's read of the result, and sampling draws by the exponential race
(argmax of p / E with E ~ Exp(1)), which equals a categorical draw and lets each seeded request
use its own generator. Either way a seeded request draws the same tokens alone or batched.

Speculative verification (`draft_ids`): a row whose next token was drafted accepts the draft if
it is the greedy choice, or, when sampling, with probability p(draft) under the row's final
distribution (a drafter that proposes one token with certainty); a rejected row draws from p with
the draft removed and renormalized. Together this samples exactly from p, so speculation changes
speed, never the distribution (tested statistically).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fulmine import kernels
from fulmine.request import SamplingParams
from fulmine.sampling.grammar import TokenMasks


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as device tensors."""

    temperature: torch.Tensor  # [num_rows], 1.0 on greedy rows
    is_greedy: torch.Tensor  # [num_rows] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [num_rows] int, vocab size where off
    max_top_k: int  # largest top_k in the batch, known on the host
    top_p: torch.Tensor | None  # [num_rows]
    min_p: torch.Tensor | None  # [num_rows]
    generators: list[torch.Generator | None]  # per row; None draws from the shared generator
    repetition_penalty: torch.Tensor | None = None  # [num_rows]
    presence_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    seen_mask: torch.Tensor | None = None  # [num_rows, vocab] bool: token in prompt or output
    output_counts: torch.Tensor | None = None  # [num_rows, vocab] float: occurrences in output
    num_logprobs: int | None = None  # max top alternatives asked by any row; None: no logprobs
    logit_bias: torch.Tensor | None = None  # [num_rows, vocab] added to the logits
    params: list[SamplingParams] = field(default_factory=list)  # per row, for the C sampler
    draw_indices: list[int] = field(default_factory=list)  # per row: index of the output token it draws
    histories: list[tuple[list[int], list[int]]] = field(default_factory=list)  # per row: (prompt, output) ids
    token_masks: TokenMasks | None = None  # the allowed tokens of constrained rows (sampling/grammar.py)
    row_ids: list[str] = field(default_factory=list)  # per row: its request id (with token_masks)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        token_ids: list[tuple[list[int], list[int]]],  # (prompt ids, output ids) per row
        vocab_size: int,
        device: torch.device,
        draw_indices: list[int] | None = None,  # per row: index of the output token it draws
        dense_tables: bool = True,  # [num_rows, vocab] bias and penalty tensors (the C sampler needs none)
    ) -> SamplingBatch:
        def column(values: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.is_greedy for p in params]
        batch = cls(
            temperature=column([1.0 if g else p.temperature for g, p in zip(greedy, params)]),
            is_greedy=column(greedy, torch.bool),
            all_greedy=all(greedy),
            top_k=column([min(p.top_k or vocab_size, vocab_size) for p in params], torch.long)
            if any(p.top_k for p in params)
            else None,
            max_top_k=min(vocab_size, max(p.top_k or vocab_size for p in params)),
            top_p=column([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None,
            min_p=column([p.min_p for p in params]) if any(p.min_p > 0.0 for p in params) else None,
            generators=generators,
            params=params,
            draw_indices=draw_indices or [len(output) for _, output in token_ids],
            histories=token_ids,
        )
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        batch.num_logprobs = max(wanted) if wanted else None
        if not dense_tables:
            return batch
        if any(p.logit_bias for p in params):
            bias = torch.zeros(len(params), vocab_size)
            for row, p in enumerate(params):
                if p.logit_bias:
                    bias[row, list(p.logit_bias)] = torch.tensor(list(p.logit_bias.values()))
            batch.logit_bias = bias.to(device)
        if any(p.has_penalties for p in params):
            batch.repetition_penalty = column([p.repetition_penalty for p in params])
            batch.presence_penalty = column([p.presence_penalty for p in params])
            batch.frequency_penalty = column([p.frequency_penalty for p in params])
            batch.seen_mask, batch.output_counts = _token_tables(token_ids, vocab_size, device)
        return batch


def _token_tables(
    token_ids: list[tuple[list[int], list[int]]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(seen mask over prompt + output, output counts), both [num_rows, vocab]."""

    def padded(lists: list[list[int]]) -> torch.Tensor:  # padding id = vocab_size, a spare column
        width = max(1, max(len(ids) for ids in lists))
        table = torch.full((len(lists), width), vocab_size, dtype=torch.long)
        for row, ids in enumerate(lists):
            table[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return table.to(device)

    num_rows = len(token_ids)
    outputs = padded([output for _, output in token_ids])
    counts = torch.zeros(num_rows, vocab_size + 1, device=device)
    counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=counts.dtype))
    seen = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, padded([prompt + output for prompt, output in token_ids]), True)
    return seen[:, :vocab_size], counts[:, :vocab_size]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [num_rows]
    logprobs: torch.Tensor | None = None  # [num_rows] logprob of the sampled token
    top_ids: torch.Tensor | None = None  # [num_rows, num_logprobs]
    top_logprobs: torch.Tensor | None = None  # [num_rows, num_logprobs]
    accepted: torch.Tensor | None = None  # [num_rows] bool: the row's draft was accepted (verification)


def logprobs_of(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> SamplerOutput:
    """Each row's logprob of its token, and the row's k most likely (when k > 0).

    logprobs: [num_rows, vocab] log-softmaxed; token_ids: [num_rows].
    """
    out = SamplerOutput(token_ids, logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1))
    if k > 0:
        out.top_logprobs, out.top_ids = logprobs.topk(k, dim=-1)
    return out


_MASK64 = 2**64 - 1


class Sampler:
    """On the CPU with fulmine's C kernels, sampled rows are drawn by the C sampler (kernels/sample.c)
    from counter-based random numbers: a seeded request's draw depends only on its seed and the index
    of the token drawn. Elsewhere (CUDA, no kernels) rows are drawn in PyTorch from per-request
    generators. Either way the same seed gives the same tokens, alone or batched."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.kernel = kernels.cpu() if device.type == "cpu" else None
        self._next_key = (seed * 0x9E3779B97F4A7C15) & _MASK64  # unseeded rows: a fresh key per draw

    def __call__(
        self, logits: torch.Tensor, batch: SamplingBatch, draft_ids: torch.Tensor | None = None
    ) -> SamplerOutput:
        """logits: [num_rows, vocab] float32 (modified in place); draft_ids: [num_rows], -1 where none."""
        # Logprobs report the model's distribution, before penalties and truncation.
        raw_logprobs = logits.log_softmax(dim=-1) if batch.num_logprobs is not None else None
        if self.kernel is not None:  # token masks, logit bias, penalties and the draw in one C call
            token_ids, accepted = self._kernel_draw(logits, batch, draft_ids)
        else:
            token_ids, accepted = self._torch_draw(logits, batch, draft_ids)
        out = SamplerOutput(token_ids)
        if raw_logprobs is not None and batch.num_logprobs is not None:
            out = logprobs_of(raw_logprobs, token_ids, batch.num_logprobs)
        out.accepted = accepted
        return out

    def _torch_draw(
        self, logits: torch.Tensor, batch: SamplingBatch, draft_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token per row, draft accepted per row) as tensor ops on the logits' device."""
        if batch.token_masks is not None:  # tokens a row's grammar does not allow: logit -inf
            batch.token_masks.apply(logits, batch.row_ids)
        if batch.logit_bias is not None:
            logits = logits + batch.logit_bias
        if batch.seen_mask is not None:
            logits = _apply_penalties(logits, batch)
        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
            return token_ids, None if draft_ids is None else token_ids == draft_ids
        probs = self._probabilities(logits, batch)
        token_ids = torch.where(batch.is_greedy, logits.argmax(dim=-1), self._draw(probs, batch.generators))
        if draft_ids is None:
            return token_ids, None
        return self._verify(logits, probs, batch, draft_ids, token_ids)

    def _verify(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        batch: SamplingBatch,
        draft_ids: torch.Tensor,
        sampled: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token per row, draft accepted per row); see the module docstring."""
        has_draft = draft_ids >= 0
        draft = draft_ids.clamp(min=0).unsqueeze(1)
        # Rows without a draft draw here too (the batch is verified as a whole), but from the shared
        # generator: a seeded row's own generator advances only by the draws its own tokens need,
        # so its tokens do not depend on whether its neighbours speculate.
        generators = [g if drafted else None for g, drafted in zip(batch.generators, has_draft.tolist())]
        uniform = torch.empty(probs.shape[0], device=probs.device)
        for row, generator in enumerate(generators):
            uniform[row : row + 1].uniform_(generator=generator if generator is not None else self.generator)
        accept_sampled = has_draft & (uniform < probs.gather(1, draft).squeeze(1))
        residual = self._draw(probs.scatter(1, draft, 0.0), generators)
        tokens = torch.where(has_draft, torch.where(accept_sampled, draft.squeeze(1), residual), sampled)
        greedy_ids = logits.argmax(dim=-1)
        accepted = torch.where(batch.is_greedy, greedy_ids == draft_ids, accept_sampled)
        return torch.where(batch.is_greedy, greedy_ids, tokens), accepted

    def _kernel_draw(
        self, logits: torch.Tensor, batch: SamplingBatch, draft_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token per row, draft accepted per row) by the C sampler: greedy rows take the argmax, the
        others draw from the distribution `_probabilities` describes, verifying their draft if any
        (see the module docstring)."""
        assert self.kernel is not None
        num_rows, vocab = logits.shape
        logits = logits.contiguous()
        keys = []
        for p, index in zip(batch.params, batch.draw_indices):
            if p.seed is not None:
                key = ((p.seed & _MASK64) * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03) & _MASK64
            else:
                key, self._next_key = self._next_key, (self._next_key + 1) & _MASK64
            keys.append(key - 2**64 if key >= 2**63 else key)  # the same 64 bits, as an int64
        temperature = torch.tensor([0.0 if p.is_greedy else p.temperature for p in batch.params])
        top_k = torch.tensor([min(p.top_k, vocab) for p in batch.params], dtype=torch.int32)
        top_p = torch.tensor([p.top_p for p in batch.params])
        min_p = torch.tensor([p.min_p for p in batch.params])
        key_tensor = torch.tensor(keys, dtype=torch.int64)
        drafts = draft_ids.contiguous() if draft_ids is not None else torch.full((num_rows,), -1, dtype=torch.int64)
        out = torch.empty(num_rows, dtype=torch.int64)
        accepted = torch.empty(num_rows, dtype=torch.bool)
        adjust = _adjustments(batch)  # referenced until the call returns: the kernel reads their memory
        self.kernel.sample(
            logits.data_ptr(), num_rows, vocab, temperature.data_ptr(), top_k.data_ptr(), top_p.data_ptr(),
            min_p.data_ptr(), key_tensor.data_ptr(), drafts.data_ptr(), out.data_ptr(), accepted.data_ptr(),
            *(0 if t is None else t.data_ptr() for t in adjust),
            0 if batch.token_masks is None else batch.token_masks.bits.shape[1],
        )  # fmt: skip
        return out, accepted if draft_ids is not None else None

    def _probabilities(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Each row's final distribution: temperature, top-k, top-p, min-p (greedy rows: temperature 1)."""
        # measured from each row's max first (softmax is shift-invariant): a large logit over a tiny
        # temperature must not overflow to inf, which would make the whole row NaN
        top = logits.max(dim=-1, keepdim=True).values.clamp(min=torch.finfo(logits.dtype).min)
        logits = (logits - top) / batch.temperature.unsqueeze(1)
        if batch.top_k is not None:
            logits = _top_k(logits, batch.top_k, batch.max_top_k)
        if batch.top_p is not None:
            logits = _top_p(logits, batch.top_p)
        probs = logits.softmax(dim=-1)
        if batch.min_p is not None:
            max_prob = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < batch.min_p.unsqueeze(1) * max_prob, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)  # verification reads p(draft): a true probability
        return probs

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One token per row from (unnormalized) probs, by the exponential race."""
        race = torch.empty_like(probs)
        if all(g is None for g in generators):
            race.exponential_(generator=self.generator)
        else:
            for row, generator in enumerate(generators):
                race[row].exponential_(generator=generator if generator is not None else self.generator)
        return (probs / race).argmax(dim=-1)


def _adjustments(batch: SamplingBatch) -> list[torch.Tensor | None]:
    """The C sampler's logit bias, penalty and token-mask inputs as flat arrays (see Adjust in
    kernels/sample.c): bias_off, bias_ids, bias_vals, hist_off, hist_ids, out_start, rep, pres, freq,
    mask_rows, masks (then the mask width in words, an int); None: none."""
    params = batch.params
    adjust: list[torch.Tensor | None] = [None] * 11
    if any(p.logit_bias for p in params):
        offsets, ids, values = [0], [], []
        for p in params:
            ids += list(p.logit_bias)
            values += list(p.logit_bias.values())
            offsets.append(len(ids))
        adjust[:3] = [
            torch.tensor(offsets, dtype=torch.int32),
            torch.tensor(ids, dtype=torch.int32),
            torch.tensor(values, dtype=torch.float32),
        ]
    if any(p.has_penalties for p in params):
        offsets, ids, starts = [0], [], []
        for p, (prompt, output) in zip(params, batch.histories):
            if p.has_penalties:  # rows without penalties keep an empty range
                ids += prompt
                ids += output
            starts.append(len(prompt) if p.has_penalties else 0)
            offsets.append(len(ids))
        adjust[3:] = [
            torch.tensor(offsets, dtype=torch.int32),
            torch.tensor(ids, dtype=torch.int32),
            torch.tensor(starts, dtype=torch.int32),
            torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32),
            torch.tensor([p.presence_penalty for p in params], dtype=torch.float32),
            torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32),
        ]
    if batch.token_masks is not None:
        rows = batch.token_masks.row_indices(batch.row_ids)
        adjust[9:] = [torch.tensor(rows, dtype=torch.int32), batch.token_masks.bits]
    return adjust


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    assert batch.seen_mask is not None and batch.output_counts is not None
    assert batch.repetition_penalty is not None
    assert batch.presence_penalty is not None and batch.frequency_penalty is not None
    rep = batch.repetition_penalty.unsqueeze(1)
    # a tiny repetition_penalty must not push a logit to inf (it would outweigh a grammar's mask)
    penalized = torch.where(logits > 0, logits / rep, logits * rep).clamp(max=torch.finfo(logits.dtype).max)
    logits = torch.where(batch.seen_mask, penalized, logits)
    counts = batch.output_counts
    logits = logits - batch.frequency_penalty.unsqueeze(1) * counts
    return logits - batch.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)


def _top_k(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    values = logits.topk(max_k, dim=-1).values  # [num_rows, max_k], descending
    kth = values.gather(1, (top_k.clamp(max=max_k) - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    # drop a token when the mass before it already reaches top_p; the first token always stays
    remove = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p.unsqueeze(1)
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
