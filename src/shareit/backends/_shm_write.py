"""The ``shm`` backend's writers: journaled transactions, puts and deletes, rebuilds, repair.

A mixin of :class:`~shareit.backends.shm.ShmMapping`; every method here but
``_find`` (the probe, which lock-free readers use too) runs with the writer
lock held. A write journals the bytes it is about to change
(``_save``) between ``_begin`` and ``_commit``; a writer killed in between is
rolled back by the next one (``_recover``). Rebuilds build a whole new
generation out of sight and publish it with one store.

Lock-free readers must never see a write that has not committed, and cannot
wait for a writer (it may be stopped or dead), so a transaction announces
itself: ``_begin`` empties the journal and only then makes ``tseq`` odd;
``_commit`` clears ``jstate`` (from then on recovery keeps the write) and then
makes ``tseq`` even (from then on readers see it). A reader that finds
``tseq`` odd lays the journal's pre-images over the data (``_shm_read``), so
until the commit it sees exactly the state before the transaction, and a
rollback restores those very bytes: nothing a reader returned or cached is
undone by it. Every byte a transaction changes below the heap top is
journaled first; bytes above the committed heap top (appended keys and
values, the entry of an insert) are invisible to readers of the committed
header and index.
"""

from __future__ import annotations

from typing import Any

from ..errors import CapacityError
from . import _shm_layout as L


