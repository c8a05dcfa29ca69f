"""The ``shm`` backend's memory layout: segments and the table format (keys and values
are encoded by :mod:`.codec`).

Two kinds of segment live in the user's private runtime dir (``/dev/shm/shareit-UID``), created with
``os.open`` + ``mmap`` (not ``SharedMemory``, whose resource tracker unlinks
segments under their creator and prints warnings on 3.11/3.12; FACTS.md),
allocated in full and mapped without a descriptor (:mod:`.segments`):

``NAME@ctl`` -- the control segment, fixed size. Words (uint64):

    0 magic   1 layout   2 gen (DESTROYED once destroyed)   3 unused (the epoch until layout 4)
    4 stamp (entry versions; only grows, also for inline writes)   5 jstate (1: an undo
    journal is valid; w << 2 | 2: the inline value word of the entry at data word w is
    being replaced)   6 jcount  7 jwords   8 grow target gen   9 writer pid (``inspect``)
    10 writer lock kind: 1 robust pthread mutex at byte 128, 2 flock on this file
    11 tseq: odd from the moment a journaled transaction may change data until its
      commit (or the rollback that repairs it) is complete. Lock-free readers that see it
      odd read the last committed state: the data with the journal's pre-images laid
      over it (:mod:`.read`).
    24 epoch (``C_GSEQ``), alone on its cache line (bytes 192..255): gen * 2 (1 once
      destroyed); changes only when a new generation is published. A reader's cached
      value is valid while the epoch equals its own and the entry's version is unchanged:
      two word reads. Every write changes words 4..11, so a reader that read the epoch
      from their cache line lost it to each write of another process (layout 5).

  then the undo journal: records of (offset, nbytes, old bytes) of the current
  generation's data segment, saved before a write changes them. Every record is
  8-byte aligned and a whole number of words, and is complete before ``jcount``
  counts it; the first record of a word holds its committed value.

``NAME@gN`` -- generation N's data segment: a 64-byte header
(cap, isize, heap words, used, live, heap top, garbage words), the index
(int32 x isize: -1 empty, -2 deleted, else an entry number), ``cap`` entries
of 32 bytes in insertion order, then the heap (8-byte words; keys never
change, and a value is overwritten in place only by a journaled write of the
same key whose new value fits the room it has).

Entry: ``ver`` u64 (odd while being written) | hash u32 | key length u32 |
key offset u32 (heap words) | meta u32 (value kind | key kind << 8 | live
<< 16 | spare << 17: heap words after the value that are the key's own room
to grow in place) | value: int64 / float64 inline, or heap offset u32 + length u32.

Growth and compaction build a whole new generation and switch ``gen`` with
one aligned store, so they are atomic for readers and need no journal.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from .segments import (
    bytes_view,
    create_file,
    data_path,
    open_file,
    release_quietly,
    unlink_quiet,
    unmap,
)

MAGIC = 0x5348415245495431  # "SHAREIT1"
LAYOUT = 5  # 5: the epoch at word 24 (its own cache line); 4: spare words (meta bits
# 17..31), values overwritten in place; 3: tseq
DESTROYED = 1 << 62
CTRL_SIZE = 1 << 16
MUTEX_OFFSET = 128  # the writer lock (a robust pthread mutex) lives in control bytes 128..191
JOURNAL_WORD = 32  # the journal starts at control word 32
JOURNAL_WORDS = CTRL_SIZE // 8 - JOURNAL_WORD

# control words
(C_MAGIC, C_LAYOUT, C_GEN, _C_UNUSED, C_STAMP, C_JSTATE, C_JCOUNT, C_JWORDS, C_GROW, C_WRITER,
 C_LOCKKIND, C_TSEQ) = range(12)
C_GSEQ = 24  # the epoch: the one control word a cache hit reads, on a cache line of its own
assert C_GSEQ * 8 >= MUTEX_OFFSET + 64 and (C_GSEQ + 8) <= JOURNAL_WORD
LOCK_ROBUST, LOCK_FLOCK = 1, 2
J_JOURNAL, J_INLINE = 1, 2  # jstate: an undo journal is valid / one inline word in flight
# data header words
H_CAP, H_ISIZE, H_HEAPW, H_USED, H_LIVE, H_TOP, H_GARBAGE = range(7)
HEADER_BYTES = 64
ENTRY_BYTES = 32
EMPTY, DELETED = -1, -2

# value kinds (inline: INT, FLOAT, NONE, TRUE, FALSE; heap: STR, BYTES, PICKLE)
V_INT, V_FLOAT, V_STR, V_BYTES, V_NONE, V_TRUE, V_FALSE, V_PICKLE = range(1, 9)
HEAP_KINDS = frozenset({V_STR, V_BYTES, V_PICKLE})
IMMUTABLE_KINDS = frozenset({V_INT, V_FLOAT, V_STR, V_BYTES, V_NONE, V_TRUE, V_FALSE})
LIVE = 1 << 16
SPARE_SHIFT = 17  # meta >> SPARE_SHIFT: the spare heap words after a heap value
SPARE_MAX = (1 << 15) - 1
#: A heap value of up to this many words (63.5 KB) that fits its key's room is overwritten
#: in place, its old bytes journaled: with the entry's record, as much as the journal's
#: 8,160 words hold (a batch that fills it is rebuilt instead); a larger one is appended.
INPLACE_MAX_WORDS = 8128

# key kinds
K_STR, K_BYTES, K_INT, K_TUPLE = range(1, 5)

_ENTRY_FIELDS = [("ver", "<u8"), ("hash", "<u4"), ("klen", "<u4"), ("koff", "<u4"),
                 ("meta", "<u4"), ("val", "<i8")]
_np: Any = None  # numpy, imported by the first typed or bulk access (not at import: spawn cost)
ENTRY_DTYPE: Any = None  # set by numpy()


def numpy() -> Any:
    """numpy, imported on first use: single-key reads and writes never need it."""
    global _np, ENTRY_DTYPE
    if _np is None:
        import numpy as np

        ENTRY_DTYPE = np.dtype(_ENTRY_FIELDS)
        assert ENTRY_DTYPE.itemsize == ENTRY_BYTES
        _np = np
    return _np


#: Per-process bounds of the read cache (entries, and bytes of cached heap values; the
#: oldest entries go first) and of the slot cache (cleared when full). A value larger than
#: CACHE_VALUE_MAX is never cached: re-reading it costs one copy, like caching it would.
CACHE_MAX = 1 << 16
CACHE_BYTES = 64 << 20
CACHE_VALUE_MAX = CACHE_BYTES // 8

#: Test-only fault injection: the step name at which a writer SIGKILLs itself.
FAULT: str | None = None


def fault(step: str) -> None:
    if FAULT == step:
        os.kill(os.getpid(), signal.SIGKILL)


class Grow(Exception):
    """The current generation has no room: rebuild, then retry."""


def sizes_for(cap: int, heap_bytes: int) -> tuple[int, int, int]:
    """(cap, isize, heap words) of a generation that holds ``cap`` entries."""
    cap = max(cap, 8)
    isize = cap + cap // 2 + 1  # load <= 2/3; not a power of two: probing uses %
    heapw = max(heap_bytes // 8 + 1, 64)
    return cap, isize, heapw


def layout_offsets(cap: int, isize: int) -> tuple[int, int]:
    """Byte offsets of the entries and of the heap."""
    entries = HEADER_BYTES + ((isize * 4 + 7) & ~7)
    return entries, entries + cap * ENTRY_BYTES


class Generation:
    """One mapped data segment and its typed views."""

    __slots__ = ("gen", "mm", "mv", "q", "qs", "i32", "u32", "cap", "isize", "heapw",
                 "eoff", "hoff", "ew", "hw", "size", "path")
    gen: int
    mm: Any
    mv: memoryview
    q: memoryview  # uint64 words
    qs: memoryview  # the same words, int64
    i32: memoryview
    u32: memoryview
    cap: int
    isize: int
    heapw: int
    eoff: int  # byte offset of the entries
    hoff: int  # byte offset of the heap
    ew: int  # entry base, in words
    hw: int  # heap base, in words
    size: int
    path: str

    def __init__(self, gen: int, mm: Any, path: str):
        self.gen, self.mm, self.path = gen, mm, path
        self.mv = bytes_view(mm)
        self.q = self.mv.cast("Q")
        self.qs = self.mv.cast("q")
        self.i32 = self.mv.cast("i")
        self.u32 = self.mv.cast("I")
        self.cap, self.isize, self.heapw = self.q[H_CAP], self.q[H_ISIZE], self.q[H_HEAPW]
        self.eoff, self.hoff = layout_offsets(self.cap, self.isize)
        self.ew, self.hw = self.eoff // 8, self.hoff // 8
        self.size = len(mm)

    @classmethod
    def create(cls, name: str, gen: int, cap: int, heap_bytes: int) -> Generation:
        cap, isize, heapw = sizes_for(cap, heap_bytes)
        eoff, hoff = layout_offsets(cap, isize)
        path = data_path(name, gen)
        unlink_quiet(path)  # an incomplete generation left by a writer killed while growing
        self = cls(gen, create_file(path, hoff + heapw * 8), path)
        self.q[H_CAP], self.q[H_ISIZE], self.q[H_HEAPW] = cap, isize, heapw
        self.cap, self.isize, self.heapw = cap, isize, heapw
        self.eoff, self.hoff = eoff, hoff
        self.ew, self.hw = eoff // 8, hoff // 8
        self.mv[HEADER_BYTES : HEADER_BYTES + isize * 4] = b"\xff" * (isize * 4)  # all EMPTY (-1)
        return self

    @classmethod
    def open(cls, name: str, gen: int) -> Generation:
        path = data_path(name, gen)
        return cls(gen, open_file(path), path)

    # numpy views of the segment: internal only (what users get is always a copy)
    def entries(self) -> Any:
        np = numpy()
        return np.frombuffer(self.mm, dtype=ENTRY_DTYPE, count=self.cap, offset=self.eoff)

    def index(self) -> Any:
        np = numpy()
        return np.frombuffer(self.mm, dtype=np.int32, count=self.isize, offset=HEADER_BYTES)

    def heap(self) -> Any:
        np = numpy()
        return np.frombuffer(self.mm, dtype=np.uint8, count=self.heapw * 8, offset=self.hoff)

    def close(self) -> None:
        """Unmap. A view still alive (a traceback's frame may hold one) keeps the mapping
        until it dies; the mmap object then unmaps when the last reference goes."""
        release_quietly(self.q, self.qs, self.i32, self.u32, self.mv)
        unmap(self.mm)
        self.mm = None
