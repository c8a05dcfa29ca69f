"""The ``shm`` table's commonest writes, done flat: one Python frame for a whole write.

In pure Python a call costs about as much as a store to shared memory, so the
writes that dominate real workloads are done here by one function each, with
every step inline, instead of by the Table's steps one call after another:

- :func:`overwrite`: a str/bytes/pickled value over a key this process placed
  (its entry from ``Table.slots``: no key encoding, no probe) whose room it fits,
  written in place; :func:`insert`: a new key; :func:`write_flat` picks one of
  the two. The lock is free (or held by this thread's ``lock()``: the mutex is
  recursive, and other threads find it taken) and nothing needs repair. Each
  does the very stores, in the same order and with the same fault points, as ``Table.enter``,
  ``Journal.begin``, ``Table.put`` and ``Journal.commit`` (a journal's records
  written with one ``pack_into``); ``tests/test_shm_table.py`` pins the bytes
  they leave, called directly and through ``d[k] = value``, to those of the
  steps. Anything else returns False, having changed nothing, and the caller
  takes the steps.
- :func:`remove_flat`: ``del`` and ``pop`` of a key, found by a probe or, for a
  key this process placed, from its slot (the index slot from the entry's
  hash); pinned the same way.
- :func:`store_number`: ``d[k] = number`` and ``incr`` for a key whose entry
  holds a number: :meth:`Table.store_inline` under a ``trylock``.
  (``ShmMapping.__setitem__`` repeats that store inline once more; pinned too.)
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from ... import _runtime
from . import layout as L
from .codec import decode_value, f2i, i2f
from .layout import (
    C_GROW,
    C_GSEQ,
    C_JCOUNT,
    C_JSTATE,
    C_JWORDS,
    C_STAMP,
    C_TSEQ,
    C_WRITER,
    CACHE_MAX,
    DELETED,
    EMPTY,
    ENTRY_BYTES,
    H_GARBAGE,
    H_LIVE,
    H_TOP,
    H_USED,
    HEADER_BYTES,
    HEAP_KINDS,
    INPLACE_MAX_WORDS,
    J_JOURNAL,
    JOURNAL_WORD,
    LIVE,
    SPARE_MAX,
    SPARE_SHIFT,
    V_FLOAT,
    V_INT,
)
from .lock import EOWNERDEAD

if TYPE_CHECKING:
    from .table import Table

#: The journal of an overwrite in place, whole but for the value's old bytes: the entry's
#: record (offset, 32, its bytes), then the value's record head (offset, nbytes).
_PACK_ENTRY_RECORD = struct.Struct("<QQ32sQQ").pack_into
#: The journal of an insert: the data header's record, then the index word's.
_PACK_HEADER_RECORD = struct.Struct("<QQ64sQQ8s").pack_into
_HEADER_RECORD_WORDS = (16 + HEADER_BYTES + 16 + 8) >> 3
#: The journal of a delete: the data header's, the entry's and the index word's records.
_PACK_REMOVE_RECORD = struct.Struct("<QQ64sQQ32sQQ8s").pack_into
_REMOVE_RECORD_WORDS = (16 + HEADER_BYTES + 16 + ENTRY_BYTES + 16 + 8) >> 3
_PACK_ENTRY_TAIL = struct.Struct("<IIIIq").pack_into  # an entry's words after its version
_ZEROS = bytes(8)
#: An insert's key and value, each padded with zeros to whole words, in one call (~150 ns
#: less than joining them first): one ``pack_into`` per size pair, for sizes up to 512 B each.
_PACK_HEAP: dict[int, Any] = {}
_PACK_MAX_WORDS = 64
_PACK_VALUE: dict[int, Any] = {}  # (the same for an overwrite's value)
_PACK_RECORDS: dict[int, Any] = {}  # (and its journal: _PACK_ENTRY_RECORD + the old words)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_JB = JOURNAL_WORD * 8  # the journal's first byte in the control segment
ABSENT = object()  # (remove: no such key)
_IBASE = HEADER_BYTES // 4  # the index's first int32


def write_flat(t: Table, key: Any, kkind: int, kb: bytes, h: int, vkind: int, vinl: int,
               vraw: bytes | None) -> bool:
    """One whole write, flat, if it is one of the common cases (see the module
    docstring); False, with nothing changed, for the Table's steps to do it."""
    w = t.slots.get(key, -1)
    if w >= 0:
        return vraw is not None and overwrite(t, key, w, vkind, vraw)
    return insert(t, key, kkind, kb, h, vkind, vinl, vraw)


