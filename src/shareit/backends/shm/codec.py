"""How the ``shm`` table encodes keys and values, one at a time and (decoding) all at once.

Keys are stored as ``(kind, bytes)``, the same in every interpreter (never
``hash()``: it differs between spawned interpreters), hashed with CRC-32.
Values are an inline int64 word (ints, floats, None, bools) or heap bytes
(str, bytes, pickles). :func:`decode_keys` and :func:`decode_values` decode
a whole numpy copy of the entries (snapshot, iteration).
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

from ..._codec import dumps
from .layout import (
    HEAP_KINDS,
    K_BYTES,
    K_INT,
    K_STR,
    K_TUPLE,
    V_BYTES,
    V_FALSE,
    V_FLOAT,
    V_INT,
    V_NONE,
    V_PICKLE,
    V_STR,
    V_TRUE,
)

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

def encode_key(key: Any) -> tuple[int, bytes]:
    """(kind, bytes) of a key: the same in every interpreter (never ``hash()``)."""
    t = type(key)
    if t is str:
        return K_STR, key.encode("utf-8", "surrogatepass")
    if t is bytes:
        return K_BYTES, key
    if t is int:
        return K_INT, key.to_bytes(max(8, (key.bit_length() + 8) // 8), "little", signed=True)
    if t is tuple:
        parts: list[bytes] = []
        for part in key:
            kind, b = encode_key(part)
            parts.append(struct.pack("<BI", kind, len(b)) + b)
        return K_TUPLE, b"".join(parts)
    raise TypeError(f"shm keys are str, bytes, int or tuples of these; got {t.__name__}")


def decode_key(kind: int, b: bytes) -> Any:
    if kind == K_STR:
        return b.decode("utf-8", "surrogatepass")
    if kind == K_BYTES:
        return bytes(b)
    if kind == K_INT:
        return int.from_bytes(b, "little", signed=True)
    parts: list[Any] = []
    i = 0
    while i < len(b):
        k, n = struct.unpack_from("<BI", b, i)
        i += 5
        parts.append(decode_key(k, b[i : i + n]))
        i += n
    return tuple(parts)


def encode_value(value: Any) -> tuple[int, int, bytes | None]:
    """(kind, inline int64 bits, heap bytes or None)."""
    t = type(value)
    if t is int and _INT64_MIN <= value <= _INT64_MAX:
        return V_INT, value, None
    if t is float:
        return V_FLOAT, f2i(value), None
    if t is str:
        return V_STR, 0, value.encode("utf-8", "surrogatepass")
    if t is bytes:
        return V_BYTES, 0, value
    if value is None:
        return V_NONE, 0, None
    if value is True:
        return V_TRUE, 0, None
    if value is False:
        return V_FALSE, 0, None
    return V_PICKLE, 0, dumps(value)


_PACK_Q, _UNPACK_D = struct.Struct("<q").pack, struct.Struct("<d").unpack
_PACK_D, _UNPACK_Q = struct.Struct("<d").pack, struct.Struct("<q").unpack


def f2i(x: float) -> int:
    """The int64 word of a float64's bits."""
    i: int = _UNPACK_Q(_PACK_D(x))[0]
    return i


def i2f(i: int) -> float:
    x: float = _UNPACK_D(_PACK_Q(i))[0]
    return x


INLINE_CONST = {V_NONE: None, V_TRUE: True, V_FALSE: False}


def decode_value(kind: int, inline: int, raw: bytes | None) -> Any:
    if kind == V_INT:
        return inline
    if kind == V_FLOAT:
        return i2f(inline)
    if kind == V_STR:
        return raw.decode("utf-8", "surrogatepass")  # type: ignore[union-attr]
    if kind == V_BYTES:
        return bytes(raw)  # type: ignore[arg-type]
    if kind == V_PICKLE:
        return pickle.loads(raw)  # type: ignore[arg-type]
    return INLINE_CONST[kind]


def decode_keys(ents: Any, heap: Any) -> list[Any]:
    """The keys of copied entries (a numpy array of ``ENTRY_DTYPE``) from a copied heap."""
    if len(ents) == 0:
        return []
    kkinds = (ents["meta"] >> 8) & 0xFF
    koff, klen = ents["koff"], ents["klen"]
    if (kkinds == K_INT).all() and (klen == 8).all():
        ints: list[Any] = heap.view("<i8")[koff].tolist()
        return ints
    hb = heap.tobytes()
    out: list[Any] = []
    for kind, off, n in zip(kkinds.tolist(), koff.tolist(), klen.tolist()):
        b = hb[off * 8 : off * 8 + n]
        out.append(b.decode("utf-8", "surrogatepass") if kind == K_STR else decode_key(kind, b))
    return out


def decode_values(ents: Any, heap: Any) -> list[Any]:
    """The values of copied entries; ``heap`` may be None when no value is on it."""
    if len(ents) == 0:
        return []
    kinds = ents["meta"] & 0xFF
    raw = ents["val"]
    if (kinds == V_FLOAT).all() or (kinds == V_INT).all():
        same: list[Any] = (raw.view("<f8") if kinds[0] == V_FLOAT else raw).tolist()
        return same
    hb = heap.tobytes() if heap is not None else b""  # no heap copy when no value is on it
    out: list[Any] = []
    for kind, inline in zip(kinds.tolist(), raw.tolist()):
        data = None
        if kind in HEAP_KINDS:
            off = (inline & 0xFFFFFFFF) * 8
            data = hb[off : off + (inline >> 32)]
        out.append(decode_value(kind, inline, data))
    return out
