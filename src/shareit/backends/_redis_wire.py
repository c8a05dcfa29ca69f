"""What travels between the redis backend and the server: the Lua scripts, the encoding of
keys and values in the hash, the ``:meta`` record, and the translation of Redis's replies.

Pure functions and data (no connection): :mod:`shareit.backends.redis` holds the
connection, the mapping and its lock.
"""

from __future__ import annotations

import json
import math
import operator
import pickle
from typing import Any

from .. import _records
from ..errors import BackendDiedError, RecordError

__all__ = ["META_VERSION", "SCRIPTS", "LOCKED", "LOST", "ValueCodec", "enc_key", "dec_key",
           "parse_meta", "plain_number", "response_error", "token_pid"]

META_VERSION = 2  # of the :meta hash (JSON options; 'serializer' since this version)
LOCKED = "LOCKED"
LOST = "LOST"

# ARGV[1] is the writer's lock() token, "" outside lock(). Without one a write
# waits for any holder; with one it is fenced: it goes through only while the
# lock key still holds that token, not after the lease lapsed (key expired,
# maybe taken and released by someone else since).
_GUARD = """
if redis.call('EXISTS', KEYS[3]) == 0 then return redis.error_reply('GONE') end
local o = redis.call('GET', KEYS[2])
if ARGV[1] ~= '' then
  if o ~= ARGV[1] then return redis.error_reply('LOST') end
elseif o then return redis.error_reply('LOCKED') end
"""
_SET = _GUARD + "redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) return 1"
_DEL = _GUARD + "return redis.call('HDEL', KEYS[1], ARGV[2])"
_UPDATE = _GUARD + """
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1"""
_CLEAR = _GUARD + "redis.call('DEL', KEYS[1]) return 1"
_INCR = _GUARD + """
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 0 then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[4])
end
if ARGV[5] == 'i' then return redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[3]) end
return redis.call('HINCRBYFLOAT', KEYS[1], ARGV[2], ARGV[3])"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0"""
# The whole record in one step: a reader never sees a record without its options.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1"""

#: name -> Lua source; registered once per connection.
SCRIPTS = {
    "set": _SET,
    "del": _DEL,
    "update": _UPDATE,
    "clear": _CLEAR,
    "incr": _INCR,
    "unlock": _UNLOCK,
    "renew": _RENEW,
    "claim": _CLAIM,
}

#: Top-level floats are Redis numbers, spelled as ``repr`` spells them; with
#: ``serializer="json"`` these three are the only non-JSON spellings read back.
NON_FINITE = {b"nan": math.nan, b"inf": math.inf, b"-inf": -math.inf}


def enc_key(key: Any) -> bytes:
    """A key as a hash field: str as plain UTF-8 (readable from any language), others tagged."""
    t = type(key)
    if t is str:
        b: bytes = key.encode("utf-8", "surrogatepass")
        return b if not b.startswith(b"\x00") else b"\x00s" + b
    if t is bytes:
        return b"\x00b" + bytes(key)
    return b"\x00i" + str(key).encode()


def dec_key(b: bytes) -> Any:
    """The key a hash field holds (see :func:`enc_key`)."""
    if not b.startswith(b"\x00"):
        return b.decode("utf-8", "surrogatepass")
    tag, rest = b[1:2], b[2:]
    if tag == b"b":
        return rest
    if tag == b"i":
        return int(rest)
    return rest.decode("utf-8", "surrogatepass")


