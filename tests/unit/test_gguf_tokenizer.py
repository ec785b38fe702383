"""A GGUF file's tokenizer built straight from its vocabulary equals transformers' conversion of it:
the same tokenizer.json (model, merges in order, pre-tokenizer, decoder, added tokens, post-processor)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fulmine import gguf_tokenizer
from fulmine.models.gguf_file import GGUFFile
from fulmine.models.source import resolve
from fulmine.tokenizer import Tokenizer, _from_gguf


def assert_built_as_transformers_converts(path: Path) -> None:
    source = resolve(str(path))
    assert source.gguf is not None
    built = gguf_tokenizer.build(source.gguf)
    assert built is not None
    ours: dict[str, Any] = json.loads(built[0].to_str())
    theirs_tokenizer = _from_gguf(source)
    theirs: dict[str, Any] = json.loads(Tokenizer.from_transformers(theirs_tokenizer).to_json())
    added = ours.pop("added_tokens"), theirs.pop("added_tokens")
    assert sorted(added[0], key=lambda t: t["id"]) == sorted(added[1], key=lambda t: t["id"])
    assert ours == theirs
    special = {k: v for k, v in theirs_tokenizer.special_tokens_map.items() if k != "mask_token"}
    assert built[1] == special and built[2] == theirs_tokenizer.chat_template


def test_the_embedded_models_tokenizer() -> None:
    """(The real files: tests/parity/test_real_models.py.)"""
    assert_built_as_transformers_converts(resolve(None).path)


def test_other_kinds_are_left_to_transformers(tmp_path: Path) -> None:
    """A vocabulary this module does not build (a Llama 2 sentencepiece one, a T5 unigram one): None."""
    import gguf
    import numpy as np

    for model, architecture in (("llama", "llama"), ("t5", "t5")):
        path = tmp_path / f"{model}.gguf"
        writer = gguf.GGUFWriter(str(path), architecture)
        writer.add_tokenizer_model(model)
        writer.add_token_list(["<unk>", "<s>", "</s>", "\u2581a"])
        writer.add_token_scores([0.0, 0.0, 0.0, -1.0])
        writer.add_tensor("x", np.zeros(4, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert gguf_tokenizer.build(GGUFFile(path)) is None
