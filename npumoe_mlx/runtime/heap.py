"""Hand freed heap memory back to the OS after a load frees large buffers.

glibc's malloc raises its mmap threshold (up to 32 MB) each time a large mmapped block is
freed, so later blocks of that size come from the heap, and when they are freed the heap
keeps them: RSS stays up though nothing uses the memory. ``load`` frees the experts MLX no
longer holds (release.py) right after reading some of them for the program check, which
left ~180 MB of free heap in the demo's process (measured: benchmarks/rss_timeline.py).
``malloc_trim(0)`` releases the free pages of every arena (madvise), not just the top.
"""

import ctypes
import ctypes.util
import sys
from typing import Optional

_LIBC: list = []  # [the C library with malloc_trim, or None]


def _libc() -> Optional[ctypes.CDLL]:
    if not _LIBC:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                lib.malloc_trim.restype = ctypes.c_int
            except (OSError, AttributeError):  # musl and others: no malloc_trim
                lib = None
        _LIBC.append(lib)
    return _LIBC[0]


def trim() -> bool:
    """Return free heap pages to the OS (glibc ``malloc_trim(0)``); False where there is none
    (macOS's allocator returns large frees itself)."""
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True
