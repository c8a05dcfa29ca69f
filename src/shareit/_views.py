"""What ``dict`` users expect beyond the five methods: views, ``==``, ``|``, ``repr``.

``items()`` and ``values()`` cost one ``snapshot()``, not one read per key.
``keys()`` lists the keys; every ``d[k]`` is a read of its own, made when it is
called (a copy in one step is ``d.copy()`` or ``d.snapshot()``). Serving the reads
that ``dict(d)`` makes from the snapshot that listed the keys was tried and
dropped: no test of "the same call" (frame, instruction) told those reads apart
from a later read at the same call site, which then returned an old value.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from typing import Any, TypeVar

from ._ops import Operations

__all__ = ["DictBehaviour"]

_Self = TypeVar("_Self", bound="DictBehaviour")


class _KeysView(KeysView[Any]):
    _mapping: DictBehaviour

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping)


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
    """Views, comparison, merging and ``repr``."""

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
