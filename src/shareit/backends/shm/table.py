"""The ``shm`` table: one process's view of it, and every step taken with the writer lock.

A :class:`Table` owns the control segment's views, the mapped generation, the
writer lock (:mod:`.lock`) and this process's caches of the generation (the
read cache and the key -> entry slots), and does every locked step: find, put,
delete, the inline numeric store, the undo journal (begin, save, commit,
rollback, recover), and the one generation switch that growth, compaction,
``clear`` and bulk builds all end with. A write journals what it changes
(:mod:`.journal`); a writer killed mid-write is rolled back by the next one
(:meth:`Table.recover`).

Rebuilds build a whole new generation out of sight (``grow`` set while they
run) and publish it with one aligned store (:meth:`Table.switch`).
"""

from __future__ import annotations

import os
import struct
from itertools import islice
from typing import Any

from ... import _runtime
from ...errors import BackendDiedError, CapacityError, lock_timeout, reentrant_write
from . import layout as L
from .cache import ReadCache
from .codec import decode_value
from .fastpath import ABSENT
from .journal import Journal
from .layout import (
    C_GROW,
    C_GSEQ,
    C_JSTATE,
    C_STAMP,
    C_TSEQ,
    CACHE_MAX,
    ENTRY_BYTES,
    H_GARBAGE,
    H_LIVE,
    H_USED,
    HEADER_BYTES,
    HEAP_KINDS,
    INPLACE_MAX_WORDS,
    J_INLINE,
    LIVE,
    SPARE_MAX,
    SPARE_SHIFT,
)
from .lock import EOWNERDEAD, WriterLock
from .read import probe
from .segments import Maps, bytes_view, data_path, data_segments, unlink_quiet

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_PACK_ENTRY_TAIL = struct.Struct("<IIIIq").pack_into  # an entry's words after its version
_ZEROS = bytes(8)
_PACK_RECORD = struct.Struct("<QQ").pack  # a journal record's (offset, nbytes)
Encoded = tuple[Any, int, bytes, int, int, int, "bytes | None"]  # key, kkind, kb, hash, value