class ShmWriter:
    """Write-side methods of ShmMapping (see the module docstring)."""

    def _recover(self) -> None:
        """Repair what a writer killed mid-write left: roll back its journal, finish growth."""
        c = self._c
        target = c[L.C_GROW]
        if target:
            if c[L.C_GEN] == target:  # switched; the old generation may still be linked
                for path in L.data_segments(self._seg):
                    if path != L.data_path(self._seg, target):
                        L.unlink_quiet(path)
            else:  # died while building: the half-built generation is garbage
                L.unlink_quiet(L.data_path(self._seg, target))
            c[L.C_GROW] = 0
        self._map_current()
        if c[L.C_JSTATE] == L.J_JOURNAL:  # (J_INLINE carries the entry's word offset)
            self._rollback()
        elif c[L.C_JSTATE] & 3 == L.J_INLINE:  # one value word, old or new: end the write
            w = c[L.C_JSTATE] >> 2
            if self._g.q[w] & 1:
                stamp = c[L.C_STAMP] + 1
                c[L.C_STAMP] = stamp
                self._g.q[w] = 2 * stamp + 2
        c[L.C_JSTATE] = 0
        if c[L.C_TSEQ] & 1:
            c[L.C_TSEQ] += 1  # readers stop laying the (now empty) journal over the data
        c[L.C_GSEQ] = c[L.C_GEN] * 2  # right after a switch cut short
        self._epoch = c[L.C_GEN] * 2
        self._forget()

    def _begin(self) -> None:
        """Open a journaled write (of one key or many: readers treat them alike)."""
        c = self._c
        c[L.C_JWORDS] = 0
        c[L.C_JCOUNT] = 0  # before tseq turns odd: no reader lays old records over new data
        c[L.C_TSEQ] += 1  # odd: readers read through the journal until the commit
        c[L.C_JSTATE] = 1
        self._saved_header = False
        L.fault("after_begin")

    def _save(self, off: int, nbytes: int) -> None:
        """Journal the bytes [off, off+nbytes) of the data segment before changing them."""
        if not self._journaling:
            return
        c = self._c
        used = c[L.C_JWORDS]
        need = 2 + (nbytes + 7) // 8
        if used + need > L.JOURNAL_WORDS:
            raise L.Grow  # a very large transaction: done by rebuilding instead
        w = L.JOURNAL_WORD + used
        c[w], c[w + 1] = off, nbytes
        b = (w + 2) * 8
        self._cmv[b : b + nbytes] = self._g.mv[off : off + nbytes]
        c[L.C_JWORDS] = used + need  # the record counts only once it is complete
        c[L.C_JCOUNT] += 1

    def _save_header(self) -> None:
        if not self._saved_header:
            self._save(0, L.HEADER_BYTES)
            self._saved_header = True

    def _rollback(self) -> None:
        c, g = self._c, self._g
        records, w = [], L.JOURNAL_WORD
        for _ in range(c[L.C_JCOUNT]):
            off, n = c[w], c[w + 1]
            records.append((off, n, (w + 2) * 8))
            w += 2 + (n + 7) // 8
        for off, n, b in reversed(records):
            g.mv[off : off + n] = self._cmv[b : b + n]
        c[L.C_JCOUNT] = 0
        c[L.C_JWORDS] = 0

    def _commit(self) -> None:
        L.fault("before_commit")
        self._finish()

    def _finish(self) -> None:
        c = self._c
        c[L.C_JSTATE] = 0  # the commit point for recovery: the next writer keeps this write
        c[L.C_TSEQ] += 1  # even: readers see it from now on (never before recovery would keep it)

    def _abort(self) -> None:
        self._rollback()
        self._finish()
        self._forget()

    def _find(self, g: L.Generation, kkind: int, kb: bytes, h: int) -> tuple[int, int]:
        """(entry, index slot) of a key, or (-1, slot where it would go)."""
        isize, i32, u32, mv = g.isize, g.i32, g.u32, g.mv
        ibase, ebase, hoff, klen = L.HEADER_BYTES // 4, g.eoff // 4, g.hoff, len(kb)
        j = h % isize
        free = -1
        for _ in range(isize):
            e = i32[ibase + j]
            if e == L.EMPTY:
                return -1, (j if free < 0 else free)
            if e == L.DELETED:
                if free < 0:
                    free = j
            else:
                u = ebase + e * 8
                if u32[u + 2] == h and u32[u + 3] == klen and (u32[u + 5] >> 8) & 0xFF == kkind:
                    start = hoff + u32[u + 4] * 8
                    if mv[start : start + klen] == kb:
                        return e, j
            j += 1
            if j == isize:
                j = 0
        return -1, free

    def _alloc(self, g: L.Generation, data: bytes) -> int:
        """Append ``data`` to the heap; its offset in words. Header must be journaled."""
        q = g.q
        top = q[L.H_TOP]
        words = (len(data) + 7) // 8
        if top + words > g.heapw:
            raise L.Grow
        q[L.H_TOP] = top + words
        if len(data) & 7:
            q[g.hw + top + words - 1] = 0  # zero padding: bulk lookups compare whole words
        b = g.hoff + top * 8
        g.mv[b : b + len(data)] = data
        return top

    def _write_entry(self, g: L.Generation, e: int, h: int, klen: int, koff: int, meta: int,
                     val: int) -> None:
        c = self._c
        stamp = c[L.C_STAMP] + 1
        c[L.C_STAMP] = stamp
        w = g.ew + e * 4
        g.q[w] = 2 * stamp + 1  # odd: being written
        u = w * 2
        g.u32[u + 2] = h
        g.u32[u + 3] = klen
        L.fault("mid_entry")
        g.u32[u + 4] = koff
        g.u32[u + 5] = meta
        g.qs[w + 3] = val
        g.q[w] = 2 * stamp + 2

    def _put(self, key: Any, kkind: int, kb: bytes, h: int, vkind: int, vinl: int,
             vraw: bytes | None) -> None:
        """Set one key; the writer lock is held and a transaction is open."""
        g = self._g
        w = self._slots.get(key, -1)
        e = (w - g.ew) // 4 if w >= 0 and g.u32[w * 2 + 5] & L.LIVE else -1
        if e < 0:
            e, slot = self._find(g, kkind, kb, h)
        if e >= 0:  # overwrite in place (entry keeps its position: dict order)
            u = (g.ew + e * 4) * 2
            old_meta = g.u32[u + 5]
            self._save(g.eoff + e * L.ENTRY_BYTES, L.ENTRY_BYTES)
            if vraw is not None or (old_meta & 0xFF) in L.HEAP_KINDS:
                self._save_header()
            if (old_meta & 0xFF) in L.HEAP_KINDS:
                g.q[L.H_GARBAGE] += (g.u32[u + 7] + 7) // 8
            if vraw is not None:
                vinl = self._alloc(g, vraw) | (len(vraw) << 32)
            self._write_entry(g, e, h, g.u32[u + 3], g.u32[u + 4], vkind | (kkind << 8) | L.LIVE, vinl)
        else:  # insert at the end
            q = g.q
            used = q[L.H_USED]
            if used >= g.cap or slot < 0:
                raise L.Grow
            self._save_header()
            self._save(L.HEADER_BYTES + (slot * 4 & ~7), 8)
            koff = self._alloc(g, kb)
            if vraw is not None:
                vinl = self._alloc(g, vraw) | (len(vraw) << 32)
            e = used
            self._write_entry(g, e, h, len(kb), koff, vkind | (kkind << 8) | L.LIVE, vinl)
            q[L.H_USED] = used + 1
            q[L.H_LIVE] += 1
            g.i32[L.HEADER_BYTES // 4 + slot] = e
        L.fault("after_write")
        if len(self._slots) >= L.CACHE_MAX:
            self._slots.clear()
        self._slots[key] = g.ew + e * 4

    def _delete(self, g: L.Generation, e: int, slot: int) -> None:
        u = (g.ew + e * 4) * 2
        meta = g.u32[u + 5]
        self._save_header()
        self._save(g.eoff + e * L.ENTRY_BYTES, L.ENTRY_BYTES)
        self._save(L.HEADER_BYTES + (slot * 4 & ~7), 8)
        garbage = (g.u32[u + 3] + 7) // 8
        if (meta & 0xFF) in L.HEAP_KINDS:
            garbage += (g.u32[u + 7] + 7) // 8
        self._write_entry(g, e, g.u32[u + 2], g.u32[u + 3], g.u32[u + 4], meta & ~L.LIVE,
                          g.qs[(g.ew + e * 4) + 3])
        g.i32[L.HEADER_BYTES // 4 + slot] = L.DELETED
        g.q[L.H_LIVE] -= 1
        g.q[L.H_GARBAGE] += garbage

    def _rebuild(self, extra_entries: int = 0, extra_heap: int = 0, empty: bool = False,
                 changes: Any = None) -> None:
        """Copy the live entries into a new generation with room to spare (and with
        ``changes``: see ``build_generation``), then switch to it. If the new generation
        cannot be built (``CapacityError``: no room for it), the old one stays, unchanged."""
        c, old = self._c, self._g
        target = old.gen + 1
        new = self._build(target, extra_entries, extra_heap, empty, changes)
        L.fault("mid_grow")
        c[L.C_GEN] = target
        L.fault("mid_switch")
        c[L.C_GSEQ] = target * 2  # one aligned store publishes the new generation
        L.fault("after_switch")
        L.unlink_quiet(old.path)
        c[L.C_GROW] = 0
        old.close()
        self._g, self._gen, self._epoch, self._q = new, target, target * 2, new.q
        self._maps.g = new
        self._forget()

    def _build(self, target: int, extra_entries: int, extra_heap: int, empty: bool,
               changes: Any = None) -> L.Generation:
        """``build_generation`` with ``grow`` set while it runs; on any failure (no room in
        the runtime dir, above all) nothing of the new generation is left behind."""
        from ._shm_rebuild import build_generation

        c = self._c
        c[L.C_GROW] = target
        try:
            return build_generation(self._seg, self._g, target, extra_entries, extra_heap,
                                    empty, self._config.capacity or 0, c, changes)
        except BaseException:
            L.unlink_quiet(L.data_path(self._seg, target))  # (its mapping: with its frame)
            c[L.C_GROW] = 0
            raise

    def _maybe_compact(self) -> None:
        """Rebuild when deleted entries or dead heap bytes dominate, so lookups stay short.
        Optional: with no room for the compacted copy, the table stays as it is."""
        g = self._g
        q = g.q
        used, live = q[L.H_USED], q[L.H_LIVE]
        if (used > 64 and live < used // 4) or (q[L.H_GARBAGE] > 4096
                                                and q[L.H_GARBAGE] * 2 > q[L.H_TOP]):
            try:
                self._rebuild()
            except CapacityError:
                pass

    def _put_many(self, encoded: list) -> None:
        """Apply many puts as one transaction; too big for the journal: in a new generation."""
        if len(encoded) <= 256:
            self._begin()
            try:
                for item in encoded:
                    self._put(*item)
            except L.Grow:
                self._abort()
            except BaseException:
                self._abort()
                raise
            else:
                self._commit()
                return
        heap = sum((len(kb) + 7) // 8 + (len(v or b"") + 7) // 8 + 1
                   for _, _, kb, _, _, _, v in encoded)
        self._rebuild_with(encoded, heap * 8)

    def _rebuild_with(self, encoded: list, heap_bytes: int) -> None:
        """Build a new generation holding the current data plus ``encoded``, then switch once.

        Nobody else can see the new generation until the switch, so the puts need
        no journal, and readers see all of them or none.
        """
        c, old = self._c, self._g
        target = old.gen + 1
        new = self._build(target, len(encoded), heap_bytes, False)
        self._g, self._gen, self._q = new, target, new.q  # write into the unpublished generation
        self._epoch = old.gen * 2
        self._slots.clear()
        self._journaling = False
        try:
            for item in encoded:
                self._put(*item)
        except BaseException:
            self._g, self._gen, self._epoch, self._q = old, old.gen, old.gen * 2, old.q
            new.close()
            L.unlink_quiet(new.path)
            c[L.C_GROW] = 0
            self._slots.clear()
            raise
        finally:
            self._journaling = True
        L.fault("mid_grow")
        c[L.C_GEN] = target
        L.fault("mid_switch")
        c[L.C_GSEQ] = target * 2
        self._epoch = target * 2
        L.fault("after_switch")
        L.unlink_quiet(old.path)
        c[L.C_GROW] = 0
        old.close()
        self._maps.g = new
        self._forget()
