"""Value types and value encoding shared by every backend.

Declared ``value_type`` rules live here, once, so that every backend accepts
and normalises exactly the same values: switching backend never changes what
is accepted. This module must stay importable without numpy (the manager
server imports it), so the type table is plain Python.
"""

from __future__ import annotations

import operator
import pickle
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ValueType", "VALUE_TYPES", "value_type", "dumps", "loads"]

PROTOCOL = pickle.HIGHEST_PROTOCOL


def dumps(value: object) -> bytes:
    """Pickle ``value``; an unpicklable value raises ``TypeError`` saying what would work."""
    try:
        return pickle.dumps(value, PROTOCOL)
    except Exception as exc:  # PicklingError, TypeError, AttributeError (local objects)
        raise TypeError(
            f"cannot store a value of type {type(value).__name__!r}: it cannot be pickled "
            f"({exc}). Store plain data (numbers, str, bytes, lists, dicts, dataclasses "
            f"defined at module level) instead."
        ) from None


loads = pickle.loads

#: Types a server can hold as themselves: built-in, immutable, never need user classes.
PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None)})


def all_plain(values: Iterable[object]) -> bool:
    """Whether every value is of a plain type (C loops only: for bulk paths)."""
    return set(map(type, values)) <= PLAIN_TYPES


def pack(value: object) -> object:
    """A value as a server stores it: plain built-ins as themselves, others as ``(pickle,)``.

    A tuple in storage therefore always means "pickled" (tuple values are pickled).
    """
    if type(value) in PLAIN_TYPES:
        return value
    return (dumps(value),)


def unpack(stored: object) -> Any:
    return loads(stored[0]) if type(stored) is tuple else stored


class ValueType:
    """One declared value type: its name, kind and the coercion it applies."""

    __slots__ = ("name", "kind", "lo", "hi", "coerce")

    def __init__(self, name: str, kind: str, lo: int | None = None, hi: int | None = None):
        self.name, self.kind, self.lo, self.hi = name, kind, lo, hi
        self.coerce: Callable[[Any], Any]
        if kind == "int":
            if lo is None or hi is None:
                raise ValueError(f"the int value type {name!r} needs its range")
            self.coerce = self._int_in(lo, hi)
        else:
            self.coerce = {"float": self._float, "bool": self._bool}[kind]

    def __reduce__(self) -> tuple[type[ValueType], tuple[str, str, int | None, int | None]]:
        return ValueType, (self.name, self.kind, self.lo, self.hi)

    def _reject(self, value: object) -> TypeError:
        want = {
            "int": "an int",
            "float": "an int or a float",
            "bool": "True or False",
        }[self.kind]
        return TypeError(
            f"this mapping holds {self.name} values (value_type={self.name!r}); "
            f"got {type(value).__name__} {value!r:.60}, expected {want}"
        )

    def _int_in(self, lo: int, hi: int) -> Callable[[Any], int]:
        """The coercion to an int of ``lo .. hi`` (a closure: the range is two cell loads)."""
        reject = self._reject

        def _int(value: Any) -> int:
            if isinstance(value, bool) or isinstance(value, float):
                raise reject(value)
            try:
                v = operator.index(value)
            except TypeError:
                raise reject(value) from None
            if not lo <= v <= hi:
                raise ValueError(
                    f"{v} does not fit value_type={self.name!r} (range {lo} .. {hi})"
                )
            return v

        return _int

    def _float(self, value: Any) -> float:
        if isinstance(value, (bool, str, bytes)):
            raise self._reject(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise self._reject(value) from None

    def _bool(self, value: object) -> bool:
        if value is True or value is False or type(value).__name__ == "bool_":
            return bool(value)
        raise self._reject(value)

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "float")

    def __repr__(self) -> str:
        return f"ValueType({self.name!r})"


def _int_types() -> dict[str, ValueType]:
    out: dict[str, ValueType] = {}
    for bits in (8, 16, 32, 64):
        out[f"int{bits}"] = ValueType(f"int{bits}", "int", -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        out[f"uint{bits}"] = ValueType(f"uint{bits}", "int", 0, 2**bits - 1)
    return out


VALUE_TYPES: dict[str, ValueType] = {
    **_int_types(),
    "float32": ValueType("float32", "float"),
    "float64": ValueType("float64", "float"),
    "bool": ValueType("bool", "bool"),
}
_ALIASES = {"int": "int64", "float": "float64", "double": "float64", "bool_": "bool"}


def value_type(spec: object) -> str | None:
    """Normalise a ``value_type`` option to one of :data:`VALUE_TYPES`' names, or ``None``.

    Accepts the names (``"int64"``), the Python types ``int``/``float``/``bool`` and
    numpy dtypes or scalar types (anything with a ``.name`` or ``__name__`` that names one).
    """
    if spec is None:
        return None
    if isinstance(spec, type) and spec in (int, float, bool):
        name = {int: "int64", float: "float64", bool: "bool"}[spec]
    elif isinstance(spec, str):
        name = spec
    else:
        found = getattr(spec, "name", None) or getattr(spec, "__name__", None)
        name = found if isinstance(found, str) else repr(spec)
    name = _ALIASES.get(name, name)
    if name not in VALUE_TYPES:
        raise ValueError(
            f"value_type {spec!r} is not supported; use one of {sorted(VALUE_TYPES)}, "
            f"or leave it unset to store any picklable value"
        )
    return name
