"""Handing back to the system the heap that loading freed: the C allocator keeps freed memory, such
as the tokenizer's parsed JSON of a 262k-token vocabulary (~200 MB), in its arenas unless asked."""

from __future__ import annotations

import ctypes


def return_freed_memory() -> None:
    """Give the heap that was freed back to the system (glibc: every thread's arena), where the C
    library can; elsewhere nothing happens."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return
    trim(0)
