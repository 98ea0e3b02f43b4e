"""Time-ordered ids for rows made on the hot path, so no database round trip is needed to get one."""

from __future__ import annotations

import os
import threading
import time
import uuid

# Random bits come from the OS's CSPRNG, fetched for many ids at a time: one getrandom() system
# call per id was 8 % of the ingest writer's CPU (it makes three or four ids per event).
_IDS_PER_FETCH = 256
_lock = threading.Lock()
_pool = b""
_offset = 0


def _forget_pool() -> None:
    # A forked child must not hand out the random bits its parent will hand out too.
    global _lock, _pool, _offset
    _lock, _pool, _offset = threading.Lock(), b"", 0


os.register_at_fork(after_in_child=_forget_pool)


def _random_80_bits() -> int:
    global _pool, _offset
    with _lock:
        if _offset >= len(_pool):
            _pool, _offset = os.urandom(10 * _IDS_PER_FETCH), 0
        start = _offset
        _offset += 10
        return int.from_bytes(_pool[start : start + 10], "big")


def uuid7() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits (time-ordered to the ms)."""
    ms = time.time_ns() // 1_000_000
    rand = _random_80_bits()
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 68) << 64  # 12 random bits (rand_a)
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # 62 random bits (rand_b)
    return uuid.UUID(int=value)
