"""The ``shm`` table's undo journal: how a multi-word write stays atomic and crash-safe.

A write journals the bytes it is about to change (:meth:`Journal.save`) between
:meth:`Journal.begin` and :meth:`Journal.commit`; a writer killed in between is
rolled back by the next one (:meth:`~.table.Table.recover`). Lock-free readers
(:mod:`.read`) must never see a write that has not committed, and cannot wait
for a writer (it may be stopped or dead), so a transaction announces itself:
``begin`` empties the journal and only then makes ``tseq`` odd; ``commit``
clears ``jstate`` (from then on recovery keeps the write) and then makes
``tseq`` even (from then on readers see it). A reader that finds ``tseq`` odd
lays the journal's pre-images over the data, so until the commit it sees
exactly the state before the transaction, and a rollback restores those very
bytes: nothing a reader returned or cached is undone by it. Every byte a
transaction changes below the heap top is journaled first; bytes above the
committed heap top (appended keys and values, the entry of an insert) are
invisible to readers of the committed header and index.

The records live in the control segment after word ``JOURNAL_WORD`` (format:
:mod:`.layout`). Every method runs with the writer lock held.
"""

from __future__ import annotations

import struct
from typing import Any

from . import layout as L
from .layout import C_JCOUNT, C_JSTATE, C_JWORDS, C_TSEQ, HEADER_BYTES, JOURNAL_WORD, JOURNAL_WORDS

_PACK_RECORD = struct.Struct("<QQ").pack  # a record's (offset, nbytes); its bytes follow


class Journal:
    """The undo journal of one table, as this process writes it."""

    __slots__ = ("c", "cmv", "on", "saved_header")

    def __init__(self, c: Any, cmv: Any):
        self.c, self.cmv = c, cmv  # the control segment's words and bytes
        self.on = True  # off while writing into a generation nobody sees yet
        self.saved_header = False  # (the data header is saved once per transaction)

    def begin(self) -> None:
        """Open a journaled write (of one key or many: readers treat them alike)."""
        c = self.c
        c[C_JWORDS] = 0
        c[C_JCOUNT] = 0  # before tseq turns odd: no reader lays old records over new data
        c[C_TSEQ] += 1  # odd: readers read through the journal until the commit
        c[C_JSTATE] = L.J_JOURNAL
        self.saved_header = False
        if L.FAULT:
            L.fault("after_begin")

    def save(self, g: L.Generation, spans: tuple[tuple[int, int], ...],
             header: bool = False) -> None:
        """Journal the bytes of ``g`` in each ``(offset, nbytes)`` of ``spans`` (whole,
        aligned words) before changing them -- and the data header first, with ``header``,
        unless this transaction saved it already. One copy into the journal for all."""
        if not self.on:
            return
        with_header = header and not self.saved_header
        if with_header:
            spans = ((0, HEADER_BYTES), *spans)
        c = self.c
        used = c[C_JWORDS]
        mm = g.mm  # (slicing the mapping itself gives bytes, quicker than a memoryview)
        parts: list[bytes] = []
        for off, nbytes in spans:
            parts.append(_PACK_RECORD(off, nbytes))
            parts.append(mm[off : off + nbytes])
        blob = b"".join(parts)
        need = len(blob) // 8
        if used + need > JOURNAL_WORDS:
            raise L.Grow  # a very large transaction: done by rebuilding instead
        b = (JOURNAL_WORD + used) * 8
        self.cmv[b : b + len(blob)] = blob
        c[C_JWORDS] = used + need  # the records count only once they are complete
        c[C_JCOUNT] += len(spans)
        if with_header:
            self.saved_header = True

    def rollback(self, g: L.Generation) -> None:
        """Restore every saved byte of ``g``, newest record first, and empty the journal."""
        c = self.c
        records, w = [], L.JOURNAL_WORD
        for _ in range(c[C_JCOUNT]):
            off, n = c[w], c[w + 1]
            records.append((off, n, (w + 2) * 8))
            w += 2 + (n + 7) // 8
        for off, n, b in reversed(records):
            g.mv[off : off + n] = self.cmv[b : b + n]
        c[C_JCOUNT] = 0
        c[C_JWORDS] = 0

    def commit(self) -> None:
        if L.FAULT:
            L.fault("before_commit")
        c = self.c
        c[C_JSTATE] = 0  # (as finish() does)
        c[C_TSEQ] += 1

    def finish(self) -> None:
        """End the transaction: committed, or rolled back just before."""
        c = self.c
        c[C_JSTATE] = 0  # the commit point for recovery: the next writer keeps this write
        c[C_TSEQ] += 1  # even: readers see it from now on (never before recovery would keep it)

    def close(self) -> None:
        self.c = self.cmv = None
