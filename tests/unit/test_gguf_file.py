"""Broken GGUF files are refused with one clear error naming the file and what is wrong, never a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from fulmine.config import ConfigError
from fulmine.models.source import default_model_path, resolve


def test_a_truncated_file_names_the_first_tensor_it_cuts(tmp_path: Path) -> None:
    data = default_model_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"cut.gguf is not a readable GGUF file: truncated: tensor 'blk\.\d+\."):
        resolve(str(cut))


@pytest.mark.parametrize(
    "content",
    [b"", b"GGUF\x03\x00", b"GGML" + b"\x00" * 64, b"GGUF" + b"\xff" * 100, b"GGUF\x01\x00\x00\x00" + b"\x00" * 16],
    ids=["empty", "short", "magic", "garbage", "version-1"],
)
def test_a_file_that_is_not_gguf_is_refused_clearly(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match="bad.gguf is not a readable GGUF file"):
        resolve(str(bad))
