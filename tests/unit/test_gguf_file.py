"""The GGUF reader: broken files are refused with one clear error naming the file and what is wrong,
never a crash; tensors are read into page-aligned memory."""

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


def test_weights_start_on_a_page() -> None:
    """Tensors read from the file, merged shards and interleaved copies start on a page boundary
    (numpy's own allocations start 16 bytes in: every 64-byte load would straddle two lines)."""
    import numpy as np
    import torch

    from fulmine import kernels
    from fulmine.layers.linear import _resident
    from fulmine.layers.weights import aligned_empty
    from tests.unit.test_kernels import gguf_weight

    for nbytes in (1, 100, 5 << 20):
        assert aligned_empty(nbytes).ctypes.data % 4096 == 0 and aligned_empty(nbytes).nbytes == nbytes
    gguf = resolve(None).gguf
    assert gguf is not None
    tensors = [gguf.load(name) for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "token_embd.weight")]
    assert all(t.raw.ctypes.data % 4096 == 0 for t in tensors)
    merged = _resident([tensors[0].raw, tensors[1].raw])
    assert merged.data_ptr() % 4096 == 0
    assert torch.equal(merged, torch.from_numpy(np.concatenate([tensors[0].raw, tensors[1].raw])))
    weight, _ = gguf_weight(kernels.Q8_0)
    assert weight.interleaved(16).raw.data_ptr() % 4096 == 0
