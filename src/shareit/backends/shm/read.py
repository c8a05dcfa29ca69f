"""The ``shm`` backend's lock-free reads of one key and of the length, and the probe.

Functions of a :class:`~.table.Table` (``t``). Plain reads never wait
for the writer lock: its holder may be a ``lock()`` block, a stopped process
or a dead one, and a read must neither block behind it nor return what it
has not committed. So every read is optimistic and validated:

- ``tseq`` even (no journaled transaction in flight): read the data directly;
  an entry's version must be even and unchanged across the read, and ``tseq``
  and the epoch unchanged afterwards (a transaction that began meanwhile may
  have inserted or changed what was read: retry).
- ``tseq`` odd: a transaction is in flight (running, stopped, or dead before
  its commit). Its undo journal holds, write-ahead, the committed bytes of
  every data word it has changed (:mod:`.table`), so the reader lays those
  pre-images over what it reads (:func:`overlay`) and gets the last
  committed state; ``tseq`` and ``jcount`` unchanged afterwards prove that no
  word it read changed without its pre-image being in the overlay (x86-64
  keeps stores, and loads, in program order; :mod:`.mapping` checks that).
- An inline numeric write (``J_INLINE``) changes one aligned word, old or new
  at every instant: an entry whose odd version belongs to it is read as is.

Values are cached only after validation, so a cache never holds a write that
did not commit; rollbacks restore exactly the committed bytes (versions
included), so a cache entry that matches after a rollback is committed data.

Three entry points, cheapest first: :func:`reread` (a cached read whose version moved:
the key's own entry, no probe), :func:`get_str` (a str key's cache miss: probe, read and
cache insert in one frame) and :func:`lookup` (any key; :func:`read` for anything but the
common case). Whole-table copies follow the same protocol (:mod:`.copies`).
"""

from __future__ import annotations

import os
import pickle
import struct
import time
from typing import TYPE_CHECKING, Any

from ...errors import lock_timeout
from . import layout as L
from .codec import decode_value
from .layout import C_GSEQ, C_JCOUNT, C_JSTATE, C_TSEQ, J_INLINE, K_STR, LIVE, V_INT, V_STR

_HEAP_KINDS = L.HEAP_KINDS
_CACHE_MAX = L.CACHE_MAX
_CACHE_BYTES, _CACHE_VALUE_MAX = L.CACHE_BYTES, L.CACHE_VALUE_MAX

if TYPE_CHECKING:
    from .table import Table

_PACK_WORD = struct.Struct("<Q").pack_into
_loads = pickle.loads
_ENTRY = struct.Struct("<QIIIIq").unpack_from  # ver, hash, klen, koff, meta, value

#: What a read of moving bytes may raise.
TORN = (IndexError, ValueError, OverflowError, KeyError, TypeError, EOFError,
        pickle.UnpicklingError)

#: A read: ``(found, value)``, or ``(True, value, w, ver, kind, raw, c, epoch, q)`` for a
#: value that may be cached once the read is validated (data word of its entry, version,
#: kind, heap bytes, the control words, the epoch it was validated against and the words
#: of the generation it was read in); None: retry.
Got = tuple[Any, ...]


def probe(g: L.Generation, kkind: int, kb: bytes, h: int) -> tuple[int, int]:
    """(entry, index slot) of a key in ``g``, or (-1, slot where it would go)."""
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


def read_entry(t: Table, kkind: int, kb: bytes, h: int) -> Got | None:
    """One direct read attempt of the current generation (see :data:`Got`)."""
    g = t.g
    e, _ = probe(g, kkind, kb, h)
    if e < 0:
        return (False, None)
    w = g.ew + e * 4
    ver = g.q[w]
    meta = g.u32[w * 2 + 5]
    kind = meta & 0xFF
    if ver & 1:
        # only an inline numeric write in flight (or stopped) may be read as is: its
        # one aligned word holds the old or the new value, and the kind stays
        if t.c[C_JSTATE] != (w << 2) | J_INLINE or not meta & L.LIVE \
                or kind not in (L.V_INT, L.V_FLOAT):
            return None
        return (True, decode_value(kind, g.qs[w + 3], None))
    inline = g.qs[w + 3]
    raw = None
    if kind in L.HEAP_KINDS:
        start = g.hoff + (inline & 0xFFFFFFFF) * 8
        raw = bytes(g.mv[start : start + (inline >> 32)])
    if g.q[w] != ver or not meta & L.LIVE:
        return None
    return (True, decode_value(kind, inline, raw), w, ver, kind, raw, t.c, t.epoch, g.q)