def overwrite(t: Table, key: Any, w: int, vkind: int, vraw: bytes) -> bool:
    """A heap value over the value of a key this process placed (``w``: its entry's data
    word, from ``t.slots``), written in place in the key's room if it fits; False, with
    nothing changed, otherwise. (A key in ``slots`` means this process set its lock up:
    a forked child's ``slots`` start empty.)"""
    lk = t.lock
    if lk.busy:
        return False  # (inside this thread's own write: the steps raise ReentrantWriteError)
    n = len(vraw)  # (calls before the lock: a signal handler may run at a call)
    words = (n + 7) >> 3
    rc = lk.trylock()
    if rc:
        if rc == EOWNERDEAD:  # held now, after a dead holder: the steps repair
            lk.mutex.make_consistent()
            lk.unlock()
        return False
    lk.busy = 1  # (a write begun by a signal handler from here on: ReentrantWriteError)
    try:
        # the lock is held: from here on, everything read is what the steps would read.
        # (gen needs no check: it changes only with grow set until the epoch names the new one.)
        c = t.c
        if (c[C_GSEQ] != t.epoch or c[C_JSTATE] or c[C_GROW] or c[C_TSEQ] & 1
                or w != t.slots.get(key, -1)):
            lk.busy = 0
            lk.unlock()  # (repairs, growth, another thread's remap: the steps do it)
            return False
        g = t.g
        u32 = g.u32
        qs = g.qs
        old_meta = u32[w * 2 + 5]
        old = qs[w + 3]
        spare = ((old >> 32) + 7 >> 3) + (old_meta >> SPARE_SHIFT) - words
        if (not old_meta & LIVE or (old_meta & 0xFF) not in HEAP_KINDS or spare < 0
                or spare > SPARE_MAX or words > INPLACE_MAX_WORDS):  # (spare: 15 bits of meta)
            lk.busy = 0
            lk.unlock()
            return False
    except BaseException:  # (a raising signal handler, at the dict's get: nothing begun)
        lk.busy = 0
        lk.unlock()
        raise
    try:
        fault = L.FAULT
        c[C_WRITER] = lk.pid
        c[C_JCOUNT] = 0  # begin (jwords: set once, below; only Journal.save reads it)
        c[C_TSEQ] += 1
        c[C_JSTATE] = J_JOURNAL
        if fault:
            L.fault("after_begin")
        voff = old & 0xFFFFFFFF
        hb = g.hoff + voff * 8
        nb = words * 8
        mv = g.mv  # journal: the entry, then the value's words
        cmv = t.cmv
        mm = g.mm
        if words <= _PACK_MAX_WORDS:  # both records whole in one call (~85 ns less)
            pack = _PACK_RECORDS.get(words)
            if pack is None:
                pack = _PACK_RECORDS[words] = struct.Struct(f"<QQ32sQQ{nb}s").pack_into
            pack(cmv, _JB, w * 8, ENTRY_BYTES, mm[w * 8 : w * 8 + ENTRY_BYTES], hb, nb,
                 mm[hb : hb + nb])
        else:
            _PACK_ENTRY_RECORD(cmv, _JB, w * 8, ENTRY_BYTES, mm[w * 8 : w * 8 + ENTRY_BYTES],
                               hb, nb)
            cmv[_JB + 64 : _JB + 64 + nb] = mv[hb : hb + nb]
        c[C_JWORDS] = 8 + words
        c[C_JCOUNT] = 2
        stamp = c[C_STAMP] + 1
        c[C_STAMP] = stamp
        q = g.q
        q[w] = 2 * stamp + 1  # odd: being written
        if fault:
            L.fault("mid_entry")
        if not n & 7:
            mv[hb : hb + nb] = vraw
        elif words <= _PACK_MAX_WORDS:  # padded with zeros by one cached pack_into (~85 ns less)
            pack = _PACK_VALUE.get(words)
            if pack is None:
                pack = _PACK_VALUE[words] = struct.Struct(f"{nb}s").pack_into
            pack(mv, hb, vraw)
        else:
            mv[hb : hb + nb] = vraw + _ZEROS[: nb - n]
        # (the key's kind kept)
        u32[w * 2 + 5] = vkind | (old_meta & 0xFF00) | LIVE | spare << SPARE_SHIFT
        qs[w + 3] = voff | (n << 32)
        q[w] = 2 * stamp + 2
        if fault:
            L.fault("after_write")
            L.fault("before_commit")
        c[C_JSTATE] = 0  # commit
        c[C_TSEQ] += 1
    except BaseException:  # (KeyboardInterrupt, a raising signal handler: undo, unlock)
        try:
            _abandon(t)
        finally:  # (inline: a second interrupt at _abandon's entry must not keep the lock)
            lk.busy = 0
            lk.unlock()
        raise
    lk.busy = 0
    lk.unlock()
    return True


