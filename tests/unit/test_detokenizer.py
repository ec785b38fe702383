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


def assert_same_tokenizer(ours, theirs) -> None:
    """Same ids, same text back (with and without special tokens), same special tokens and chat prompt."""
    for text in [*TEXTS, " leading space", "def f(x):\n\treturn x  # ok", "<|im_start|><bos>"]:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        theirs.pad_token_id,
    )
    assert ours.chat_template == theirs.chat_template
    if theirs.chat_template is not None:
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
        assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == theirs.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False
        )


def test_the_cached_tokenizer_reads_as_transformers_converts_it(tokenizer) -> None:
    """fulmine reads its cached conversion of a GGUF tokenizer directly; transformers' own reading of the
    GGUF file gives the same tokenizer."""
    from transformers import AutoTokenizer

    from fulmine.tokenizer import Tokenizer, cached_tokenizer_dir

    path = resolve(None).path
    assert (cached_tokenizer_dir(path) / "tokenizer.json").is_file()  # the fixture converted it
    ours = Tokenizer.from_directory(cached_tokenizer_dir(path))
    assert_same_tokenizer(ours, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


def test_the_first_conversion_is_transformers_own() -> None:
    """A vocabulary gguf_tokenizer.py does not build is converted by the class AutoTokenizer would
    pick, called directly (AutoTokenizer reads the whole file first to learn it): the same tokenizer."""
    from transformers import AutoTokenizer

    from fulmine.tokenizer import _from_gguf

    source = resolve(None)
    assert_same_tokenizer(
        _from_gguf(source), AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
    )
