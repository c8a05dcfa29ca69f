"""What one process caches of the values it read from an ``shm`` table.

A hit is ``(w, ver, value or raw bytes, immutable, key type, size)``: valid
while the table's epoch is the one it was read in and the version word of
the entry at data word ``w`` still equals ``ver`` -- two word reads, done by
``ShmMapping.__getitem__`` itself. Only validated, committed reads are
remembered (:mod:`.read`), and the table clears the cache whenever it maps
another generation.

Bounded in entries (``CACHE_MAX``) and in bytes of cached heap values
(``CACHE_BYTES``; a value larger than ``CACHE_VALUE_MAX`` is never cached):
the oldest entries go first (FIFO: a hit costs no bookkeeping).
"""

from __future__ import annotations

from typing import Any

from . import layout as L


class ReadCache:
    """``entries``: key -> hit (see the module docstring); ``nbytes``: their heap bytes."""

    __slots__ = ("entries", "nbytes")

    def __init__(self) -> None:
        self.entries: dict[Any, tuple[Any, ...]] = {}
        self.nbytes = 0

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def close(self) -> None:
        self.clear()

    def remember(self, key: Any, got: tuple[Any, ...]) -> None:
        """Cache a validated read of ``key``: ``got`` is ``(True, value, w, ver, kind, raw)``
        (see :data:`.read.Got`). Reads do not place keys in the table's ``slots``: only
        writes do, so a cold read costs one dict insert."""
        kt = type(key)
        if kt is tuple:  # never cached: (1,) == (1.0,), and the float one is no valid key
            return
        _, value, w, ver, kind, raw = got
        cache = self.entries
        size = len(raw) if raw is not None else 0
        if size > L.CACHE_VALUE_MAX:
            cache.pop(key, None)  # (an older, smaller value of it must not stay cached)
            return
        old = cache.get(key)
        if old is not None:
            self.nbytes -= old[5]
        elif len(cache) >= L.CACHE_MAX:
            self._evict(L.CACHE_MAX // 8)
        self.nbytes += size
        if self.nbytes > L.CACHE_BYTES:
            self._evict(0)
        # A hit must be of the same type: 1 == 1.0 == True, but only 1 is a valid key.
        if kind in L.IMMUTABLE_KINDS:
            cache[key] = (w, ver, value, True, kt, size)
        else:
            cache[key] = (w, ver, raw, False, kt, size)

    def _evict(self, want: int) -> None:
        """Drop the oldest cached reads: ``want`` of them, and more until the cached bytes
        are within three quarters of ``CACHE_BYTES``."""
        cache = self.entries
        target = L.CACHE_BYTES * 3 // 4
        freed, victims = 0, list[Any]()
        try:
            for k, hit in cache.items():  # insertion order: the oldest first
                if len(victims) >= want and self.nbytes - freed <= target:
                    break
                victims.append(k)
                freed += hit[5]
        except RuntimeError:  # another thread of ours changed it meanwhile: start afresh
            self.clear()
            return
        for k in victims:
            cache.pop(k, None)
        self.nbytes = max(0, self.nbytes - freed)
