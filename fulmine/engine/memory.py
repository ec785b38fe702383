"""The process's memory: what it holds resident now and at its peak, and handing back to the
system what loading freed (the C allocator keeps freed heap, such as the tokenizer's parsed JSON
of a 262k-token vocabulary, ~200 MB, in its arenas unless asked)."""

from __future__ import annotations

import ctypes
import resource
import sys
from functools import cache


def rss_bytes() -> int | None:
    """Resident set size now (Linux), else None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KB elsewhere


@cache
def _malloc_trim() -> object | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the heap that was freed back to the system (glibc: every thread's arena), where the C
    library can; elsewhere nothing happens."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # type: ignore[operator]
