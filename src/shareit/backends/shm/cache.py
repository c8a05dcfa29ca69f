"""What one process caches of the values it read from an ``shm`` table.

A hit is ``(fast kt, c, epoch, q, w, ver, value or raw bytes, size, kt)``: valid while
the control word ``c[C_GSEQ]`` equals ``epoch`` (the table's epoch when it was read)
and the version word ``q[w]`` of the key's entry (``q``: the words of the generation
it was read in) still equals ``ver`` -- two word reads, done by
``ShmMapping.__getitem__`` itself, with no attribute of the table on the way.
``fast kt`` is the key's type for an immutable value (returned as is) and None for a
pickled one (``raw`` is unpickled on every hit: a read returns a copy). A hit whose
version moved is re-read from its entry ``w`` without a probe
(:func:`.read.reread`): within one generation an entry always belongs to one key.
Only validated, committed reads are remembered (:mod:`.read`), and the table clears
the cache whenever it maps another generation.

Bounded in entries (``CACHE_MAX``) and in bytes of cached heap values
(``CACHE_BYTES``; a value larger than ``CACHE_VALUE_MAX`` is never cached):
the oldest entries go first (FIFO: a hit costs no bookkeeping; a key read again after
its value changed moves to the end).
"""

from __future__ import annotations

from itertools import islice
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
        """Cache a validated read of ``key``: ``got`` is ``(True, value, w, ver, kind, raw,
        c, epoch, q)`` (see :data:`.read.Got`). Reads do not place keys in the table's
        ``slots``: only writes do, so a cold read costs one dict insert."""
        kt = type(key)
        if kt is tuple:  # never cached: (1,) == (1.0,), and the float one is no valid key
            return
        _, value, w, ver, kind, raw, c, e, q = got
        cache = self.entries
        size = len(raw) if raw is not None else 0
        old = cache.pop(key, None)
        if old is not None:
            self.nbytes -= old[7]
        if size > L.CACHE_VALUE_MAX:
            return  # (and an older, smaller value of it does not stay cached)
        if len(cache) >= L.CACHE_MAX:
            self._evict(L.CACHE_MAX // 8)
        self.nbytes += size
        if self.nbytes > L.CACHE_BYTES:
            self._evict(0)
        # A hit must be of the same type: 1 == 1.0 == True, but only 1 is a valid key.
        if kind in L.IMMUTABLE_KINDS:
            cache[key] = (kt, c, e, q, w, ver, value, size, kt)
        else:
            cache[key] = (None, c, e, q, w, ver, raw, size, kt)

    def _evict(self, want: int) -> None:
        """Drop the oldest cached reads: ``want`` of them, and more until the cached bytes
        are within three quarters of ``CACHE_BYTES``."""
        cache = self.entries
        target = L.CACHE_BYTES * 3 // 4
        pop = cache.pop
        try:
            victims = list(islice(cache, want))  # insertion order: the oldest first
            nbytes = self.nbytes
            for k in victims:
                hit = pop(k, None)
                if hit is not None:
                    nbytes -= hit[7]
            if nbytes > target:  # (big values: one more pass, by bytes)
                victims = []
                for k, hit in cache.items():
                    if nbytes <= target:
                        break
                    victims.append(k)
                    nbytes -= hit[7]
                for k in victims:
                    pop(k, None)
        except RuntimeError:  # another thread of ours changed it meanwhile: start afresh
            self.clear()
            return
        self.nbytes = max(0, nbytes)
