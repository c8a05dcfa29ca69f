"""Atomic and bulk operations, written once on top of the five methods and the lock.

``incr``, ``transform``, ``edit``, ``pop``, ``popitem`` and ``setdefault`` hold
the mapping's lock around a read and a write. ``update`` validates every pair
before anything is written, then hands them to ``_update_items``; the generic
``_update_items`` and ``clear`` write one key at a time under the lock, with
an undo journal (see :class:`~shareit._contract.MappingBase`) so that a
writer killed half-way is rolled back by the next taker of the lock.

These generic versions are atomic *to readers* only when the backend's reads
take the lock too (the reference backend's do). A backend with lock-free
reads overrides ``snapshot``, ``_update_items`` and ``clear`` with one atomic
step of its own; one that replaces the lock overrides the last two as well
(:func:`shareit.base.check_backend` enforces it). Overriding ``incr`` and
``transform`` only makes them faster (one round trip, ``HINCRBY``).
"""

from __future__ import annotations

import copy as _copy
import operator
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ._contract import MISSING, MappingBase

__all__ = ["Operations", "check_number", "add"]

_first = operator.itemgetter(0)


class Operations(MappingBase):
    """``incr``, ``transform``, ``edit``, ``snapshot``, ``update``, ``clear``, ``pop``, ..."""

    # ------------------------------------------------------------ atomic operations

    def incr(self, key: Any, delta: Any = 1, default: Any = 0) -> Any:
        """Atomically add ``delta`` to ``d[key]`` (``default`` if absent); return the new value."""
        key = self._check_key(key)
        check_number("delta", delta)
        with self.lock():
            current = self.get(key, MISSING)
            new = self._coerce(add(key, default if current is MISSING else current, delta))
            self[key] = new
        return new

    def transform(self, key: Any, fn: Callable[[Any], Any], default: Any = MISSING) -> Any:
        """Atomically replace ``d[key]`` by ``fn(d[key])`` and return the new value.

        ``fn`` gets ``default`` when the key is absent (``KeyError`` if no default).
        If ``fn`` raises, nothing changes. ``fn`` runs in the calling process
        while the mapping's lock is held: keep it short.
        """
        key = self._check_key(key)
        with self.lock():
            current = self._current(key, default)
            new = self._coerce(fn(current))
            self[key] = new
        return new

    @contextmanager
    def edit(self, key: Any, default: Any = MISSING) -> Iterator[Any]:
        """Edit a nested value in place and write it back atomically on exit.

        ``with d.edit("cfg", default={}) as cfg: cfg["x"] = 1``. The lock is
        held for the whole block; if the block raises, nothing is written.
        """
        key = self._check_key(key)
        with self.lock():
            value = self._current(key, default)
            yield value
            self[key] = value

    def _current(self, key: Any, default: Any) -> Any:
        try:
            return self[key]
        except KeyError:
            if default is MISSING:
                raise
            return _copy.deepcopy(default)

    def pop(self, key: Any, default: Any = MISSING) -> Any:
        with self.lock():
            try:
                value = self[key]
            except KeyError:
                if default is MISSING:
                    raise
                return default
            del self[key]
            return value

    def popitem(self) -> tuple[Any, Any]:
        with self.lock():
            keys = list(self)
            if not keys:
                raise KeyError("popitem(): mapping is empty")
            key = keys[-1]
            return key, self.pop(key)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        with self.lock():
            try:
                return self[key]
            except KeyError:
                self[key] = default
                return self._coerce(default)

    # ------------------------------------------------------------ bulk operations

    def snapshot(self) -> dict[Any, Any]:
        """One consistent, detached plain-``dict`` copy of the whole mapping."""
        self._check_open()
        with self.lock():
            return {k: self[k] for k in list(self)}

    def copy(self) -> dict[Any, Any]:
        """A detached plain ``dict`` (the same as :meth:`snapshot`)."""
        return self.snapshot()

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Set many keys in one atomic step; if any key or value is invalid, nothing changes."""
        self._check_open()
        self._update_items(self._validated_items(other, kwargs))

    def _update_items(self, items: list[tuple[Any, Any]]) -> None:
        """Store already validated pairs all-or-nothing. Backends override with one step."""
        with self.lock():
            undo = [(k, self.get(k, MISSING)) for k, _ in items]
            self._write_journal(undo)
            try:
                for k, v in items:
                    self[k] = v
            except BaseException:
                self._restore(undo)
                raise
            self._end_journal()

    def clear(self) -> None:
        """Remove every key in one atomic step."""
        with self.lock():
            undo = list(self.snapshot().items())
            self._write_journal(undo, "clear")
            try:
                for k, _ in undo:
                    del self[k]
            except BaseException:
                self._restore(undo, "clear")
                raise
            self._end_journal()

    def _restore(self, undo: list[tuple[Any, Any]], kind: str = "update") -> None:
        self._replay_undo(kind, [(k, v is not MISSING, v) for k, v in undo])
        self._end_journal()

    def _validated_items(self, other: Any, kwargs: Mapping[str, Any]) -> list[tuple[Any, Any]]:
        """``update()``'s arguments as checked, coerced pairs (dict's errors for bad forms)."""
        pairs: list[tuple[Any, Any]]
        if isinstance(other, Operations):
            pairs = list(other.snapshot().items())
        elif isinstance(other, Mapping):
            pairs = list(other.items())
        elif hasattr(other, "keys"):
            pairs = [(k, other[k]) for k in other.keys()]
        else:
            pairs = []
            for i, item in enumerate(other):
                try:  # dict's errors: TypeError if not a sequence, ValueError if not a pair
                    seq = tuple(item)
                except TypeError:
                    raise TypeError(
                        f"cannot convert update() element #{i} to a sequence: {item!r:.60}"
                    ) from None
                if len(seq) != 2:
                    raise ValueError(
                        f"update() element #{i} has length {len(seq)}; 2 is required"
                    )
                pairs.append((seq[0], seq[1]))
        pairs.extend(kwargs.items())
        keys_ok = False  # whether every key is known valid without a per-key check
        if self._declared is None:
            allowed = self.capabilities.key_types
            if allowed is None:
                keys_ok = isinstance(other, Mapping)  # its keys hash (pairs may not)
            else:
                kinds = set(map(type, map(_first, pairs)))  # (each allowed type but tuple hashes)
                keys_ok = tuple not in kinds and kinds.issubset(allowed)
        if not keys_ok:
            return [(self._check_key(k), self._coerce(v)) for k, v in pairs]
        if self._vt is None:
            return pairs
        coerce = self._vt.coerce
        return [(k, coerce(v)) for k, v in pairs]


def check_number(what: str, x: Any) -> None:
    """Refuse a non-number ``delta``/``default`` of ``incr`` (bool, str, containers)."""
    if isinstance(x, bool) or not hasattr(x, "__add__") or isinstance(x, (str, bytes, list, tuple)):
        raise TypeError(f"incr() {what} must be a number, got {type(x).__name__} {x!r:.40}")


def add(key: Any, current: Any, delta: Any) -> Any:
    """``current + delta`` for incr, with a message that names the key when it is not a number."""
    if isinstance(current, (bool, str, bytes, list, tuple, dict)) or current is None:
        raise TypeError(
            f"incr() needs a number at key {key!r:.60}, found {type(current).__name__}; "
            f"use transform() for other kinds of value"
        )
    try:
        return current + delta
    except TypeError:
        raise TypeError(
            f"incr() cannot add {type(delta).__name__} to the {type(current).__name__} at "
            f"key {key!r:.60}; use transform() for other kinds of value"
        ) from None