# ---------------------------------------------------------------------- the journal overlay


def overlay(t: Table, t1: int) -> Any:
    """``(tseq, jcount, gen, {data word: committed value}, [(first, end) word spans])``
    of the transaction in flight, or None while the journal is being rewritten (retry)."""
    c = t.c
    jc = c[C_JCOUNT]
    over = t.over
    if over is not None and over[0] == t1 and over[1] == jc and over[2] == t.gen:
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
    words: dict[int, int] = {}
    for base, src, n in reversed(recs):  # the first record of a word holds its committed value
        for i in range(n):
            words[base + i] = c[src + i]
    spans = [(base, base + n) for base, _, n in recs]
    over = t.over = (t1, jc, t.gen, words, spans)
    return over


def committed_bytes(mv: Any, start: int, n: int, over: Any) -> bytes:
    """The committed bytes [start, start + n) of a generation (``start`` on a word): as
    mapped, with the overlay's pre-images of any word a transaction in flight changed
    (a value overwritten in place)."""
    lo, hi = start >> 3, (start + n + 7) >> 3
    patch = [(a, b) for a, b in over[4] if a < hi and lo < b]
    if not patch:
        return bytes(mv[start : start + n])
    buf = bytearray(mv[lo * 8 : hi * 8])
    words = over[3]
    for a, b in patch:
        for x in range(max(a, lo), min(b, hi)):
            _PACK_WORD(buf, (x - lo) * 8, words[x])
    return bytes(buf[:n])


def _find_committed(g: L.Generation, words: dict[int, int], kkind: int, kb: bytes,
                    h: int) -> int:
    """:func:`probe` through the overlay: the key's committed entry, or -1."""
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
                start = g.hoff + (b & 0xFFFFFFFF) * 8  # key bytes never change
                if g.mv[start : start + klen] == kb:
                    return e
        j += 1
        if j == isize:
            j = 0
    return -1


def _read_committed(g: L.Generation, kkind: int, kb: bytes, h: int, over: Any) -> Got | None:
    """(found, value) of the last committed state while a transaction is in flight."""
    words = over[3]
    e = _find_committed(g, words, kkind, kb, h)
    if e < 0:
        return (False, None)
    w, q, get = g.ew + e * 4, g.q, words.get
    ver, b, val = (q[i] if (x := get(i)) is None else x for i in (w, w + 2, w + 3))
    meta = b >> 32
    if ver & 1 or not meta & L.LIVE:
        return None
    kind = meta & 0xFF
    if val >= 1 << 63:
        val -= 1 << 64
    raw = None
    if kind in L.HEAP_KINDS:
        raw = committed_bytes(g.mv, g.hoff + (val & 0xFFFFFFFF) * 8, val >> 32, over)
    return (True, decode_value(kind, val, raw))


# ---------------------------------------------------------------------- one key, the length


def read(t: Table, kkind: int, kb: bytes, h: int) -> Got:
    """The last committed state of one key, without the lock (see :data:`Got`)."""
    c = t.c
    attempt, deadline = 0, None
    while True:
        e1 = c[C_GSEQ]
        if e1 != t.epoch:
            follow(t, e1)
            continue
        t1 = c[C_TSEQ]
        got: Got | None
        try:
            if t1 & 1:
                over = overlay(t, t1)
                got = None if over is None else _read_committed(t.g, kkind, kb, h, over)
                if over is None or c[C_JCOUNT] != over[1]:
                    got = None
            else:
                got = read_entry(t, kkind, kb, h)
        except TORN:
            got = None  # a torn read of the index or an entry: retry
        if got is not None and c[C_TSEQ] == t1 and c[C_GSEQ] == e1:
            return got
        attempt += 1
        deadline = backoff(t, attempt, deadline)


