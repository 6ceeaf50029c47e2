"""ULIDs: 48 bits of milliseconds then 80 random bits in Crockford base32.

They sort by time and, within one process, only grow. Event, batch, alert and request
ids are all ULIDs (the contract's ``Ulid``), so both sides make them here.
"""

from __future__ import annotations

import os
import threading
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class UlidGenerator:
    """ULIDs that grow strictly within this generator, even within one millisecond
    or when the wall clock steps back (the last time is kept and the random part
    incremented)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0
        self._time_chars = ""

    def new(self) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms > self._last_ms:
                rand = int.from_bytes(os.urandom(10), "big")
                self._time_chars = _encode_time(ms)
            else:
                ms, rand = self._last_ms, self._last_rand + 1
                if rand >= 1 << 80:  # 2^80 ids in one millisecond: borrow the next one
                    ms, rand = ms + 1, 0
                    self._time_chars = _encode_time(ms)
            self._last_ms, self._last_rand = ms, rand
            return self._time_chars + _encode_random(rand)


# Crockford base32 two characters (10 bits) at a time: 5 lookups for the time, 8 for the rest
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]


def _encode_time(ms: int) -> str:
    return "".join([_PAIRS[(ms >> shift) & 1023] for shift in (40, 30, 20, 10, 0)])


def _encode_random(rand: int) -> str:
    return "".join([_PAIRS[(rand >> shift) & 1023] for shift in (70, 60, 50, 40, 30, 20, 10, 0)])


def encode_ulid(ms: int, rand: int) -> str:
    """26 Crockford base32 characters: 48-bit milliseconds, then 80 random bits."""
    return _encode_time(ms) + _encode_random(rand)


def ulid_time(ulid: str) -> float:
    """The wall-clock time (s) in a ULID."""
    ms = 0
    for ch in ulid[:10]:
        ms = ms * 32 + _CROCKFORD.index(ch)
    return ms / 1000


# One generator per process: "monotonic within a process" needs a single owner of the
# last id, whichever thread or module makes the event.
_IDS = UlidGenerator()


def new_id() -> str:
    """A fresh ULID, greater than any made before in this process."""
    return _IDS.new()
