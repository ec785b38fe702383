"""fulmine's C kernels (_cpu.c with kquants.c and sample.c), when the install could build them.

`cpu()` is the extension module or None; callers keep a pure-PyTorch path for None. Setting
FULMINE_NO_KERNELS=1 forces that path (the tests use it to check the fallback).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

try:
    _module: ModuleType | None = importlib.import_module("fulmine.kernels._cpu")
except ImportError:  # not built (no compiler at install time): PyTorch paths only
    _module = None

# GGML type ids (as GGUF stores them) the kernels read directly
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14
BLOCK_TYPES = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
# fulmine's own: a type with 8 or 16 rows interleaved (kernels/interleaved.c), e.g. Q4_1 | X16
X8, X16 = 0x100, 0x200

_threads: int | None = None


def cpu() -> ModuleType | None:
    if _module is None or os.environ.get("FULMINE_NO_KERNELS") == "1":
        return None
    return _module


@functools.cache
def _table() -> tuple[dict[int, dict], int]:
    """The kernels' table of types and their interleaved group size: fixed at import."""
    module = cpu()
    assert module is not None
    info = module.info()
    return info["types"], int(info["interleave"])


def block_layout(qtype: int) -> tuple[int, int]:
    """(weights, bytes) per block of a type the kernels read, from the kernels' own table."""
    entry = _table()[0][qtype]
    return entry["block"], entry["bytes"]


def interleave_rows() -> int:
    """How many rows this CPU's interleaved layouts group: 16 where the 512-bit kernels run, else 8."""
    return _table()[1]


def type_ids() -> frozenset[int]:
    """Every type id the kernels read (GGML's and fulmine's interleaved ones)."""
    return frozenset(_table()[0])


def base_type(qtype: int) -> int:
    return qtype & ~(X8 | X16)


def set_threads(n: int) -> None:
    """The kernels' worker count (the calling thread is one of them)."""
    global _threads
    module = cpu()
    if module is not None and n != _threads:
        module.set_threads(n)
        _threads = n


# How far ahead of the block they read the interleaved kernels ask for weights (bytes; -1: the same
# block of the next row group; 0: not at all). Measured on 2 threads: the Intel Sapphire Rapids
# guest decoded twice as fast with one group ahead as with the hardware prefetchers alone; the AMD
# Zen 4 guest streamed Qwen2.5-Coder-1.5B's matrices at 17-19 GB/s either way and 21-22 GB/s with
# 1-4 KB ahead. engine/calibration.py picks the fastest here.
PREFETCH_CHOICES = (-1, 0, 1024, 4096)
DEFAULT_PREFETCH = -1


def set_prefetch(ahead: int) -> None:
    """How far ahead the interleaved kernels prefetch (see PREFETCH_CHOICES)."""
    module = cpu()
    if module is not None:
        module.set_prefetch(ahead)


def describe() -> str:
    module = cpu()
    if module is None:
        return "PyTorch (C kernels not built or disabled)"
    info = module.info()
    return f"C kernels ({info['isa']}, {info['threads']} threads)"