def lookup(t: Table, kkind: int, kb: bytes, h: int) -> Got:
    """:func:`read`, with the common case -- no transaction in flight, the generation
    mapped, the entry not being written -- in one frame: the probe and the entry read
    inline (a Python call costs as much as one of their steps). Anything else: ``read``."""
    c = t.c
    e1 = c[C_GSEQ]
    t1 = c[C_TSEQ]
    g = t.g
    if e1 == t.epoch and not t1 & 1:
        try:
            i32, mm, mv = g.i32, g.mm, g.mv
            isize, eoff, hoff = g.isize, g.eoff, g.hoff
            klen = len(kb)
            j = h % isize
            n = isize
            while n:
                e = i32[16 + j]  # (the index starts at byte HEADER_BYTES)
                if e >= 0:
                    ver, eh, ekl, koff, meta, inline = _ENTRY(mv, eoff + e * 32)
                    if eh == h and ekl == klen and (meta >> 8) & 0xFF == kkind \
                            and mm[hoff + koff * 8 : hoff + koff * 8 + klen] == kb:
                        kind = meta & 0xFF
                        raw = None
                        if kind in _HEAP_KINDS:
                            start = hoff + (inline & 0xFFFFFFFF) * 8
                            raw = mm[start : start + (inline >> 32)]
                        w = (eoff >> 3) + e * 4
                        q = g.q
                        if (ver & 1 or not meta & LIVE or q[w] != ver or c[C_TSEQ] != t1
                                or c[C_GSEQ] != e1):
                            break
                        if kind == V_STR:
                            value: Any = raw.decode("utf-8", "surrogatepass")  # type: ignore[union-attr]
                        elif kind == V_INT:
                            value = inline
                        else:
                            value = decode_value(kind, inline, raw)
                        return (True, value, w, ver, kind, raw, c, e1, q)
                elif e == -1:  # EMPTY: absent
                    if c[C_TSEQ] == t1 and c[C_GSEQ] == e1:
                        return (False, None)
                    break
                j += 1
                if j == isize:
                    j = 0
                n -= 1
        except TORN:
            pass
    return read(t, kkind, kb, h)


#: What :func:`reread` returns when the key must be looked up.
AGAIN: Any = object()


def reread(t: Table, key: Any, hit: tuple[Any, ...]) -> Any:
    """A cached read (:mod:`.cache`) that did not hold: the key's value now, read from its
    own entry without a probe -- within one generation an entry belongs to one key for
    good (new keys are appended; a rollback only removes entries no reader validated) --
    and cached; or :data:`AGAIN`: :func:`lookup` it (another generation, a transaction in
    flight, the key deleted, the entry mid-write). The same validation as :func:`lookup`."""
    fast, c, e1, q, w, ver0, cached, size0, kt = hit
    t1 = c[C_TSEQ]
    g = t.g
    if c[C_GSEQ] != e1 or q is not g.q:
        return AGAIN
    try:
        ver, _, _, _, meta, inline = _ENTRY(g.mv, w * 8)
        if ver == ver0:  # unchanged (a pickled value: a copy per read), or rolled back
            return cached if fast is not None else _loads(cached)
        if t1 & 1:
            return AGAIN
        kind = meta & 0xFF
        raw = None
        if kind in _HEAP_KINDS:
            start = g.hoff + (inline & 0xFFFFFFFF) * 8
            raw = g.mm[start : start + (inline >> 32)]
        if (ver & 1 or not meta & LIVE or q[w] != ver or c[C_TSEQ] != t1
                or c[C_GSEQ] != e1):
            return AGAIN
        if kind == V_STR:
            value: Any = raw.decode("utf-8", "surrogatepass")  # type: ignore[union-attr]
        elif kind == V_INT:
            value = inline
        else:
            value = decode_value(kind, inline, raw)
    except TORN:
        return AGAIN
    if raw is None and not size0:  # a number for a number: replaced where it is
        t.cache.entries[key] = (kt, c, e1, q, w, ver, value, 0, kt)
    else:
        t.cache.remember(key, (True, value, w, ver, kind, raw, c, e1, q))
    return value


