"""The ``shm`` backend's lock-free reads: one key, the length, and whole-table copies.

A mixin of :class:`~shareit.backends.shm.ShmMapping`. Plain reads never wait
for the writer lock: its holder may be a ``lock()`` block, a stopped process
or a dead one, and a read must neither block behind it nor return what it
has not committed. So every read is optimistic and validated:

- ``tseq`` even (no journaled transaction in flight): read the data directly;
  an entry's version must be even and unchanged across the read, and ``tseq``
  and the epoch unchanged afterwards (a transaction that began meanwhile may
  have inserted or changed what was read: retry).
- ``tseq`` odd: a transaction is in flight (running, stopped, or dead before
  its commit). Its undo journal holds, write-ahead, the committed bytes of
  every data word it has changed (``_shm_write``), so the reader lays those
  pre-images over what it reads (:meth:`ShmReader._overlay`) and gets the last
  committed state; ``tseq`` and ``jcount`` unchanged afterwards prove that no
  word it read changed without its pre-image being in the overlay (x86-64
  keeps stores, and loads, in program order; the module ``shm`` checks that).
- An inline numeric write (``J_INLINE``) changes one aligned word, old or new
  at every instant: an entry whose odd version belongs to it is read as is.

Values are cached only after validation, so a cache never holds a write that
did not commit; rollbacks restore exactly the committed bytes (versions
included), so a cache entry that matches after a rollback is committed data.

Whole-table reads (iteration, ``snapshot()``, ``len``, ``==``) copy the
entries and the heap with numpy under the same protocol, and additionally
require the stamp (bumped by every entry write, inline ones too) unchanged,
so the copy is one instant's state. A copy that keeps losing to live writers
backs off, and now and then tries the lock without waiting (it cannot block);
it gives up with ``LockTimeoutError`` only after ``timeout``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import _shm_layout as L
from ._shm_layout import C_GSEQ, C_JCOUNT, C_JSTATE, C_STAMP, C_TSEQ, J_INLINE

_TORN = (IndexError, ValueError, OverflowError, KeyError, TypeError, EOFError,
         __import__("pickle").UnpicklingError)  # what a read of moving bytes may raise


class ShmReader:
    """Read-side methods of ShmMapping (see the module docstring)."""

    _over: Any = None

    # ------------------------------------------------------------------ the journal overlay

    def _overlay(self, t1: int) -> tuple | None:
        """``(tseq, jcount, gen, {data word: committed value})`` of the transaction in
        flight, or None while the journal is being rewritten (retry)."""
        c = self._c
        jc = c[C_JCOUNT]
        over = self._over
        if over is not None and over[0] == t1 and over[1] == jc and over[2] == self._gen:
            return over  # records are only appended within one transaction
        recs, w, end = [], L.JOURNAL_WORD, L.JOURNAL_WORD + L.JOURNAL_WORDS
        for _ in range(jc):
            if w + 2 > end:
                return None
            off, nb = c[w], c[w + 1]
            n = nb // 8
            if off & 7 or nb & 7 or w + 2 + n > end:
                return None
            recs.append((off >> 3, w + 2, n))
            w += 2 + n
        words: dict = {}
        for base, src, n in reversed(recs):  # the first record of a word holds its committed value
            for i in range(n):
                words[base + i] = c[src + i]
        over = self._over = (t1, jc, self._gen, words)
        return over

    def _find_committed(self, g: L.Generation, words: dict, kkind: int, kb: bytes,
                        h: int) -> int:
        """``_find`` through the overlay: the key's committed entry, or -1."""
        q, get = g.q, words.get
        isize, ibase, klen = g.isize, L.HEADER_BYTES // 8, len(kb)
        j = h % isize
        for _ in range(isize):
            x = get(ibase + (j >> 1))
            x = q[ibase + (j >> 1)] if x is None else x
            e = (x >> 32) if j & 1 else x & 0xFFFFFFFF
            if e == 0xFFFFFFFF:  # EMPTY
                return -1
            if e < 0x80000000:  # an entry (not DELETED)
                w = g.ew + e * 4
                a = get(w + 1)
                a = q[w + 1] if a is None else a
                b = get(w + 2)
                b = q[w + 2] if b is None else b
                if a & 0xFFFFFFFF == h and a >> 32 == klen and (b >> 40) & 0xFF == kkind:
                    start = g.hoff + (b & 0xFFFFFFFF) * 8  # committed heap bytes never change
                    if g.mv[start : start + klen] == kb:
                        return e
            j += 1
            if j == isize:
                j = 0
        return -1

    def _read_committed(self, kkind: int, kb: bytes, h: int, words: dict) -> tuple | None:
        """(found, value) of the last committed state while a transaction is in flight."""
        g = self._g
        e = self._find_committed(g, words, kkind, kb, h)
        if e < 0:
            return (False, None)
        w, q, get = g.ew + e * 4, g.q, words.get
        ver, b, val = (q[i] if get(i) is None else get(i) for i in (w, w + 2, w + 3))
        meta = b >> 32
        if ver & 1 or not meta & L.LIVE:
            return None
        kind = meta & 0xFF
        if val >= 1 << 63:
            val -= 1 << 64
        raw = None
        if kind in L.HEAP_KINDS:
            start = g.hoff + (val & 0xFFFFFFFF) * 8
            raw = bytes(g.mv[start : start + (val >> 32)])
        return (True, L.decode_value(kind, val, raw))

    # ------------------------------------------------------------------ one key, the length

    def _read_lockfree(self, key: Any, kkind: int, kb: bytes, h: int) -> tuple:
        c = self._c
        attempt, deadline = 0, None
        while True:
            e1 = c[C_GSEQ]
            if e1 != self._epoch:
                self._follow(e1)
                continue
            t1 = c[C_TSEQ]
            try:
                if t1 & 1:
                    over = self._overlay(t1)
                    got = None if over is None else self._read_committed(kkind, kb, h, over[3])
                    if over is None or c[C_JCOUNT] != over[1]:
                        got = None
                else:
                    got = self._read_entry(key, kkind, kb, h)
            except _TORN:
                got = None  # a torn read of the index or an entry: retry
            if got is not None and c[C_TSEQ] == t1 and c[C_GSEQ] == e1:
                if len(got) > 2:
                    self._remember(key, got)  # only now: a validated, committed value
                return got[0], got[1]
            attempt += 1
            deadline = self._backoff(attempt, deadline)

    def _len_lockfree(self) -> int:
        c = self._c
        attempt, deadline = 0, None
        while True:
            e1 = c[C_GSEQ]
            if e1 != self._epoch:
                self._follow(e1)
                continue
            t1 = c[C_TSEQ]
            q = self._q
            if t1 & 1:
                over = self._overlay(t1)
                n = None if over is None else over[3].get(L.H_LIVE, q[L.H_LIVE])
                if over is None or c[C_JCOUNT] != over[1]:
                    n = None
            else:
                n = q[L.H_LIVE]
            if n is not None and c[C_TSEQ] == t1 and c[C_GSEQ] == e1:
                return n
            attempt += 1
            deadline = self._backoff(attempt, deadline)

    def _follow(self, e1: int) -> None:
        """The epoch moved: map the generation it names (one may be published in ``gen``
        but not yet in the epoch, by a writer stopped between the two stores)."""
        if e1 & 1:
            self._map_current()  # destroyed: raises
        else:
            self._map_current(e1 // 2)

    def _backoff(self, attempt: int, deadline: float | None) -> float | None:
        """Writers keep changing what a read reads: spin, then yield, then sleep a little;
        after ``timeout``, give up (a read never waits for the lock itself)."""
        if attempt < 16:
            return deadline
        now = time.monotonic()
        if deadline is None:
            deadline = now + self._config.timeout
        elif now > deadline:
            from ..errors import LockTimeoutError

            raise LockTimeoutError(
                f"could not read a consistent state of shm mapping {self._label()} within "
                f"{self._config.timeout:g} s: writers kept changing it. Pass a larger timeout"
            )
        if attempt < 64:
            os.sched_yield()
        else:
            time.sleep(min(1e-3, 1e-5 * (attempt - 63)))
        return deadline

    # ------------------------------------------------------------------ whole-table copies

    def _consistent_copy(self, with_heap: bool = True, columns: tuple = ()) -> tuple:
        """Live entries, plus the heap or the int keys gathered from it: one instant's
        committed state, copied without the lock (see the module docstring)."""
        self._check_open()
        c = self._c
        attempt, deadline = 0, None
        while True:
            e1 = c[C_GSEQ]
            if e1 != self._epoch:
                self._follow(e1)
                continue
            got = self._try_copy(e1, with_heap, columns)
            if got is not None:
                return got
            attempt += 1
            if attempt >= 32 and attempt % 8 == 0 and self._lock_acquire(0):
                try:  # writers are only busy, not stuck: copy in a gap, never waiting
                    got = self._try_copy(c[C_GSEQ], with_heap, columns)
                finally:
                    self._lock_release()
                if got is not None:
                    return got
            deadline = self._backoff(attempt, deadline)

    def _try_copy(self, e1: int, with_heap: bool, columns: tuple = ()) -> tuple | None:
        np = L.numpy()
        c, g = self._c, self._g
        t1, s1, j1 = c[C_TSEQ], c[C_STAMP], c[C_JSTATE]
        words: dict = {}
        if t1 & 1:
            over = self._overlay(t1)
            if over is None:
                return None
            words = over[3]
        q = g.q
        used, live_n, top = (words.get(i, q[i]) for i in (L.H_USED, L.H_LIVE, L.H_TOP))
        if used > g.cap or top > g.heapw:
            return None
        if columns and not words and j1 & 3 != J_INLINE:
            # (values_array: only the columns it needs, one strided pass each)
            view = g.entries()[:used]
            cols = {k: view[k].copy() for k in columns}
            if live_n != used:
                keep = (cols["meta"] & L.LIVE) != 0
                cols = {k: v[keep] for k, v in cols.items()}
            if (c[C_TSEQ] != t1 or c[C_STAMP] != s1 or c[C_JSTATE] != j1 or c[C_GSEQ] != e1
                    or len(cols["meta"]) != live_n):
                return None
            return cols, None, None
        ents = g.entries()[:used].copy()
        if words:
            lo, hi = g.ew, g.ew + used * 4
            at = [w for w in words if lo <= w < hi]
            if at:
                flat = ents.view("<u8")
                flat[np.array(at) - lo] = np.array([words[w] for w in at], dtype="<u8")
        elif j1 & 3 == J_INLINE and g.ew <= (j1 >> 2) < g.ew + used * 4:
            w = j1 >> 2  # an inline write in flight: re-read its one word atomically
            ents.view("<i8")[w - g.ew + 3] = g.qs[w + 3]
        live = (ents["meta"] & L.LIVE) != 0
        if live_n != used:
            ents = ents[live]
        heap = int_keys = None
        if with_heap:
            meta = ents["meta"]
            # all keys int64 and all values inline: gather the keys, skip copying the heap
            if len(ents) and meta.min() == meta.max() and (meta[0] >> 8) & 0xFF == L.K_INT \
                    and meta[0] & 0xFF not in L.HEAP_KINDS and (ents["klen"] == 8).all():
                heapq = np.frombuffer(g.mm, dtype="<i8", count=g.heapw, offset=g.hoff)
                koff = ents["koff"]
                if len(koff) and int(koff.max()) >= top:
                    return None
                int_keys = heapq[koff]  # fancy indexing copies
            else:
                heap = g.heap()[: top * 8].copy()
        if (c[C_TSEQ] != t1 or c[C_STAMP] != s1 or c[C_JSTATE] != j1 or c[C_GSEQ] != e1
                or (t1 & 1 and c[C_JCOUNT] != over[1]) or len(ents) != live_n):
            return None
        return ents, heap, int_keys
