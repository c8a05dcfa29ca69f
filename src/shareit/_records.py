"""Records are data: the JSON schema of a mapping's record, and its validation.

A record tells other processes how to attach to a named mapping (the runtime
dir's ``NAME@meta`` file, or a redis mapping's ``:meta`` hash). Whatever is
read from one is checked here before anything uses it: JSON only (never
pickle), every field of the expected type, and no field that names a path --
paths are derived from the mapping's name alone. A record that fails is a
:class:`~shareit.errors.RecordError`, never a crash deep inside a backend.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from typing import Any, TypeAlias, TypedDict

from .errors import ConfigError, RecordError

__all__ = [
    "options_to_json", "options_from_json", "validate", "backend_fields", "VERSION",
    "Key", "Options", "Proc", "Record",
]

#: Version of the record format (2: JSON options, per-user runtime dir, NAME@kind files;
#: 3: the list of users).
VERSION = 3

_BACKEND_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
_INT64 = (-(1 << 63), (1 << 63) - 1)

#: A key a record can declare (see :func:`key_to_json`).
Key: TypeAlias = "str | int | bytes | float | bool | tuple[Key, ...] | None"

#: A process as a record names it: a JSON ``[pid, start time]`` pair (start None when it
#: could not be read); ``parents`` entries are ``[pid, start, first child's pid, several]``.
#: Lists, not tuples: they are compared with what JSON gives back, so the element type is
#: what :func:`validate` checked (``_is_proc``), not something a list type can say.
Proc: TypeAlias = list[Any]


class Options(TypedDict):
    """A record's structural options, as :func:`options_from_json` gives them back."""

    value_type: str | None
    keys: tuple[Key, ...] | None
    capacity: int | None
    persist: bool


class Record(TypedDict):
    """A local record (``NAME@meta``) as :func:`validate` gives it back: every field checked.

    ``fields`` holds the backend's own fields, still unchecked (see :func:`backend_fields`).
    """

    version: int
    backend: str
    persist: bool
    owner_pid: int
    owner_start: int | None
    created: float
    options: Options
    users: list[Proc]
    transit_n: int
    parents: list[Proc]
    keeper: Proc | None
    transit: float
    transit_by: Proc | None
    fields: dict[str, Any]


# --------------------------------------------------------------------------- keys as JSON


def key_to_json(key: object) -> list[object]:
    """A declared key as tagged JSON: ``["s", "x"]``, ``["i", 3]``, ``["b", base64]``, ...

    Raises ConfigError for a key type a record cannot carry.
    """
    t = type(key)
    if type(key) is str:
        return ["s", key]
    if type(key) is int:
        return ["i", key]
    if type(key) is bytes:
        return ["b", base64.b64encode(key).decode()]
    if type(key) is bool:
        return ["T" if key else "F"]
    if key is None:
        return ["n"]
    if type(key) is float:
        if not math.isfinite(key):
            raise ConfigError(f"declared key {key!r} is not finite; use a finite number or a str")
        return ["f", key]
    if type(key) is tuple:
        return ["t", [key_to_json(k) for k in key]]
    raise ConfigError(
        f"a named mapping's declared keys must be str, int, bytes, float, bool, None or tuples "
        f"of these (they are written to its record as JSON); got {t.__name__} {key!r:.60}"
    )


def key_from_json(obj: object) -> Key:
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], str):
        raise RecordError(f"a declared key is not a tagged JSON list: {obj!r:.60}")
    tag, rest = obj[0], obj[1:]
    if tag in ("T", "F", "n") and not rest:
        return {"T": True, "F": False, "n": None}[tag]
    if len(rest) != 1:
        raise RecordError(f"a declared key has a malformed tag {obj!r:.60}")
    v = rest[0]
    if tag == "s" and isinstance(v, str):
        return v
    if tag == "i" and type(v) is int:
        return v
    if tag == "f" and type(v) is float:
        return v
    if tag == "b" and isinstance(v, str):
        try:
            return base64.b64decode(v, validate=True)
        except ValueError:
            raise RecordError("a declared bytes key is not valid base64") from None
    if tag == "t" and isinstance(v, list):
        return tuple(key_from_json(x) for x in v)
    raise RecordError(f"a declared key has an unknown tag or value {obj!r:.60}")


# --------------------------------------------------------------------------- options


def options_to_json(options: Mapping[str, Any]) -> dict[str, object]:
    """The structural options (value_type, keys, capacity, persist) as a JSON object."""
    keys = options.get("keys")
    return {
        "value_type": options.get("value_type"),
        "keys": None if keys is None else [key_to_json(k) for k in keys],
        "capacity": options.get("capacity"),
        "persist": bool(options.get("persist", False)),
    }


