"""Give freed C-heap memory back to the operating system between clients.

With many clients, glibc keeps the pages of freed per-step buffers mapped: each client's small kept tensors (its
update, its personal state) are allocated between them, so the heap cannot shrink from the top, and the resident
size grows with the number of clients although live data does not (benchmarks/RESULTS.md, memory vs clients).
``malloc_trim(0)`` returns every free page in the middle of the heap too; after the first call it costs about a
millisecond. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_TRIM = None


def _malloc_trim():
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _TRIM = fn
            except (OSError, AttributeError):  # musl and others: no malloc_trim
                pass
    return _TRIM


def release_free_memory() -> bool:
    """``malloc_trim(0)`` on glibc; returns whether memory was released (False where unavailable)."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn else False
