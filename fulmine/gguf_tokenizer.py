"""A GGUF file's tokenizer built straight from its vocabulary, merges and token types with the Rust
`tokenizers` library: no transformers to import and no pass over the file's whole metadata.

Built as transformers' GGUF conversion builds it (tests compare the two on every file at hand), for
the two kinds of vocabulary the families fulmine serves use:
- byte-level BPE (`tokenizer.ggml.model` gpt2: SmolLM2, Llama 3, Qwen 2/2.5/3, the R1 distills):
  the file's merges, and the pre-tokenizer's split for the `tokenizer.ggml.pre` it names;
- Gemma's sentencepiece BPE (model llama, architectures gemma*): no merges in the file, so they are
  recovered from the vocabulary, ranked by the tokens' order; byte fallback for the rest.
Control tokens become special added tokens, user-defined ones (`<think>`) plain added tokens, both
matched whole. `build` returns None for any other kind, which transformers then converts.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from fulmine.models.gguf_file import GGUFFile

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# the regex that splits text before byte-level BPE, by the file's tokenizer.ggml.pre; any other
# name: GPT-2's own split (the byte-level pre-tokenizer's)
SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def build(gguf: GGUFFile) -> tuple[Any, dict[str, str], str | None] | None:
    """(tokenizers.Tokenizer, special tokens by role, chat template), or None for a vocabulary of
    another kind."""
    meta = gguf.metadata
    kind, architecture = meta.get("tokenizer.ggml.model"), meta.get("general.architecture")
    tokens = list(meta.get("tokenizer.ggml.tokens") or ())
    if not tokens:
        return None
    if kind == "gpt2" and meta.get("tokenizer.ggml.merges") is not None:
        backend, vocab = _byte_level(tokens, meta)
    elif kind == "llama" and architecture in GEMMA_ARCHITECTURES:
        # runs of spaces spelled as the model's vocabulary spells them (the added tokens keep the file's)
        backend, vocab = _gemma(["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens])
    else:
        return None
    _add_tokens(backend, vocab, tokens, meta, byte_level=kind == "gpt2")
    special = {
        role: tokens[int(meta[key])]
        for role, key in _SPECIAL_IDS.items()
        if meta.get(key) is not None and 0 <= int(meta[key]) < len(tokens)
    }
    _post_process(backend, special, meta, default_bos=kind == "llama")
    template = meta.get("tokenizer.chat_template")
    return backend, special, template if isinstance(template, str) else None


_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters (byte-level vocabularies spell tokens in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _byte_level(tokens: list[str], meta: dict[str, Any]) -> tuple[Any, dict[str, int]]:
    """The byte-level BPE model and its vocabulary (tokens spelled in GPT-2's byte alphabet)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = SPLITS.get(str(meta.get("tokenizer.ggml.pre")))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


def _gemma(tokens: list[str]) -> tuple[Any, dict[str, int]]:
    """Gemma's sentencepiece BPE model and its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab, _merges(vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, vocab


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """A sentencepiece vocabulary's merges: every split of a token into two tokens, the earlier
    token's first (Gemma's file order is its merge order; its scores are not), and a token's
    splits with the longer left piece first (transformers' ranking)."""
    ranked = [
        (rank, -cut, left, right)
        for token, rank in vocab.items()
        for cut in range(1, len(token))
        if (left := token[:cut]) in vocab and (right := token[cut:]) in vocab
    ]
    ranked.sort(key=lambda m: (m[0], m[1]))
    return [(left, right) for _, _, left, right in ranked]


def _add_tokens(backend: Any, vocab: dict[str, int], tokens: list[str], meta: dict[str, Any], byte_level: bool) -> None:
    """The file's control tokens as special added tokens, its user-defined ones that the model's
    vocabulary spells as the file does as plain added tokens (both matched whole)."""
    from tokenizers import AddedToken

    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return
    types = [int(t) for t in types]
    alphabet = set(_byte_alphabet().values()) if byte_level else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, types)
        if kind == CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    user = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, types)
        if kind == USER_DEFINED and token in vocab
    ]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _post_process(backend: Any, special: dict[str, str], meta: dict[str, Any], default_bos: bool) -> None:
    """BOS (and EOS) around every encoded text where the file asks (sentencepiece files that do not
    say: BOS, as llama.cpp does)."""
    from tokenizers import processors

    bos = special.get("bos_token") if meta.get("tokenizer.ggml.add_bos_token", default_bos) else None
    eos = special.get("eos_token") if meta.get("tokenizer.ggml.add_eos_token", False) else None
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    pieces = [(t, backend.token_to_id(t)) for t in dict.fromkeys(t for t in (bos, eos) if t)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pieces)