def options_from_json(obj: object) -> Options:
    """The inverse of :func:`options_to_json`, validating every field (RecordError)."""
    from ._codec import VALUE_TYPES

    if not isinstance(obj, dict):
        raise RecordError(f"'options' is not a JSON object: {type(obj).__name__}")
    vt = obj.get("value_type")
    if vt is not None and (not isinstance(vt, str) or vt not in VALUE_TYPES):
        raise RecordError(f"'options.value_type' is not a known value type: {vt!r:.40}")
    keys = obj.get("keys")
    if keys is not None and (not isinstance(keys, list) or not keys):
        raise RecordError("'options.keys' is not a non-empty list")
    declared = None if keys is None else tuple(key_from_json(k) for k in keys)
    cap = obj.get("capacity")
    if cap is not None and (type(cap) is not int or not 1 <= cap <= _INT64[1]):
        raise RecordError(f"'options.capacity' is not a positive int: {cap!r:.40}")
    persist = obj.get("persist", False)
    if type(persist) is not bool:
        raise RecordError("'options.persist' is not true or false")
    return {"value_type": vt, "keys": declared, "capacity": cap, "persist": persist}


# --------------------------------------------------------------------------- whole records

#: Fields every local record has: name -> accepted types.
_BASE_FIELDS: dict[str, tuple[type, ...]] = {
    "version": (int,),
    "backend": (str,),
    "persist": (bool,),
    "owner_pid": (int,),
    "owner_start": (int, type(None)),
    "created": (int, float),
    "options": (dict,),
    "users": (list,),
}


def _check_fields(record: Mapping[str, object],
                  schema: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, types in schema.items():
        if field not in record:
            raise RecordError(f"the record has no {field!r} field")
        v = record[field]
        if type(v) not in types:
            raise RecordError(
                f"the record's {field!r} is {type(v).__name__}, expected "
                f"{' or '.join(t.__name__ for t in types)}"
            )
        out[field] = v
    return out


def validate(record: object) -> Record:
    """Check a decoded record's common fields; return them, ``options`` decoded.

    The backend's own fields are kept aside, unchecked, under ``"fields"``:
    :func:`backend_fields` checks them against the backend's schema once the
    backend is known. Nothing else from the record survives.
    """
    if not isinstance(record, dict):
        raise RecordError(f"the record is a JSON {type(record).__name__}, not an object")
    out = _check_fields(record, _BASE_FIELDS)
    if out["version"] != VERSION:
        raise RecordError(f"the record has format version {out['version']}, expected {VERSION}")
    if not _BACKEND_RE.fullmatch(out["backend"]):
        raise RecordError(f"the record's backend {out['backend']!r:.40} is not a backend name")
    if not 0 < out["owner_pid"] < (1 << 31):
        raise RecordError(f"the record's owner_pid {out['owner_pid']} is not a pid")
    if out["owner_start"] is not None and not 0 <= out["owner_start"] <= _INT64[1]:
        raise RecordError("the record's owner_start is out of range")
    if not 0 <= out["created"] < 1e11:  # (NaN fails too) a time.time() of this era
        raise RecordError(f"the record's creation time {out['created']!r:.30} is not a time")
    if len(out["users"]) > 100_000 or not all(map(_is_proc, out["users"])):
        raise RecordError("the record's users are not a list of [pid, start time] pairs")
    parents = record.get("parents", [])
    if type(parents) is not list or len(parents) > 1000 or not all(
        type(p) is list and len(p) == 4 and _is_proc(p[:2]) and type(p[2]) is int
        and 0 < p[2] < (1 << 31) and p[3] in (0, 1) for p in parents
    ):
        raise RecordError("the record's parents are not a list of [pid, start, child, several]")
    keeper = record.get("keeper")
    if keeper is not None and not _is_proc(keeper):
        raise RecordError("the record's keeper is not a [pid, start time] pair")
    transit = record.get("transit", 0.0)
    if type(transit) not in (int, float) or not 0 <= transit < 1e11:
        raise RecordError("the record's transit time is not a time")
    transit_n = record.get("transit_n", 0)
    if type(transit_n) is not int or not 0 <= transit_n < (1 << 31):
        raise RecordError("the record's transit count is not a count")
    transit_by = record.get("transit_by")
    if transit_by is not None and not _is_proc(transit_by):
        raise RecordError("the record's transit_by is not a [pid, start time] pair")
    return {
        "version": out["version"],
        "backend": out["backend"],
        "persist": out["persist"],
        "owner_pid": out["owner_pid"],
        "owner_start": out["owner_start"],
        "created": out["created"],
        "options": options_from_json(out["options"]),
        "users": out["users"],
        "transit_n": transit_n,
        "parents": parents,
        "keeper": keeper,
        "transit": float(transit),
        "transit_by": transit_by,
        "fields": {k: v for k, v in record.items()
                   if k not in _BASE_FIELDS
                   and k not in ("parents", "keeper", "transit", "transit_n", "transit_by")},
    }


def _is_proc(u: object) -> bool:
    """A ``[pid, start time]`` pair (start None when it could not be read)."""
    return (type(u) is list and len(u) == 2 and type(u[0]) is int and 0 < u[0] < (1 << 31)
            and (u[1] is None or (type(u[1]) is int and 0 <= u[1] <= _INT64[1])))


def backend_fields(record: Mapping[str, Any],
                   schema: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    """The backend's own fields of a :func:`validate`-d record, checked against ``schema``."""
    out = _check_fields(record["fields"], schema)
    for field in ("server_pid",):
        if field in out and not 0 < out[field] < (1 << 31):
            raise RecordError(f"the record's {field} {out[field]} is not a pid")
    for field in ("server_start",):
        v = out.get(field)
        if v is not None and not 0 <= v <= _INT64[1]:
            raise RecordError(f"the record's {field} is out of range")
    return out
