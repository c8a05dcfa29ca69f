"""Diagnostics of an ``shm`` table: the integrity check used after crashes, the facts
``shareit inspect`` shows, and who holds the writer lock."""

from __future__ import annotations

import fcntl
import os
from typing import TYPE_CHECKING, Any

from ... import _runtime
from ..._locks import RobustMutex
from . import layout as L
from .lock import EBUSY, EOWNERDEAD
from .read import probe
from .segments import ctrl_path

if TYPE_CHECKING:
    from .table import Table


def verify(t: Table) -> list[str]:
    """Check the table's integrity under the lock (repairing first); the problems found.

    Every live entry must be reachable from the index by its own key, the
    index must point only at live entries, counts must agree, no entry may
    be mid-write, and every heap reference must lie inside the used heap.
    """
    np = L.numpy()
    problems: list[str] = []
    t.wlock()
    try:
        g = t.g
        q = g.q
        used, live_n, top = q[L.H_USED], q[L.H_LIVE], q[L.H_TOP]
        ents = g.entries()[:used]
        index = g.index()
        live = (ents["meta"] & L.LIVE) != 0
        if int(live.sum()) != live_n:
            problems.append(f"live count {live_n} != {int(live.sum())} live entries")
        if (ents["ver"] & 1).any():
            problems.append(f"entries mid-write: {np.nonzero(ents['ver'] & 1)[0].tolist()}")
        pointed = index[index >= 0]
        if len(pointed) != int(live.sum()) or not live[pointed].all():
            problems.append("the index does not point at exactly the live entries")
        if ((ents["koff"].astype(np.int64) + (ents["klen"] + 7) // 8) > top).any():
            problems.append("a key lies beyond the heap top")
        heap_vals = np.isin(ents["meta"] & 0xFF, list(L.HEAP_KINDS)) & live
        v = ents["val"][heap_vals]
        spare = (ents["meta"][heap_vals] >> L.SPARE_SHIFT).astype(np.int64)
        if ((v & 0xFFFFFFFF) + ((v >> 32) + 7) // 8 + spare > top).any():
            problems.append("a value lies beyond the heap top")
        for e in np.nonzero(live)[0].tolist():
            u = (g.ew + e * 4) * 2
            start = g.hoff + g.u32[u + 4] * 8
            kb = bytes(g.mv[start : start + g.u32[u + 3]])
            found, _ = probe(g, (g.u32[u + 5] >> 8) & 0xFF, kb, g.u32[u + 2])
            if found != e:
                problems.append(f"entry {e} is not reachable by its key")
                break
    finally:
        t.leave()
    return problems


def info(t: Table) -> dict[str, Any]:
    """Segment sizes and table statistics (for ``shareit inspect`` and benchmarks)."""
    g = t.g
    q = g.q
    writer = t.c[L.C_WRITER]
    return {
        "generation": g.gen, "capacity": g.cap, "index_slots": g.isize,
        "used_entries": q[L.H_USED], "keys": q[L.H_LIVE], "heap_bytes": g.heapw * 8,
        "heap_used_bytes": q[L.H_TOP] * 8, "garbage_bytes": q[L.H_GARBAGE] * 8,
        "segment_bytes": g.size, "control_bytes": L.CTRL_SIZE,
        "lock_held": lock_held_elsewhere(t), "lock_holder": lock_holder(t),
        "last_writer": writer or None,
    }


def lock_held_elsewhere(t: Table) -> bool:
    """Whether another thread or process holds the lock now (for ``inspect``)."""
    if t.c[L.C_LOCKKIND] != L.LOCK_ROBUST:
        return _flock_held(ctrl_path(t.seg))
    m = RobustMutex(t.cmm, L.MUTEX_OFFSET)
    rc = m.trylock()
    if rc == EBUSY:
        return True
    if rc == EOWNERDEAD:
        m.make_consistent()  # its holder died; the next writer repairs
    m.unlock()
    return False


def lock_holder(t: Table) -> int | None:
    """The pid holding the lock, if the mutex says (glibc keeps the owner's thread id
    at offset 8 of ``pthread_mutex_t``); None when free or unknown."""
    if t.c[L.C_LOCKKIND] != L.LOCK_ROBUST:
        return None
    at = L.MUTEX_OFFSET + 8
    tid = int.from_bytes(t.cmm[at : at + 4], "little") & 0x3FFFFFFF
    if not tid:
        return None
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _flock_held(path: str) -> bool:
    try:
        fd = _runtime.open_private(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