class Table:
    """One process's handle on an shm table (see the module docstring)."""

    __slots__ = ("seg", "label", "timeout", "cap_hint", "cmm", "cmv", "c", "maps", "lock",
                 "g", "gen", "epoch", "q", "slots", "cache", "over", "journal", "peak")

    find = staticmethod(probe)  # (entry, index slot) of a key, or (-1, where it would go)

    def __init__(self, seg: str, cmm: Any, label: str, timeout: float, cap_hint: int):
        self.seg, self.cmm, self.label = seg, cmm, label
        self.timeout, self.cap_hint = timeout, cap_hint
        self.cmv: Any = bytes_view(cmm)  # (None once closed, like the rest)
        self.c: Any = self.cmv.cast("Q")
        self.maps = Maps(cmm, self.cmv, self.c)
        self.lock = WriterLock(seg, cmm, self.c, self.maps)
        self.g: Any = None  # the mapped generation (an L.Generation), None once closed
        self.gen = self.epoch = -1
        self.q: Any = None  # the generation's words
        self.slots: dict[Any, int] = {}  # key -> its entry's data word (the fast write path)
        self.cache = ReadCache()
        self.over: Any = None  # the journal overlay last built (:mod:`.read`)
        self.journal = Journal(self.c, self.cmv)
        self.peak = 0  # the capacity this process's last compaction shrank from (regrowth)
        # (the caller maps the current generation: map_current)

    # ------------------------------------------------------------------ generations mapped

    def died(self) -> BackendDiedError:
        return BackendDiedError(
            f"shm mapping {self.label} was destroyed by another process; open it again")

    def map_current(self, want: int | None = None) -> None:
        """Map the generation the control segment names (following growth), or ``want``."""
        for _ in range(1000):
            gen = self.c[L.C_GEN] if want is None else want
            if gen == L.DESTROYED or self.c[L.C_GEN] == L.DESTROYED:
                raise self.died()
            if self.g is not None and self.g.gen == gen:
                return
            try:
                g = L.Generation.open(self.seg, gen)
            except FileNotFoundError:
                if want is not None:
                    return  # replaced meanwhile: the caller reads the epoch again
                continue  # replaced by a newer generation meanwhile
            if self.g is not None:
                self.g.close()
            self.adopt(g)
            return
        raise self.died()

    def adopt(self, g: L.Generation) -> None:
        self.g, self.gen, self.epoch, self.q = g, g.gen, g.gen * 2, g.q
        self.maps.g = g
        self.forget()

    def forget(self) -> None:
        """Drop what this process cached of the current generation."""
        self.cache.clear()
        self.slots.clear()

    # ------------------------------------------------------------------ the writer lock

    def acquire(self, timeout: float) -> bool:
        lk = self.lock
        if not lk.ready():
            try:
                lk.setup()
            except FileNotFoundError:
                raise self.died() from None
        if not lk.acquire(timeout):
            return False
        if lk.busy:  # inside this thread's own write (a signal handler's lock() or write)
            lk.release()
            raise reentrant_write(f"shm mapping {self.label}")
        if lk.depth == 1:
            lk.busy = 1  # (a repair is a write: a signal handler's write waits it out)
            try:
                self._after_acquire()  # repairs whatever a dead writer left
            except BaseException:
                lk.busy = 0
                lk.release()
                raise
            lk.busy = 0
        return True

    def release(self) -> None:
        lk = self.lock
        lk.depth -= 1
        rc = lk.unlock()
        if rc:
            raise OSError(rc, f"unlocking the writer lock failed ({os.strerror(rc)})")

    def wlock(self) -> None:
        """Take the lock for one write (or locked read) within ``timeout``, or raise
        ``LockTimeoutError``; :meth:`leave` ends it."""
        if not self.acquire(self.timeout):
            raise self.timed_out()
        self.lock.busy = 1

    def leave(self) -> None:
        """The end of one write begun by :meth:`enter` or :meth:`wlock`."""
        self.lock.busy = 0
        self.release()

    def enter(self) -> None:
        """:meth:`wlock` for one write: when the lock is free and the table needs no repair
        (the common case), a ``trylock`` and five word reads."""
        lk = self.lock
        rc = lk.trylock() if lk.forkgen == _runtime.fork_generation else -1
        if rc:
            if rc == EOWNERDEAD:  # held now, after a dead holder: wlock() repairs
                lk.mutex.make_consistent()
                lk.unlock()
            self.wlock()
            return
        if lk.busy:  # (the mutex is recursive: a signal handler inside this thread's write)
            lk.unlock()
            raise reentrant_write(f"shm mapping {self.label}")
        lk.busy = 1
        lk.depth += 1
        if lk.depth == 1:
            c = self.c
            if (c[C_GSEQ] != self.epoch or c[L.C_GEN] != self.gen or c[C_JSTATE] or c[C_GROW]
                    or c[C_TSEQ] & 1):
                try:
                    self._after_acquire()
                except BaseException:
                    self.leave()
                    raise
            else:
                c[L.C_WRITER] = lk.pid

    def timed_out(self) -> Exception:
        return lock_timeout(f"shm mapping {self.label}", self.timeout,
                            "another process holds lock()")

    def _after_acquire(self) -> None:
        c = self.c
        if c[L.C_GEN] == L.DESTROYED:
            raise self.died()
        if c[C_JSTATE] or c[C_GROW] or c[C_GSEQ] != c[L.C_GEN] * 2 or c[C_TSEQ] & 1:
            self.recover()
        if c[L.C_GEN] != self.gen:
            self.map_current()
        c[L.C_WRITER] = self.lock.pid

    # ------------------------------------------------------------------ transactions

    def recover(self) -> None:
        """Repair what a writer killed mid-write left: roll back its journal, finish growth."""
        c = self.c
        target = c[C_GROW]
        if target:
            if c[L.C_GEN] == target:  # switched; the old generation may still be linked
                for path in data_segments(self.seg):
                    if path != data_path(self.seg, target):
                        unlink_quiet(path)
            else:  # died while building: the half-built generation is garbage
                unlink_quiet(data_path(self.seg, target))
            c[C_GROW] = 0
        self.map_current()
        if c[C_JSTATE] == L.J_JOURNAL:  # (J_INLINE carries the entry's word offset)
            self.journal.rollback(self.g)
        elif c[C_JSTATE] & 3 == J_INLINE:  # one value word, old or new: end the write
            w = c[C_JSTATE] >> 2
            if self.g.q[w] & 1:
                stamp = c[C_STAMP] + 1
                c[C_STAMP] = stamp
                self.g.q[w] = 2 * stamp + 2
        c[C_JSTATE] = 0
        if c[C_TSEQ] & 1:
            c[C_TSEQ] += 1  # readers stop laying the (now empty) journal over the data
        c[C_GSEQ] = c[L.C_GEN] * 2  # right after a switch cut short
        self.epoch = c[L.C_GEN] * 2
        self.forget()

    def abort(self, forget: bool = True) -> None:
        """Roll back the open transaction (the lock is held: readers never saw it).
        ``forget=False``: one ``put`` that raised ``Grow``, which it does before it changes
        any data or slot, so what this process cached still holds."""
        self.journal.rollback(self.g)
        self.journal.finish()
        if forget:
            self.forget()

    # ------------------------------------------------------------------ entries

    def alloc(self, g: L.Generation, *parts: bytes, spare: int = 0) -> int:
        """Append ``parts`` to the heap, each from a word of its own (zero-padded: bulk
        lookups compare whole words), and ``spare`` words more; the offset in words of the
        first. The header must be journaled."""
        q = g.q
        top = q[L.H_TOP]
        blob = b"".join([p + _ZEROS[: -len(p) & 7] for p in parts]) if len(parts) > 1 \
            or len(parts[0]) & 7 else parts[0]
        words = len(blob) >> 3
        if top + words + spare > g.heapw:
            raise L.Grow
        q[L.H_TOP] = top + words + spare
        b = g.hoff + top * 8
        g.mv[b : b + len(blob)] = blob
        return top

    def write_entry(self, g: L.Generation, e: int, h: int, klen: int, koff: int, meta: int,
                    val: int) -> None:
        """Write entry ``e`` whole, its version odd meanwhile (journaled before)."""
        c = self.c
        stamp = c[C_STAMP] + 1
        c[C_STAMP] = stamp
        w = g.ew + e * 4
        g.q[w] = 2 * stamp + 1  # odd: being written
        if L.FAULT:
            L.fault("mid_entry")
        _PACK_ENTRY_TAIL(g.mv, w * 8 + 8, h, klen, koff, meta, val)
        g.q[w] = 2 * stamp + 2

    def put(self, key: Any, kkind: int, kb: bytes, h: int, vkind: int, vinl: int,
            vraw: bytes | None) -> None:
        """Set one key; the writer lock is held and a transaction is open."""
        g = self.g
        w = self.slots.get(key, -1)
        e = (w - g.ew) // 4 if w >= 0 and g.u32[w * 2 + 5] & LIVE else -1
        if e < 0:
            e, slot = probe(g, kkind, kb, h)
        j = self.journal
        if e >= 0:  # an existing key: its entry keeps its place (dict order)
            w = g.ew + e * 4
            old_meta = g.u32[w * 2 + 5]
            eoff = w * 8
            meta = vkind | (kkind << 8) | LIVE
            in_place = False
            if (old_meta & 0xFF) in HEAP_KINDS:
                old = g.qs[w + 3]
                room = ((old >> 32) + 7 >> 3) + (old_meta >> SPARE_SHIFT)  # the key's words
                if vraw is not None:
                    words = (len(vraw) + 7) >> 3
                    in_place = (words <= room and words <= INPLACE_MAX_WORDS
                                and room - words <= SPARE_MAX)  # (spare: 15 bits of meta)
                    if in_place:  # over the old value, in the key's own room: the old
                        # bytes and the entry journaled first, the version odd from before
                        # the bytes change until after the entry's fields do
                        voff = old & 0xFFFFFFFF
                        hb = g.hoff + voff * 8
                        j.save(g, ((eoff, ENTRY_BYTES), (hb, words * 8)))
                        c = self.c
                        stamp = c[C_STAMP] + 1
                        c[C_STAMP] = stamp
                        g.q[w] = 2 * stamp + 1  # odd: being written
                        if L.FAULT:
                            L.fault("mid_entry")
                        g.mv[hb : hb + words * 8] = vraw + _ZEROS[: -len(vraw) & 7] \
                            if len(vraw) & 7 else vraw
                        g.u32[w * 2 + 5] = meta | (room - words) << SPARE_SHIFT
                        g.qs[w + 3] = voff | (len(vraw) << 32)
                        g.q[w] = 2 * stamp + 2
                if not in_place:
                    j.save(g, ((eoff, ENTRY_BYTES),), True)
                    g.q[H_GARBAGE] += room
            else:
                j.save(g, ((eoff, ENTRY_BYTES),), vraw is not None)
            if not in_place:
                if vraw is not None:  # appended, with room to grow: the key is being rewritten
                    words = (len(vraw) + 7) >> 3
                    spare = min(words >> 1, SPARE_MAX) if words <= INPLACE_MAX_WORDS else 0
                    vinl = self.alloc(g, vraw, spare=spare) | (len(vraw) << 32)
                    meta |= spare << SPARE_SHIFT
                self.write_entry(g, e, h, g.u32[w * 2 + 3], g.u32[w * 2 + 4], meta, vinl)
        else:  # insert at the end
            q = g.q
            used = q[H_USED]
            if used >= g.cap or slot < 0:
                raise L.Grow
            j.save(g, ((HEADER_BYTES + (slot * 4 & ~7), 8),), True)
            if vraw is None:
                koff = self.alloc(g, kb)
            else:
                koff = self.alloc(g, kb, vraw)
                vinl = (koff + ((len(kb) + 7) >> 3)) | (len(vraw) << 32)
            e = used
            self.write_entry(g, e, h, len(kb), koff, vkind | (kkind << 8) | LIVE, vinl)
            q[H_USED] = used + 1
            q[H_LIVE] += 1
            g.i32[HEADER_BYTES // 4 + slot] = e
            w = g.ew + e * 4
        if L.FAULT:
            L.fault("after_write")
        slots = self.slots
        if len(slots) >= CACHE_MAX:
            _drop_oldest(slots, CACHE_MAX // 8)
        slots[key] = w

    def delete(self, g: L.Generation, e: int, slot: int) -> None:
        """Delete entry ``e`` (at index ``slot``); the lock is held, a transaction open."""
        u = (g.ew + e * 4) * 2
        meta = g.u32[u + 5]
        self.journal.save(g, ((g.eoff + e * L.ENTRY_BYTES, L.ENTRY_BYTES),
                              (L.HEADER_BYTES + (slot * 4 & ~7), 8)), True)
        garbage = (g.u32[u + 3] + 7) // 8
        if (meta & 0xFF) in L.HEAP_KINDS:
            garbage += (g.u32[u + 7] + 7) // 8 + (meta >> SPARE_SHIFT)
        self.write_entry(g, e, g.u32[u + 2], g.u32[u + 3], g.u32[u + 4], meta & ~LIVE,
                         g.qs[(g.ew + e * 4) + 3])
        g.i32[L.HEADER_BYTES // 4 + slot] = L.DELETED
        g.q[L.H_LIVE] -= 1
        g.q[L.H_GARBAGE] += garbage

    def set(self, key: Any, kkind: int, kb: bytes, h: int, vkind: int, vinl: int,
            vraw: bytes | None) -> None:
        """Set one key by the steps: take the lock (:meth:`enter`), :meth:`write_one`,
        release. (The mapping first tries :func:`.fastpath.write_flat`: the very same
        stores, done flat, in the commonest cases.)"""
        self.enter()
        try:
            j = self.journal
            j.begin()
            try:
                self.put(key, kkind, kb, h, vkind, vinl, vraw)
                j.commit()  # (in the try: a signal handler may raise at its call)
            except L.Grow:
                self.abort(forget=False)
                self.write_one(key, kkind, kb, h, vkind, vinl, vraw)  # (grows first)
            except BaseException:
                self.abort()
                raise
        finally:
            self.leave()

    def write_one(self, key: Any, kkind: int, kb: bytes, h: int, vkind: int, vinl: int,
                  vraw: bytes | None) -> None:
        """Set one key as one transaction, growing the table if it has no room."""
        for _ in range(3):
            self.journal.begin()
            try:
                self.put(key, kkind, kb, h, vkind, vinl, vraw)
                self.journal.commit()
            except L.Grow:
                self.abort(forget=False)
                words = (len(kb) + 7) // 8 + (len(vraw or b"") + 7) // 8
                self.rebuild(extra_entries=1, extra_heap=words * 8 + 8, regrow=self.peak)
                if self.g.cap >= self.peak:
                    self.peak = 0
                continue
            except BaseException:
                self.abort()
                raise
            return
        raise AssertionError("shm: no room after growing")  # pragma: no cover

    def remove(self, key: Any, kkind: int, kb: bytes, h: int, want: bool = False) -> Any:
        """Delete one key as one transaction: its value with ``want``, else None;
        ``ABSENT`` if there is no such key."""
        g = self.g
        e, slot = probe(g, kkind, kb, h)
        if e < 0:
            return ABSENT
        value = None
        if want:
            w = g.ew + e * 4
            inline = g.qs[w + 3]
            kind = g.u32[w * 2 + 5] & 0xFF
            raw = None
            if kind in L.HEAP_KINDS:
                start = g.hoff + (inline & 0xFFFFFFFF) * 8
                raw = bytes(g.mv[start : start + (inline >> 32)])
            value = decode_value(kind, inline, raw)  # (before the delete: a bad pickle raises)
        self.journal.begin()
        try:
            self.delete(g, e, slot)
            self.journal.commit()
        except BaseException:
            self.abort()
            raise
        self.slots.pop(key, None)
        self.maybe_compact()
        return value

    def put_many(self, encoded: list[Encoded]) -> None:
        """Apply many puts as one transaction; too big for the journal: in a new generation."""
        if len(encoded) <= 256:
            self.journal.begin()
            try:
                for item in encoded:
                    self.put(*item)
                self.journal.commit()
            except L.Grow:
                self.abort()
            except BaseException:
                self.abort()
                raise
            else:
                return
        heap = sum((len(kb) + 7) // 8 + (len(v or b"") + 7) // 8 + 1
                   for _, _, kb, _, _, _, v in encoded)
        self.rebuild_with(encoded, heap * 8)

    # ------------------------------------------------------------------ the inline numeric store

    def store_inline(self, w: int, inline: int) -> None:
        """With the lock held: the inline value word of the entry at data word ``w`` changes
        in place (``ShmMapping.__setitem__`` repeats this, for speed; a test pins the two).

        Only one aligned 8-byte word changes, which is atomic, so no undo journal
        is needed: the entry is marked in flight (``J_INLINE``), and a writer
        killed here leaves the old or the new value with an odd version, which
        the next writer makes even again.
        """
        c = self.c
        c[C_JSTATE] = (w << 2) | J_INLINE
        stamp = c[C_STAMP] + 1
        c[C_STAMP] = stamp
        q = self.g.q
        q[w] = 2 * stamp + 1
        if L.FAULT:
            L.fault("mid_entry")
        self.g.qs[w + 3] = inline
        q[w] = 2 * stamp + 2
        if L.FAULT:
            L.fault("before_commit")
        c[C_JSTATE] = 0

    # ------------------------------------------------------------------ new generations

    def build(self, target: int, extra_entries: int = 0, extra_heap: int = 0,
              empty: bool = False, changes: Any = None, regrow: int = 0) -> L.Generation:
        """``build_generation`` with ``grow`` set while it runs; on any failure (no room in
        the runtime dir, above all) nothing of the new generation is left behind."""
        from .build import build_generation  # (numpy: imported by the first rebuild only)

        c = self.c
        c[C_GROW] = target
        try:
            return build_generation(self.seg, self.g, target, extra_entries, extra_heap,
                                    empty, self.cap_hint, c, changes, regrow)
        except BaseException:
            unlink_quiet(data_path(self.seg, target))  # (its mapping: with its frame)
            c[C_GROW] = 0
            raise

    def switch(self, old: L.Generation, new: L.Generation) -> None:
        """Publish ``new`` (built out of sight while ``grow`` names it) in place of ``old``:
        one aligned store of the epoch makes readers follow, then ``old`` goes. A writer
        killed at any point here is finished by the next one (:meth:`recover`)."""
        c = self.c
        L.fault("mid_grow")
        c[L.C_GEN] = new.gen
        L.fault("mid_switch")
        c[C_GSEQ] = new.gen * 2  # one aligned store publishes the new generation
        L.fault("after_switch")
        unlink_quiet(old.path)
        c[C_GROW] = 0
        old.close()
        self.adopt(new)

    def rebuild(self, extra_entries: int = 0, extra_heap: int = 0, empty: bool = False,
                changes: Any = None, regrow: int = 0) -> None:
        """Copy the live entries into a new generation with room to spare (and with
        ``changes``: see ``build_generation``), then switch to it. If the new generation
        cannot be built (``CapacityError``: no room for it), the old one stays, unchanged."""
        old = self.g
        new = self.build(old.gen + 1, extra_entries, extra_heap, empty, changes, regrow)
        moved = None if empty or not self.slots else self._moved_slots(old, new)
        self.switch(old, new)
        if moved:
            self.slots.update(moved)

    def _moved_slots(self, old: L.Generation, new: L.Generation) -> dict[Any, int]:
        """This process's slots (key -> entry data word) in ``new``, a rebuild of ``old``
        that keeps the live entries in their order (``build_generation``), so a key placed
        before a rebuild still takes the flat paths after it. Keys whose entry is no longer
        live are left out."""
        if old.q[L.H_LIVE] == old.q[L.H_USED]:  # nothing deleted (growth): same numbers
            shift = new.ew - old.ew
            try:
                return {k: w + shift for k, w in self.slots.items()}
            except RuntimeError:  # another thread of ours changed it meanwhile
                return {}
        np = L.numpy()
        try:
            keys = list(self.slots)
            ws = np.fromiter(self.slots.values(), dtype=np.int64, count=len(keys))
        except RuntimeError:  # another thread of ours changed it meanwhile
            return {}
        used = int(old.q[L.H_USED])
        live = (old.entries()["meta"][:used] & LIVE) != 0
        e = (ws - old.ew) // 4
        ok = live[e]
        rank = np.cumsum(live) - 1  # old entry -> its number in new
        new_ws = (new.ew + rank[e[ok]] * 4).tolist()
        return dict(zip([k for k, good in zip(keys, ok.tolist()) if good], new_ws))

    def rebuild_with(self, encoded: list[Encoded], heap_bytes: int) -> None:
        """Build a new generation holding the current data plus ``encoded``, then switch.

        Nobody else can see the new generation until the switch, so the puts need
        no journal, and readers see all of them or none.
        """
        old = self.g
        new = self.build(old.gen + 1, len(encoded), heap_bytes)
        self.g, self.q = new, new.q  # write into the unpublished generation (epoch: old's)
        self.slots.clear()
        self.journal.on = False
        try:
            for item in encoded:
                self.put(*item)
        except BaseException:
            self.g, self.q = old, old.q
            new.close()
            unlink_quiet(new.path)
            self.c[C_GROW] = 0
            self.slots.clear()
            raise
        finally:
            self.journal.on = True
        self.switch(old, new)

    def maybe_compact(self) -> None:
        """Rebuild when deleted entries outnumber live ones 3 to 1, or dead heap bytes the
        live ones (a delete round that empties the table compacts ~log4 times, not log2).
        Optional: with no room for the compacted copy, the table stays as it is."""
        q = self.g.q
        used, live = q[L.H_USED], q[L.H_LIVE]
        if (used > 64 and live < used // 4) or (q[L.H_GARBAGE] > 4096
                                                and q[L.H_GARBAGE] * 4 > q[L.H_TOP] * 3):
            self.peak = max(self.peak, self.g.cap)
            try:
                self.rebuild()
            except CapacityError:
                pass

    def close(self) -> None:
        """Drop every view (``release`` in :mod:`.segments` unmaps what ``maps`` holds)."""
        self.g = self.q = None
        self.lock.close()
        self.cache.close()
        self.slots = {}
        self.journal.close()
        self.cmm = self.cmv = self.c = None  # (a closed handle pins nothing)


def _drop_oldest(d: dict[Any, Any], n: int) -> None:
    """Forget the ``n`` oldest keys of ``d`` (insertion order), not all of them."""
    try:
        for k in list(islice(d, n)):
            d.pop(k, None)
    except RuntimeError:  # another thread of ours changed it meanwhile
        d.clear()