class ValueCodec:
    """Values as stored in the hash, for one mapping (its serializer, its name in errors)."""

    def __init__(self, json_only: bool, label: str, why: str):
        self._json = json_only
        self._label = label
        self._why = why  # why json is in force, for its errors

    def enc(self, value: Any) -> bytes:
        """``value`` as stored: numbers as Redis numbers, others by the serializer."""
        t = type(value)
        if t is int:
            return str(value).encode()
        # (np.float64 reads back as float)
        if t is float or (self._json and isinstance(value, float)):
            return repr(float(value)).encode()
        if self._json:
            try:
                return json.dumps(value, allow_nan=False).encode()
            except TypeError as exc:
                raise TypeError(
                    f"serializer='json' stores JSON values only (dict, list, str, numbers, bool, "
                    f"None); {exc}. {self._why}"
                ) from None
            except ValueError as exc:  # NaN/infinity inside, or a circular reference
                raise ValueError(
                    f"serializer='json' cannot store this value: {exc} (JSON has no NaN or "
                    f"infinity; only a float stored on its own may be one)"
                ) from None
        from .._codec import dumps

        return dumps(value)

    def dec(self, b: bytes, field: bytes) -> Any:
        """The value stored as ``b`` at encoded key ``field`` (named in errors)."""
        if self._json:
            return self._dec_json(b, field)
        if b[:1] == b"\x80":
            return pickle.loads(b)
        try:
            return int(b)
        except ValueError:
            pass
        try:
            return float(b)
        except ValueError:
            raise self._bad_value(field, "neither a pickle nor a number") from None

    def _dec_json(self, b: bytes, field: bytes) -> Any:
        # Never pickle.loads here: json is the serializer for writers that are not trusted.
        if b in NON_FINITE:
            return NON_FINITE[b]
        try:
            return json.loads(b, parse_constant=refuse_constant)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError too
            raise self._bad_value(
                field, "not JSON (written by a serializer='pickle' writer, or not by shareit?)"
            ) from None

    def _bad_value(self, field: bytes, what: str) -> ValueError:
        try:
            key = dec_key(field)
        except ValueError:  # a field no shareit wrote: name it as stored
            key = field
        return ValueError(
            f"the value at key {key!r:.60} of mapping {self._label} is {what}; "
            f"it was left as it is"
        )


def response_error(exc: Exception) -> Exception:
    msg = str(exc)
    if "not an integer" in msg or "not a float" in msg or "not a valid float" in msg:
        return TypeError(
            f"incr() needs a number at this key ({msg}); use transform() for other values"
        )
    if "overflow" in msg:
        return ValueError(f"incr() would overflow a 64-bit integer ({msg})")
    if "NaN or Infinity" in msg:
        return ValueError(f"incr() would make the value NaN or infinite ({msg}); nothing changed")
    return BackendDiedError(f"Redis refused the command: {msg}")


def plain_number(what: str, x: Any) -> int | float:
    """``x`` as a built-in int or finite float, whose ``str`` Redis parses.

    numpy scalars (``np.int64(3)``, ``np.float64(0.5)``) included: on numpy 2
    their ``repr`` is ``np.int64(3)``, which no Redis command takes.
    """
    try:
        return operator.index(x)
    except TypeError:
        pass
    try:
        f = float(x)
    except (TypeError, ValueError):
        raise TypeError(
            f"incr() {what} must be a real number, got {type(x).__name__} {x!r:.40}"
        ) from None
    if not math.isfinite(f):
        raise ValueError(f"incr() {what} must be finite on the redis backend, got {f!r}")
    return f


def token_pid(token: Any) -> int | None:
    """The pid in a ``lock()`` token (``PID:THREAD:HEX``), or None if it is not one."""
    if not isinstance(token, bytes):
        return None
    head = token.split(b":", 1)[0]
    if not 1 <= len(head) <= 10 or not head.isdigit():  # bytes.isdigit: ASCII digits only
        return None
    pid = int(head)
    return pid if 0 < pid < (1 << 31) else None


def refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_meta(raw: dict[bytes, bytes]) -> dict[str, Any]:
    """A ``:meta`` hash as ``_claim_meta`` writes it, checked field by field (RecordError)."""
    try:
        meta = {k.decode(): v.decode() for k, v in raw.items()}
    except UnicodeDecodeError:
        raise RecordError("a field is not UTF-8") from None
    for field in ("version", "backend", "options"):
        if field not in meta:
            raise RecordError(f"it has no {field!r} field")
    if meta["version"] != str(META_VERSION):
        raise RecordError(
            f"it has format version {meta['version']!r:.20}, expected {META_VERSION} "
            f"(written by another shareit version?)"
        )
    if not _records._BACKEND_RE.fullmatch(meta["backend"]):
        raise RecordError(f"its backend {meta['backend']!r:.40} is not a backend name")
    try:
        options = json.loads(meta["options"], parse_constant=refuse_constant)
    except (ValueError, RecursionError):
        raise RecordError("its 'options' field is not JSON") from None
    serializer = meta.get("serializer")  # absent in records of older shareit versions
    if serializer is not None and serializer not in ("pickle", "json"):
        raise RecordError(f"its serializer {serializer!r:.40} is not 'pickle' or 'json'")
    return {"backend": meta["backend"], "options": _records.options_from_json(options),
            "serializer": serializer, "fields": {}}