def insert(t: Table, key: Any, kkind: int, kb: bytes, h: int, vkind: int, vinl: int,
           vraw: bytes | None) -> bool:
    """A new key, appended (the stores of ``enter``, ``Journal.begin``, ``Table.put`` and
    ``Journal.commit``); False, with nothing changed, if the key exists, the table has no
    room, or anything needs repair."""
    lk = t.lock
    if lk.busy or lk.forkgen != _runtime.fork_generation:
        return False  # inside this thread's own write, or the lock not set up in this process
    nk = len(kb)  # (calls before the lock: a signal handler may run at a call)
    kw = (nk + 7) >> 3
    vw = 0 if vraw is None else (len(vraw) + 7) >> 3
    words = kw + vw
    rc = lk.trylock()
    if rc:
        if rc == EOWNERDEAD:  # held now, after a dead holder: the steps repair
            lk.mutex.make_consistent()
            lk.unlock()
        return False
    lk.busy = 1  # (a write begun by a signal handler from here on: ReentrantWriteError)
    c = t.c
    if c[C_GSEQ] != t.epoch or c[C_JSTATE] or c[C_GROW] or c[C_TSEQ] & 1:
        lk.busy = 0
        lk.unlock()  # (repairs, growth: the steps do it)
        return False
    g = t.g
    q = g.q
    used = q[H_USED]
    top = q[H_TOP]
    try:  # read.probe, inline (a call and its tuple cost ~15 % of an insert)
        i32 = g.i32
        isize = g.isize
        slot = h % isize
        e = i32[_IBASE + slot]
        if e != EMPTY:
            u32, mv, ebase, hoff = g.u32, g.mv, g.eoff >> 2, g.hoff
            free = -1
            for _ in range(isize):
                if e == DELETED:
                    if free < 0:
                        free = slot
                elif e == EMPTY:
                    break
                else:
                    u = ebase + e * 8
                    if (u32[u + 2] == h and u32[u + 3] == nk and (u32[u + 5] >> 8) & 0xFF == kkind
                            and mv[hoff + u32[u + 4] * 8 : hoff + u32[u + 4] * 8 + nk] == kb):
                        lk.busy = 0
                        lk.unlock()  # an existing key: the steps do it
                        return False
                slot += 1
                if slot == isize:
                    slot = 0
                e = i32[_IBASE + slot]
            else:
                slot = free  # (a full loop: no empty slot; -1 if no deleted one either)
            if free >= 0:
                slot = free
    except BaseException:
        lk.busy = 0
        lk.unlock()
        raise
    if slot < 0 or used >= g.cap or top + words > g.heapw:
        lk.busy = 0
        lk.unlock()  # (no room: the steps do it, growing the table)
        return False
    try:
        fault = L.FAULT
        c[C_WRITER] = lk.pid
        c[C_JCOUNT] = 0  # begin (jwords: set once, below; only Journal.save reads it)
        c[C_TSEQ] += 1
        c[C_JSTATE] = J_JOURNAL
        if fault:
            L.fault("after_begin")
        ioff = HEADER_BYTES + (slot * 4 & ~7)
        mm = g.mm  # journal: the header, then the index word
        _PACK_HEADER_RECORD(t.cmv, _JB, 0, HEADER_BYTES, mm[0:HEADER_BYTES], ioff, 8,
                            mm[ioff : ioff + 8])
        c[C_JWORDS] = _HEADER_RECORD_WORDS
        c[C_JCOUNT] = 2
        q[H_TOP] = top + words  # the key and the value, after the heap top
        b = g.hoff + top * 8
        if kw <= _PACK_MAX_WORDS and vw <= _PACK_MAX_WORDS:  # one call, padded with zeros
            pack = _PACK_HEAP.get(kw << 8 | vw)
            if pack is None:
                pack = _PACK_HEAP[kw << 8 | vw] = struct.Struct(f"{kw * 8}s{vw * 8}s").pack_into
            pack(g.mv, b, kb, b"" if vraw is None else vraw)
        else:
            data = kb + _ZEROS[: -nk & 7]
            if vraw is not None:
                data += vraw + _ZEROS[: -len(vraw) & 7]
            g.mv[b : b + len(data)] = data
        if vraw is not None:
            vinl = (top + ((nk + 7) >> 3)) | (len(vraw) << 32)
        stamp = c[C_STAMP] + 1
        c[C_STAMP] = stamp
        w = g.ew + used * 4
        q[w] = 2 * stamp + 1  # odd: being written
        if fault:
            L.fault("mid_entry")
        _PACK_ENTRY_TAIL(g.mv, w * 8 + 8, h, nk, top, vkind | (kkind << 8) | LIVE, vinl)
        q[w] = 2 * stamp + 2
        q[H_USED] = used + 1
        q[H_LIVE] += 1
        g.i32[HEADER_BYTES // 4 + slot] = used
        if fault:
            L.fault("after_write")
        slots = t.slots
        if len(slots) >= CACHE_MAX:
            from .table import _drop_oldest

            _drop_oldest(slots, CACHE_MAX // 8)
        slots[key] = w
        if fault:
            L.fault("before_commit")
        c[C_JSTATE] = 0  # commit
        c[C_TSEQ] += 1
    except BaseException:  # (KeyboardInterrupt, a raising signal handler: undo, unlock)
        try:
            _abandon(t)
        finally:  # (inline: a second interrupt at _abandon's entry must not keep the lock)
            lk.busy = 0
            lk.unlock()
        raise
    lk.busy = 0
    lk.unlock()
    return True


def _abandon(t: Table) -> None:
    """A flat write interrupted inside its transaction by an exception: roll it back (the
    journal is whole before any data changes) and forget what this process cached (an
    insert records its entry before the commit) -- or, cut between the commit's two stores,
    finish the commit -- as ``Table.set`` does. (The caller then releases the lock: a
    second interrupt here leaves the transaction open, and the next writer repairs it.)"""
    c = t.c
    if c[C_JSTATE]:
        t.abort()
    elif c[C_TSEQ] & 1:  # between begin's stores, or the commit's: nothing to undo
        c[C_TSEQ] += 1


NOT_FLAT = object()  # (remove_flat: not a common case, nothing done)


def remove_flat(t: Table, key: Any, kkind: int, kb: bytes, h: int, want: bool,
                w: int = -1) -> Any:
    """``Table.remove`` flat, when the lock is free (or this thread's) and nothing needs
    repair: the stores of ``enter``, ``Journal.begin``, ``Table.delete`` and
    ``Journal.commit`` in their order, with their fault points. The key's value with
    ``want`` (else None), ``ABSENT`` if there is no such key, ``NOT_FLAT`` (nothing done)
    for the Table's steps to do it.

    ``w``: the key's entry from ``t.slots`` (a key this process placed; ``kkind``, ``kb``
    and ``h`` are then unused): no probe, its index slot found from the entry's hash."""
    lk = t.lock
    if lk.busy or (w < 0 and lk.forkgen != _runtime.fork_generation):
        return NOT_FLAT  # (a key in slots: this process set its lock up)
    rc = lk.trylock()
    if rc:
        if rc == EOWNERDEAD:  # held now, after a dead holder: the steps repair
            lk.mutex.make_consistent()
            lk.unlock()
        return NOT_FLAT
    try:
        lk.busy = 1
        c = t.c
        g = t.g
        if c[C_GSEQ] != t.epoch or c[C_JSTATE] or c[C_GROW] or c[C_TSEQ] & 1:
            return NOT_FLAT  # (gen: as in overwrite)
        c[C_WRITER] = lk.pid
        u32 = g.u32
        if w < 0:  # read.probe, inline (a call and its tuple: ~10 % of a delete)
            i32 = g.i32
            isize = g.isize
            slot = h % isize
            mv, ebase, hoff, nk = g.mv, g.eoff >> 2, g.hoff, len(kb)
            for _ in range(isize):
                e = i32[_IBASE + slot]
                if e == EMPTY:
                    return ABSENT
                if e >= 0:
                    u = ebase + e * 8
                    if (u32[u + 2] == h and u32[u + 3] == nk and (u32[u + 5] >> 8) & 0xFF == kkind
                            and mv[hoff + u32[u + 4] * 8 : hoff + u32[u + 4] * 8 + nk] == kb):
                        break
                slot += 1
                if slot == isize:
                    slot = 0
            else:
                return ABSENT
            w = g.ew + e * 4
            meta = u32[w * 2 + 5]
        else:  # the key's entry, if still live (else another process deleted it: probe)
            meta = u32[w * 2 + 5]
            if w != t.slots.get(key, -1) or not meta & LIVE:
                return NOT_FLAT
            e = (w - g.ew) >> 2
            i32 = g.i32
            isize = g.isize
            slot = u32[w * 2 + 2] % isize
            x = i32[_IBASE + slot]
            if x != e:  # (past its home slot: collisions)
                for _ in range(isize):
                    if x == EMPTY:
                        return NOT_FLAT  # (never, in a sound table)
                    slot += 1
                    if slot == isize:
                        slot = 0
                    x = i32[_IBASE + slot]
                    if x == e:
                        break
                else:
                    return NOT_FLAT
        u = w * 2
        inline = g.qs[w + 3]
        value = None
        if want:
            raw = None
            if (meta & 0xFF) in HEAP_KINDS:
                start = g.hoff + (inline & 0xFFFFFFFF) * 8
                raw = bytes(g.mv[start : start + (inline >> 32)])
            value = decode_value(meta & 0xFF, inline, raw)  # (before: a bad pickle raises)
        fault = L.FAULT
        c[C_JCOUNT] = 0  # begin (jwords: set once, below)
        c[C_TSEQ] += 1
        c[C_JSTATE] = J_JOURNAL
        if fault:
            L.fault("after_begin")
        ioff = HEADER_BYTES + (slot * 4 & ~7)
        mm = g.mm  # journal: the header, the entry, the index word
        _PACK_REMOVE_RECORD(t.cmv, _JB, 0, HEADER_BYTES, mm[0:HEADER_BYTES], w * 8,
                            ENTRY_BYTES, mm[w * 8 : w * 8 + ENTRY_BYTES], ioff, 8,
                            mm[ioff : ioff + 8])
        c[C_JWORDS] = _REMOVE_RECORD_WORDS
        c[C_JCOUNT] = 3
        klen = u32[u + 3]
        garbage = (klen + 7) // 8
        if (meta & 0xFF) in HEAP_KINDS:
            garbage += (u32[u + 7] + 7) // 8 + (meta >> SPARE_SHIFT)
        stamp = c[C_STAMP] + 1
        c[C_STAMP] = stamp
        q = g.q
        q[w] = 2 * stamp + 1  # odd: being written
        if fault:
            L.fault("mid_entry")
        _PACK_ENTRY_TAIL(g.mv, w * 8 + 8, u32[u + 2], klen, u32[u + 4], meta & ~LIVE, inline)
        q[w] = 2 * stamp + 2
        g.i32[HEADER_BYTES // 4 + slot] = DELETED
        live = q[H_LIVE] - 1
        q[H_LIVE] = live
        garbage += q[H_GARBAGE]
        q[H_GARBAGE] = garbage
        if fault:
            L.fault("before_commit")
        c[C_JSTATE] = 0  # commit
        c[C_TSEQ] += 1
        t.slots.pop(key, None)
        used = q[H_USED]
        if (used > 64 and live < used // 4) or (garbage > 4096 and garbage * 4 > q[H_TOP] * 3):
            t.maybe_compact()  # (the very test it makes, here without a call)
        return value
    except BaseException:  # (KeyboardInterrupt, a raising signal handler: undo, as _abandon)
        c = t.c  # (the state was checked clean before any call: a transaction open is ours)
        if c[C_JSTATE]:
            t.abort()
        elif c[C_TSEQ] & 1:
            c[C_TSEQ] += 1
        raise
    finally:
        lk.busy = 0
        lk.unlock()


def store_number(t: Table, key: Any, kind: int, inline: int, delta: Any, vt: Any) -> Any:
    """``d[k] = number`` and ``incr`` without a transaction: the key's entry in this
    generation holds a number inline and gets another of the same kind in place
    (:meth:`Table.store_inline`). Returns False, having changed nothing, whenever anything
    is unusual (key not yet placed, repair pending, growth, a kind change, another
    thread inside ``lock()``) and the caller takes the general path. With ``delta``
    (``incr``), adds it (coerced by ``vt`` if given) and returns the new value."""
    w = t.slots.get(key, -1)  # filled only once this process's lock is set up
    lk = t.lock
    if w < 0 or lk.busy:
        return False
    rc = lk.trylock()
    if rc:
        got = lk.contended(rc, t.timeout)
        if got is None:
            raise t.timed_out()  # (the general path must not wait a second timeout)
        if not got:
            return False
    try:
        lk.busy = 1
        c = t.c
        if c[C_GSEQ] != t.epoch or c[C_JSTATE] or c[C_GROW] or c[C_TSEQ] & 1:
            return False
        g = t.g
        meta = g.u32[w * 2 + 5]
        if delta is not None:  # incr: the new value from the current one
            old_kind = meta & 0xFF
            if old_kind == V_INT:
                new = g.qs[w + 3] + delta
            elif old_kind == V_FLOAT:
                new = i2f(g.qs[w + 3]) + delta
            else:
                return False
            if vt is not None:
                new = vt.coerce(new)
            if type(new) is int and _INT64_MIN <= new <= _INT64_MAX:
                kind, inline = V_INT, new
            elif type(new) is float:
                kind, inline = V_FLOAT, f2i(new)
            else:
                return False
        if meta & (LIVE | 0xFF) != LIVE | kind:
            return False
        t.store_inline(w, inline)
    finally:
        lk.busy = 0
        lk.unlock()
    return True if delta is None else new

