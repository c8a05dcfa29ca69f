"""Building a whole new ``shm`` generation, vectorised: growth, compaction, ``clear`` and
bulk numeric writes (which :meth:`~.table.Table.switch` then publishes).

A rebuild copies only live entries, in order, packs their heap bytes, and
builds the new index with a round-based parallel linear probe, all in numpy:
no per-key Python loop, so growing to a million keys stays cheap.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import layout as L

_HEAP_KINDS = np.array(sorted(L.HEAP_KINDS), dtype=np.uint32)
MIN_HEAP = 1 << 16


#: Below these sizes a rebuilt table takes two 1.5x growth steps at once (2.25x), above
#: them one: a table filled one key at a time from its smallest size rebuilds half as often
#: while it is small (a rebuild costs ~0.4 ms however small), and lands on the very sizes
#: it did with single steps, so big tables keep their memory per entry.
SMALL_ENTRIES = 1 << 15
SMALL_HEAP = 1 << 20

#: A table that grows again after a compaction shrank it (delete a batch, insert the next)
#: grows back towards the size it had in one rebuild up to this many times its usual step
#: (instead of ~7 rebuilds from 60 to 20k entries), entries and heap alike: its free space
#: stays within this multiple of what the usual step leaves.
REGROW_MAX = 8


def grown(need: int) -> int:
    """The capacity of a rebuilt generation that must hold ``need`` entries."""
    cap = int(need * 1.5) + 8
    return int((cap + 1) * 1.5) + 8 if need < SMALL_ENTRIES else cap


def grown_heap(nbytes: int) -> int:
    """The heap bytes of a rebuilt generation that must hold ``nbytes``."""
    heap = int(nbytes * 1.5) + 512
    return int(heap * 1.5) + 512 if nbytes < SMALL_HEAP else heap


def exclusive_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros(len(a), dtype=np.int64)
    if len(a) > 1:
        np.cumsum(a[:-1], out=out[1:])
    return out


def gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the concatenated ranges [starts[i], starts[i] + lengths[i])."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts - exclusive_cumsum(lengths), lengths)
    out: np.ndarray = np.arange(total, dtype=np.int64) + shift
    return out


def build_index(index: np.ndarray, hashes: np.ndarray, first: int = 0) -> None:
    """Place entries ``first``.. ``first + len(hashes) - 1`` by linear probing, many at a
    time, into ``index`` (empty, or holding entries placed the same way).

    An entry only ever moves past occupied slots, so the probing invariant
    (every slot between a key's home and its place is occupied) holds. Where
    several entries reach one free slot in a round, one of them takes it: all
    are scattered there, and the one the slot ends up holding won.
    """
    isize = len(index)
    pos = hashes.astype(np.int64) % isize
    pending = np.arange(len(hashes), dtype=np.int64)
    while pending.size:
        p = pos[pending]
        free = index[p] == L.EMPTY
        if free.any():
            cp = p[free]
            index[cp] = pending[free] + first
            won = np.zeros(len(pending), dtype=bool)
            won[free] = index[cp] == pending[free] + first
            pending, p = pending[~won], p[~won]
        pos[pending] = (p + 1) % isize


def build_generation(seg: str, old: L.Generation, target: int, extra_entries: int,
                     extra_heap: int, empty: bool, cap_hint: int, ctrl: Any,
                     changes: Any = None, regrow: int = 0) -> L.Generation:
    """A new, not yet published generation holding ``old``'s live entries and room to spare.

    ``regrow`` -- the capacity a compaction shrank this table from, if any: a growth gets
    up to ``REGROW_MAX`` times its usual capacity and heap, no more than that capacity.

    ``changes`` -- ``(found, batch, vkind, inline)`` from :mod:`.many` -- also sets
    the keys of ``batch`` to inline values (``found``: each key's entry in ``old``, or
    -1 for a key to append), all in numpy.
    """
    same_places = False  # every entry keeps its number, so the old index stays valid
    if empty:
        live = old.entries()[:0].copy()
        livepos = None
    else:
        ents = old.entries()[: old.q[L.H_USED]]
        mask = (ents["meta"] & L.LIVE) != 0
        if mask.all():
            live, livepos, same_places = ents, np.arange(len(ents)), True
        else:
            live = ents[mask]
            livepos = np.cumsum(mask) - 1  # old entry -> its place in the new generation
    n = len(live)
    need = n + extra_entries
    # A rebuild that deletes nothing and still fits (set_many of existing keys, a heap
    # that filled up) keeps the table size, copies the index and places only new keys.
    same_places = same_places and old.cap >= need + need // 8 + 8
    kinds = live["meta"] & 0xFF
    on_heap = np.isin(kinds, _HEAP_KINDS)
    val = live["val"]
    vlen = np.where(on_heap, val >> 32, 0)
    voff = val & 0xFFFFFFFF
    kwords = (live["klen"].astype(np.int64) + 7) // 8
    vwords = (vlen + 7) // 8
    used_words = int(kwords.sum() + vwords.sum())
    cap = old.cap if same_places else max(cap_hint if empty else 0, grown(need))
    # Values that do not fit their key's room are appended, so the heap needs room for more
    # writes before the next rebuild: half as much again as it holds live (with the write
    # that asked for it; 2.25x as much while it is small: grown_heap); a rebuild packs
    # values without their spare words. A rebuild then copies the live bytes only after
    # half as many were written since the last one (amortised O(1) per byte written), and
    # memory stays within 1.5x the live bytes (2.25x below SMALL_HEAP).
    # Segments are allocated in full, so a heap sized from the largest write (it was 32x)
    # would be real memory: 336 MB for one 10 MB value rewritten.
    heap = max(grown_heap(used_words * 8 + extra_heap), MIN_HEAP)
    if regrow > cap and not same_places:
        big = min(regrow, cap * REGROW_MAX)
        heap, cap = heap * big // cap, big
    new = L.Generation.create(seg, target, cap, heap)
    if n:
        old_heap = np.frombuffer(old.mm, dtype=np.uint64, count=old.heapw, offset=old.hoff)
        new_heap = np.frombuffer(new.mm, dtype=np.uint64, count=new.heapw, offset=new.hoff)
        kstart = live["koff"].astype(np.int64)
        new_koff = exclusive_cumsum(kwords)
        ktotal = int(kwords.sum())
        new_heap[:ktotal] = old_heap[gather_ranges(kstart, kwords)]
        hv = np.nonzero(on_heap)[0]
        new_voff = ktotal + exclusive_cumsum(vwords[hv])
        new_heap[ktotal:used_words] = old_heap[gather_ranges(voff[hv], vwords[hv])]
        out = new.entries()
        out[:n] = live
        out["meta"][:n] &= np.uint32(~(L.SPARE_MAX << L.SPARE_SHIFT) & 0xFFFFFFFF)
        out["koff"][:n] = new_koff
        out["val"][hv] = new_voff | (vlen[hv] << 32)
        stamp = ctrl[L.C_STAMP] + 1
        ctrl[L.C_STAMP] = stamp
        out["ver"][:n] = 2 * stamp + 2
    placed = 0
    if same_places:
        new.index()[:] = old.index()
        placed = n
    if changes is not None:
        n, used_words = _apply_changes(new, n, used_words, livepos, ctrl, *changes)
    if n > placed:
        build_index(new.index(), new.entries()["hash"][placed:n], first=placed)
    q = new.q
    q[L.H_USED], q[L.H_LIVE], q[L.H_TOP], q[L.H_GARBAGE] = n, n, used_words, 0
    return new


def _apply_changes(new: L.Generation, n: int, top: int, livepos: Any, ctrl: Any,
                   found: np.ndarray, batch: Any, vkind: int,
                   inline: np.ndarray) -> tuple[int, int]:
    """Overwrite the values of keys already in ``new`` and append the others after its ``n``
    entries (their key bytes after heap word ``top``); the new entry count and heap top."""
    out = new.entries()
    have = found >= 0
    if have.any():
        at = livepos[found[have]]
        out["val"][at] = inline[have]
        out["meta"][at] = (out["meta"][at] & ~np.uint32(0xFF)) | np.uint32(vkind)
    add = np.nonzero(~have)[0]
    m = len(add)
    if m:
        kwords = (batch.lens[add] + 7) // 8
        koff = top + exclusive_cumsum(kwords)
        total = int(kwords.sum())
        heap = np.frombuffer(new.mm, dtype=np.uint64, count=new.heapw, offset=new.hoff)
        heap[top:top + total] = batch.blob.view(np.uint64)[gather_ranges(batch.wstart[add], kwords)]
        tail = out[n:n + m]
        stamp = ctrl[L.C_STAMP] + 1
        ctrl[L.C_STAMP] = stamp
        tail["ver"] = 2 * stamp + 2
        tail["hash"] = batch.hashes[add]
        tail["klen"] = batch.lens[add]
        tail["koff"] = koff
        tail["meta"] = L.LIVE | (batch.kinds[add].astype(np.uint32) << 8) | vkind
        tail["val"] = inline[add]
        top += total
    return n + m, top
