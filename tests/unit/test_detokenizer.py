"""Incremental detokenization: the stream equals the final text, multibyte UTF-8 and stop strings included."""

from __future__ import annotations

import pytest

from fulmine.engine.detokenizer import IncrementalDetokenizer
from fulmine.models.source import resolve
from fulmine.tokenizer import load_tokenizer

TEXTS = [
    "Plain ASCII, with  double spaces and\nnewlines.",
    "Accents: café, naïve, Ångström, Žižek.",
    "CJK: 東京は日本の首都です。中文测试。",
    "Emoji: 🎉🚀👩‍👩‍👧 and flags 🇮🇹",
    "Mixed: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑ x² → ∞",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve(None))


def stream(tokenizer, ids: list[int], stop: list[str] | None = None) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello"), stop or [])
    pieces = []
    stopped = False
    for token_id in ids:
        stopped = detok.add_token(token_id)
        pieces.append(detok.release(finished=stopped))
        if stopped:
            break
    if not stopped:
        detok.flush()
        pieces.append(detok.release(finished=True))
    return pieces, detok.text


@pytest.mark.parametrize("text", TEXTS)
def test_stream_concatenates_to_the_decoded_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    pieces, final = stream(tokenizer, ids)
    assert "".join(pieces) == final == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)  # never a half character


def test_a_multibyte_character_split_across_tokens_waits_for_its_last_byte(tokenizer) -> None:
    ids = tokenizer.encode("🎉")
    assert len(ids) > 1  # byte-level BPE splits this emoji
    pieces, _ = stream(tokenizer, ids)
    assert pieces[: len(ids) - 1] == [""] * (len(ids) - 1) and pieces[len(ids) - 1] == "🎉"


def test_stop_string_cuts_the_text_and_is_never_streamed(tokenizer) -> None:
    ids = tokenizer.encode("one two three STOP four five")
    pieces, final = stream(tokenizer, ids, stop=["STOP", "never"])
    assert final == "one two three "
    assert "".join(pieces) == final


def test_stop_string_spanning_tokens(tokenizer) -> None:
    ids = tokenizer.encode("alpha<|end|>beta")
    pieces, final = stream(tokenizer, ids, stop=["<|end|>"])
    assert final == "alpha" and "".join(pieces) == final


def test_unfinished_character_is_flushed_at_the_end(tokenizer) -> None:
    ids = tokenizer.encode("ok 🎉")[:-1]  # cut inside the emoji
    pieces, final = stream(tokenizer, ids)
    assert "".join(pieces) == final == tokenizer.decode(ids)
