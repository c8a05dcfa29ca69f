"""Whole-table reads of the ``shm`` table without the lock: one instant's committed state.

Whole-table reads (iteration, ``snapshot()``, ``len``, ``==``) copy the
entries and the heap with numpy under the same protocol, and additionally
require the stamp (bumped by every entry write, inline ones too) unchanged,
so the copy is one instant's state. A copy that keeps losing to live writers
backs off, and now and then tries the lock without waiting (it cannot block);
it gives up with ``LockTimeoutError`` only after ``timeout``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import layout as L
from .layout import C_GSEQ, C_JCOUNT, C_JSTATE, C_STAMP, C_TSEQ, J_INLINE
from .read import backoff, follow, overlay

if TYPE_CHECKING:
    from .table import Table


def consistent_copy(t: Table, with_heap: bool = True, columns: tuple[str, ...] = ()) -> Any:
    """Live entries, plus the heap or the int keys gathered from it: one instant's
    committed state, copied without the lock (see the module docstring)."""
    c = t.c
    attempt, deadline = 0, None
    while True:
        e1 = c[C_GSEQ]
        if e1 != t.epoch:
            follow(t, e1)
            continue
        got = _try_copy(t, e1, with_heap, columns)
        if got is not None:
            return got
        attempt += 1
        if attempt >= 32 and attempt % 8 == 0 and not t.lock.busy and t.acquire(0):
            try:  # writers are only busy, not stuck: copy in a gap, never waiting
                got = _try_copy(t, c[C_GSEQ], with_heap, columns)
            finally:
                t.release()
            if got is not None:
                return got
        deadline = backoff(t, attempt, deadline)

def _try_copy(t: Table, e1: int, with_heap: bool, columns: tuple[str, ...] = ()) -> Any:
    np = L.numpy()
    c, g = t.c, t.g
    t1, s1, j1 = c[C_TSEQ], c[C_STAMP], c[C_JSTATE]
    words: dict[int, int] = {}
    over = None
    if t1 & 1:
        over = overlay(t, t1)
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
            hat = [w for w in words if g.hw <= w < g.hw + top]
            if hat:  # values overwritten in place by the transaction in flight
                heap.view("<u8")[np.array(hat) - g.hw] = np.array([words[w] for w in hat],
                                                                  dtype="<u8")
    if (c[C_TSEQ] != t1 or c[C_STAMP] != s1 or c[C_JSTATE] != j1 or c[C_GSEQ] != e1
            or (over is not None and c[C_JCOUNT] != over[1]) or len(ents) != live_n):
        return None
    return ents, heap, int_keys
