"""What ``dict`` users expect beyond the five methods: views, ``==``, ``|``, ``repr``.

``items()`` and ``values()`` cost one ``snapshot()``, not one read per key. For a
backend whose reads cost a round trip (``_prefetch_reads``), ``keys()`` also
takes a snapshot and lets the reads that ``dict(d)`` and ``{**d}`` make next
(CPython's generic merge: ``keys()``, then ``d[k]`` for each key in order) be
served from it, so the copy costs one round trip and is consistent. Only the
reads of that same call are: a read is served from the snapshot only if it comes
from the very instruction (frame and offset) that listed the keys -- inside
``dict(d)``, not a later ``d[k]`` after a loop over ``d.keys()``, which reads
afresh. Any other call ends that read sequence (``_end_prefetch``).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import Any, TypeVar

from ._contract import MISSING
from ._ops import Operations

__all__ = ["DictBehaviour"]

_Self = TypeVar("_Self", bound="DictBehaviour")


class _KeysView(KeysView[Any]):
    """``keys()``; for backends with costly reads, one snapshot feeds the reads that follow."""

    _mapping: DictBehaviour

    def __iter__(self) -> Iterator[Any]:
        m = self._mapping
        if not m._prefetch_reads:
            return iter(m)
        snap = m.snapshot()
        if snap:  # who lists the keys: a C merge (dict(d)) reads from this same instruction
            caller = sys._getframe(1)
            m._prefetch_local().pending = _Pending(list(snap.items()), id(caller),
                                                   caller.f_code, caller.f_lasti)
        return iter(list(snap))


class _Pending:
    """A snapshot's items, for the reads of the call that listed its keys (see module doc)."""

    __slots__ = ("items", "next", "frame", "code", "lasti")

    def __init__(self, items: list[tuple[Any, Any]], frame: int, code: object, lasti: int):
        self.items, self.next = items, 0
        self.frame, self.code, self.lasti = frame, code, lasti


class _SnapshotItemsView(ItemsView[Any, Any]):
    """``items()`` that costs one ``snapshot()``, not one read per key."""

    _mapping: DictBehaviour

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self._mapping.snapshot().items())


class _SnapshotValuesView(ValuesView[Any]):
    _mapping: DictBehaviour

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping.snapshot().values())


class DictBehaviour(Operations):
    """Views, prefetching for ``dict(d)``, comparison, merging and ``repr``."""

    # ------------------------------------------------------------ dict(d) in one round trip

    def _prefetch_local(self) -> threading.local:
        local: threading.local | None = self.__dict__.get("_prefetch_tls")
        if local is None:
            local = self._prefetch_tls = threading.local()
        return local

    def _take_prefetched(self, key: Any) -> Any:
        """The value ``keys()`` fetched for ``key``, if it is the next read of that
        sequence in this thread, made by the same call (the caller of ``__getitem__`` is
        at the instruction that listed the keys); else :data:`MISSING` (and the sequence
        is over)."""
        local = self.__dict__.get("_prefetch_tls")
        pending: _Pending | None = getattr(local, "pending", None)
        if pending is None:
            return MISSING
        local.pending = None  # type: ignore[union-attr]  # (pending is set: so is local)
        caller = sys._getframe(2)  # (1: the backend's __getitem__)
        if (id(caller) != pending.frame or caller.f_lasti != pending.lasti
                or caller.f_code is not pending.code):
            return MISSING  # a read of a later call: never from an older snapshot
        k, v = pending.items[pending.next]
        if k is key or k == key:
            pending.next += 1
            if pending.next < len(pending.items):
                local.pending = pending  # type: ignore[union-attr]
            return v
        return MISSING

    def _end_prefetch(self) -> None:
        """Any other call ends a ``dict(d)`` read sequence: no later read sees the old snapshot."""
        local = self.__dict__.get("_prefetch_tls")
        if local is not None:
            local.pending = None

    # ------------------------------------------------------------ views

    def keys(self) -> KeysView[Any]:
        return _KeysView(self)

    def items(self) -> ItemsView[Any, Any]:
        return _SnapshotItemsView(self)

    def values(self) -> ValuesView[Any]:
        return _SnapshotValuesView(self)

    def __contains__(self, key: Any) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __reversed__(self) -> Iterator[Any]:
        return iter(list(self)[::-1])

    # ------------------------------------------------------------ comparison and merging

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Operations):
            return self.snapshot() == other.snapshot()
        if isinstance(other, Mapping):
            return self.snapshot() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Any) -> dict[Any, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.snapshot() | as_dict(other)

    def __ror__(self, other: Any) -> dict[Any, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return as_dict(other) | self.snapshot()

    def __ior__(self: _Self, other: Any) -> _Self:
        self.update(other)
        return self

    def __repr__(self) -> str:
        head = f"{type(self).__name__}(backend={self.backend!r}, name={self._name!r}"
        if self._closed:
            return head + ", closed)"
        try:
            snap = self.snapshot()
        except Exception as exc:  # repr must never raise
            return head + f", <unreadable: {type(exc).__name__}>)"
        preview = ", ".join(f"{k!r}: {v!r:.40}" for k, v in list(snap.items())[:8])
        more = f", ... ({len(snap)} keys)" if len(snap) > 8 else ""
        return head + f", {{{preview}{more}}})"


def as_dict(m: Mapping[Any, Any]) -> dict[Any, Any]:
    """A plain dict of ``m``: one snapshot for a shared mapping."""
    return m.snapshot() if isinstance(m, Operations) else dict(m.items())
