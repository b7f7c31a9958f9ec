"""Freed memory kept in the process while a torch loop runs on CPU (glibc's malloc).

A 3D CNN step allocates and frees arrays of tens of MB: MRInet's first convolution output at
4 mm, batch 8, is 62 MB, and its gradient as much again. glibc serves every block above its mmap
threshold (which adapts up to 32 MiB, no further) as a fresh mapping, whose pages fault in on first
touch, so each step pays for zeroing new pages (a large share of a training step on CPU). Inside
:func:`heap_kept` large blocks come from the heap and freed ones stay in it for the next step; on
leaving the outermost one, the trim threshold returns to its start value (``MALLOC_TRIM_THRESHOLD_``,
or glibc's 128 KiB) and the heap is trimmed, so a worker's memory falls back between tasks. Elsewhere
than glibc it does nothing. In a thread other than the main one (a Dask task's) it needs the process
to have one malloc arena (``MALLOC_ARENA_MAX=1``, which the cluster profiles set in their workers): a
thread's own arena grows in heaps of at most 64 MiB and serves larger blocks as fresh mappings
whatever ``mallopt`` says.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536
_GLIBC_TRIM_THRESHOLD = 128 * 1024
_KEPT_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: in practice, no trimming

_lock = threading.Lock()
_depth = 0


def _glibc():
    """The process's C library if it is glibc (the only one whose malloc is tuned here), else ``None``."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")) else None


def _start_trim_threshold() -> int:
    value = os.environ.get("MALLOC_TRIM_THRESHOLD_", "")
    return int(value) if value.isdigit() else _GLIBC_TRIM_THRESHOLD


_LIBC = _glibc()


@contextlib.contextmanager
def heap_kept() -> Iterator[None]:
    """Large blocks from the heap and freed memory kept for reuse, until the outermost block ends (thread-safe)."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1 and _LIBC is not None:
            _LIBC.mallopt(_M_MMAP_MAX, 0)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _KEPT_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _LIBC is not None:
                _LIBC.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _start_trim_threshold())
                _LIBC.malloc_trim(0)
