"""A minimal, fast GGUF reader: metadata, tensor directory, and each tensor's blocks read into memory.

gguf's own GGUFReader builds a Python object per array element and takes seconds on a model with
a 50k-token vocabulary; this reader parses numeric arrays with numpy, string arrays (the vocabulary
and merges, which only a first tokenizer conversion reads) only when read, and the header through a
map of the file; a truncated file is refused when opened, naming the first tensor it cuts.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from fulmine.layers.weights import QuantizedTensor, aligned_empty

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")


class LazyStrings(Sequence[str]):
    """A GGUF array of strings, decoded on first access (its length is known without decoding)."""

    def __init__(self, buffer: bytes, start: int, count: int) -> None:
        self._buffer, self._start, self._count = buffer, start, count
        self._items: list[str] | None = None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        if self._items is None:
            items, pos = [], self._start
            for _ in range(self._count):
                (length,) = _LENGTH.unpack_from(self._buffer, pos)
                items.append(bytes(self._buffer[pos + 8 : pos + 8 + length]).decode("utf-8", errors="replace"))
                pos += 8 + length
            self._items = items
        return self._items[index]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: rows first (GGUF lists dims innermost first)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._data: np.ndarray = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buffer = cast(Any, self._data)  # numpy arrays are buffers; its stubs do not say so
        self._pos = 0
        if bytes(self._data[:4]) != b"GGUF":
            raise ValueError("its first bytes are not GGUF's magic")
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", self._buffer, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (need 2 or newer)")
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self._string()
            (value_type,) = self._unpack("<I")
            self.metadata[key] = self._value(value_type)
        infos = [self._tensor_info() for _ in range(num_tensors)]
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, offset in infos:
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block_size * type_size
            self.tensors[name] = TensorInfo(name, shape, qtype, data_start + offset, nbytes)
            if data_start + offset + nbytes > len(self._data):
                raise ValueError(
                    f"truncated: tensor {name!r} ends at byte {data_start + offset + nbytes}, the file has "
                    f"{len(self._data)} (an interrupted download?)"
                )
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        """Unmap and close the file (tensors loaded earlier are copies). Metadata stays."""
        self._data = self._buffer = np.empty(0, dtype=np.uint8)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def load(self, name: str) -> QuantizedTensor:
        """The tensor's raw blocks, one row of blocks per output row: read from the file into memory of
        numpy's, page-aligned (layers/weights.py), which asks for huge pages on large arrays (decode
        streams every weight once per token; with the map's 4 KB pages Gemma 3 270M decoded 20 %
        slower), without faulting the map page by page."""
        info = self.tensors[name]
        assert self._fd is not None, "the file was closed"
        rows = int(np.prod(info.shape[:-1]))
        raw = aligned_empty(info.nbytes)
        done = 0
        while done < info.nbytes:  # a large read may come back in parts
            count = os.preadv(self._fd, [raw.data[done:]], info.offset + done)
            if count <= 0:
                raise ValueError(f"{self.path}: tensor {name!r} could not be read (the file changed?)")
            done += count
        return QuantizedTensor(raw.reshape(rows, -1), info.qtype, info.shape)

    # -- parsing helpers --------------------------------------------------------------------
    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self._buffer, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        text = bytes(self._data[self._pos : self._pos + length]).decode("utf-8", errors="replace")
        self._pos += length
        return text

    def _value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            element_type, count = self._unpack("<IQ")
            if element_type == _STRING:
                start = self._pos
                for _ in range(count):  # only the lengths, to find where the array ends
                    self._pos += 8 + _LENGTH.unpack_from(self._buffer, self._pos)[0]
                # its bytes copied out (a few MB, no decoding), so it does not keep the file mapped
                return LazyStrings(bytes(self._data[start : self._pos]), 0, count)
            if element_type == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(_NUMPY[element_type])
            array = np.frombuffer(self._data, dtype=dtype, count=count, offset=self._pos).copy()
            self._pos += dtype.itemsize * count
            return array
        (value,) = self._unpack(_SCALARS[value_type])
        return value

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._string()
        (num_dims,) = self._unpack("<I")
        dims = self._unpack(f"<{num_dims}Q")
        qtype, offset = self._unpack("<IQ")
        return name, tuple(int(d) for d in reversed(dims)), GGMLQuantizationType(qtype), offset
