"""Keeping the daemon's resident memory near what it holds: glibc's allocator settings,
handing freed heap back, and dropping a model file's pages once the runtime has copied them.

All of it is best effort: on a C library other than glibc (musl) or a kernel without
``/proc``, each call does nothing and says so by its return value.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_ARENA_MAX = -8

ARENA_MAX = 2  # malloc arenas shared by all threads (glibc's default: 8 per core)
TRIM_THRESHOLD = 128 * 1024  # freed memory at the heap's top above this goes back to the kernel


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator() -> bool:
    """Set glibc's malloc to at most ``ARENA_MAX`` arenas and a fixed trim threshold.

    The same settings as the environment variables ``MALLOC_ARENA_MAX`` and
    ``MALLOC_TRIM_THRESHOLD_`` (the systemd unit sets those too), made from inside for a
    daemon started any other way; a variable already set wins. Called before the threads
    start: arenas are made as threads first allocate. Without a fixed threshold, glibc
    raises it each time a large temporary (a decoded frame, a model's outputs) is freed,
    and the heap keeps the freed space for good.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = True
    if "MALLOC_ARENA_MAX" not in os.environ:
        ok &= libc.mallopt(_M_ARENA_MAX, ARENA_MAX) == 1
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return bool(ok)


def trim() -> bool:
    """Hand the free pages of every arena back to the kernel (``malloc_trim(0)``); True if any went."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def release_file_pages(path: str | Path) -> int:
    """Drop this process's resident pages of every read-only mapping of ``path``; returns
    the bytes of the mappings advised.

    For a model file the runtime maps and then copies into its own layout (XNNPACK packs
    the weights at allocation): the mapped copy is no longer read, yet its pages stay
    resident. They are clean file pages, so dropping them loses nothing: a page still
    read is faulted back in from the page cache. A mapping holding any page of its own
    (a private mapping written to, such as a library's relocated data) is left alone:
    dropping those pages would lose what was written.
    """
    target = os.path.realpath(path)
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.readlines()
    except OSError:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    candidates: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in lines:
        parts = line.split(maxsplit=5)
        if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:  # a mapping's header line
            current = None
            if len(parts) == 6 and parts[5].strip() == target and "w" not in parts[1]:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                current = (start, end)
        elif current is not None and parts[0] == "Anonymous:":
            if int(parts[1]) == 0:
                candidates.append(current)
            current = None
    advised = 0
    for start, end in candidates:
        if libc.madvise(start, end - start, mmap.MADV_DONTNEED) == 0:
            advised += end - start
    return advised