def get_str(t: Table, key: str, kb: bytes, h: int) -> Any:
    """``t[key]`` for a str key that missed the read cache, cached: :func:`lookup` and
    :meth:`.cache.ReadCache.remember` in one frame for the commonest case (no transaction
    in flight, the entry not being written, an immutable value with room in the cache),
    :func:`read` for the rest. ``kb``: the key encoded, ``h`` its hash. Raises KeyError
    when the key is absent."""
    c = t.c
    e1 = c[C_GSEQ]
    t1 = c[C_TSEQ]
    g = t.g
    if e1 == t.epoch and not t1 & 1:
        try:
            i32, mm, mv = g.i32, g.mm, g.mv
            isize, eoff, hoff = g.isize, g.eoff, g.hoff
            klen = len(kb)
            j = h % isize
            n = isize
            while n:
                e = i32[16 + j]  # (the index starts at byte HEADER_BYTES)
                if e >= 0:
                    ver, eh, ekl, koff, meta, inline = _ENTRY(mv, eoff + e * 32)
                    if eh == h and ekl == klen and (meta >> 8) & 0xFF == K_STR \
                            and mm[hoff + koff * 8 : hoff + koff * 8 + klen] == kb:
                        kind = meta & 0xFF
                        raw = None
                        if kind in _HEAP_KINDS:
                            start = hoff + (inline & 0xFFFFFFFF) * 8
                            raw = mm[start : start + (inline >> 32)]
                        w = (eoff >> 3) + e * 4
                        q = g.q
                        if (ver & 1 or not meta & LIVE or q[w] != ver or c[C_TSEQ] != t1
                                or c[C_GSEQ] != e1):
                            break
                        if kind == V_STR:
                            value: Any = raw.decode("utf-8", "surrogatepass")  # type: ignore[union-attr]
                            size = len(raw)  # type: ignore[arg-type]
                        elif kind == V_INT:
                            value, size = inline, 0
                        else:
                            value = decode_value(kind, inline, raw)
                            size = -1  # (the general case: remember)
                        cache = t.cache
                        ents = cache.entries
                        if (0 <= size <= _CACHE_VALUE_MAX and len(ents) < _CACHE_MAX
                                and key not in ents and cache.nbytes + size <= _CACHE_BYTES):
                            ents[key] = (str, c, e1, q, w, ver, value, size, str)
                            cache.nbytes += size
                        else:
                            cache.remember(key, (True, value, w, ver, kind, raw, c, e1, q))
                        return value
                elif e == -1:  # EMPTY: absent
                    if c[C_TSEQ] == t1 and c[C_GSEQ] == e1:
                        raise KeyError(key)
                    break
                j += 1
                if j == isize:
                    j = 0
                n -= 1
        except TORN:
            pass
    got = read(t, K_STR, kb, h)
    if len(got) > 2:
        t.cache.remember(key, got)
    elif not got[0]:
        raise KeyError(key)
    return got[1]


def length(t: Table) -> int:
    """The number of live keys, without the lock."""
    c = t.c
    attempt, deadline = 0, None
    while True:
        e1 = c[C_GSEQ]
        if e1 != t.epoch:
            follow(t, e1)
            continue
        t1 = c[C_TSEQ]
        q = t.q
        n: int | None
        if t1 & 1:
            over = overlay(t, t1)
            n = None if over is None else over[3].get(L.H_LIVE, q[L.H_LIVE])
            if over is None or c[C_JCOUNT] != over[1]:
                n = None
        else:
            n = q[L.H_LIVE]
        if n is not None and c[C_TSEQ] == t1 and c[C_GSEQ] == e1:
            return n
        attempt += 1
        deadline = backoff(t, attempt, deadline)


def follow(t: Table, e1: int) -> None:
    """The epoch moved: map the generation it names (one may be published in ``gen``
    but not yet in the epoch, by a writer stopped between the two stores)."""
    if e1 & 1:
        t.map_current()  # destroyed: raises
    else:
        t.map_current(e1 // 2)


def backoff(t: Table, attempt: int, deadline: float | None) -> float | None:
    """Writers keep changing what a read reads: spin, then yield, then sleep a little;
    after ``timeout``, give up (a read never waits for the lock itself)."""
    if attempt < 16:
        return deadline
    now = time.monotonic()
    if deadline is None:
        deadline = now + t.timeout
    elif now > deadline:
        raise lock_timeout(f"shm mapping {t.label} for a consistent read", t.timeout,
                           "writers kept changing it")
    if attempt < 64:
        os.sched_yield()
    else:
        time.sleep(min(1e-3, 1e-5 * (attempt - 63)))
    return deadline
