"""Numeric bulk access to an ``shm`` mapping, in numpy: many values under one lock.

``get_many``/``set_many``/``values_array`` of :class:`~.mapping.ShmMapping`
(whose ``value_type`` is numeric), and ``update()`` of many ints or floats:
keys are encoded and located all together (:mod:`.many`), and a large batch
is applied by building a new generation with the changes (:mod:`.build`),
published with one switch, so it lands whole or not at all.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from ...base import MISSING
from . import layout as L

if TYPE_CHECKING:
    from .many import KeyBatch
    from .mapping import ShmMapping
    from .table import Table

_first, _second = operator.itemgetter(0), operator.itemgetter(1)

SMALL_BATCH = 256  # up to this many keys, set_many journals key by key


def values_array(m: ShmMapping) -> Any:
    from .copies import consistent_copy

    _need_numeric(m, "values_array")
    m._check_open()
    cols = consistent_copy(m._t, with_heap=False, columns=("meta", "val"))[0]  # lock-free
    return _numeric(cols["meta"], cols["val"], m.config.value_type)


def get_many(m: ShmMapping, keys: Any, default: Any = MISSING) -> Any:
    np = L.numpy()
    from .many import locate

    _need_numeric(m, "get_many")
    batch = _key_batch(m, keys)
    t = m._wlocked()
    try:
        found = locate(t.g, batch)
        have = found >= 0
        at = found[have]
        ents = t.g.entries()
        meta, val = ents["meta"][at], ents["val"][at]  # fancy indexing copies
    finally:
        t.leave()
    if not have.all() and default is MISSING:
        raise KeyError(batch.key(int(np.argmin(have))))
    out = np.empty(batch.n, dtype=m.config.value_type)
    out[have] = _numeric(meta, val, m.config.value_type)
    if not have.all():
        out[~have] = default
    return out


def set_many(m: ShmMapping, keys: Any, values: Any) -> None:
    np = L.numpy()
    from .many import has_duplicates

    vt = _need_numeric(m, "set_many")
    batch = _key_batch(m, keys)
    arr = np.asarray(values)
    if arr.ndim != 1 or len(arr) != batch.n:
        raise ValueError(f"set_many: {batch.n} keys but {arr.size} values")
    inline = _inline_values(vt, arr)
    if inline is None or batch.n <= SMALL_BATCH or has_duplicates(batch):
        keys = [batch.key(i) for i in range(batch.n)]  # journaled, one key at a time
        m._update_items(m._validated_items(zip(keys, arr.tolist()), {}))
        return
    _set_batch(m._wlocked(), batch, L.V_FLOAT if vt.kind == "float" else L.V_INT, inline)


def update_in_numpy(m: ShmMapping, items: list[tuple[Any, Any]]) -> bool:
    """``update()`` of many (validated) items whose values are all ints or all floats,
    as one numpy rebuild; False (nothing done) for any other kind of batch."""
    np = L.numpy()
    from .many import encode_keys, has_duplicates

    values = list(map(_second, items))  # (C loops here: this is the bulk path)
    kind = type(values[0])
    if kind not in (int, float) or set(map(type, values)) != {kind}:
        return False
    try:
        inline = np.array(values, dtype="<i8" if kind is int else "<f8")
    except OverflowError:
        return False  # ints beyond int64 live on the heap
    batch = encode_keys(list(map(_first, items)))
    if has_duplicates(batch):
        return False
    _set_batch(m._wlocked(), batch, L.V_INT if kind is int else L.V_FLOAT, inline.view("<i8"))
    return True


def _set_batch(t: Table, batch: KeyBatch, vkind: int, inline: Any) -> None:
    """Set distinct keys to inline numbers of one kind: locate them, then rebuild the
    table with the changes, all in numpy; one store publishes it. The lock is held
    (and released here)."""
    from .many import locate

    try:
        found = locate(t.g, batch)
        add = found < 0
        heap = int(((batch.lens[add] + 7) // 8).sum()) * 8
        t.rebuild(extra_entries=int(add.sum()), extra_heap=heap,
                  changes=(found, batch, vkind, inline))
    finally:
        t.leave()


def _key_batch(m: ShmMapping, keys: Any) -> KeyBatch:
    np = L.numpy()
    from .many import encode_keys

    if m._declared is not None:
        keys = [m._check_key(k.item() if isinstance(k, np.generic) else k) for k in keys]
    try:
        return encode_keys(keys)
    except TypeError as exc:
        raise TypeError(f"{exc}; nothing was changed") from None


def _inline_values(vt: Any, arr: Any) -> Any:
    """``arr`` as the table's inline int64 words, checked like ``value_type`` checks one
    value (the first bad one raises its error); None if numpy cannot do it."""
    np = L.numpy()
    if arr.dtype.kind not in "iuf" or (vt.kind == "int" and arr.dtype.kind == "f"):
        for v in arr.tolist():
            vt.coerce(v)  # raises for the first value that does not fit
        return None  # (e.g. an object array of fitting Python ints)
    if vt.kind == "float":
        return arr.astype("<f8").view("<i8")
    if len(arr) and (arr.min() < vt.lo or arr.max() > vt.hi):
        bad = arr[(arr < vt.lo) | (arr > vt.hi)][0]
        vt.coerce(int(bad))  # raises the range error
    if len(arr) and arr.max() > np.iinfo(np.int64).max:
        return None  # uint64 beyond int64 is not stored inline
    return arr.astype("<i8")


def _need_numeric(m: ShmMapping, what: str) -> Any:
    vt = m._vt
    if vt is None or not vt.numeric:
        raise TypeError(
            f"{what}() needs a numeric value_type, e.g. shareit.open(name, backend='shm', "
            f"value_type='float64')"
        )
    return vt


def _numeric(meta: Any, raw: Any, value_type: str) -> Any:
    """Inline values (``raw``, a copy the caller owns) of the given kinds as ``value_type``."""
    kinds = meta & 0xFF
    if value_type.startswith("float"):
        out = raw.view("<f8")
        ints = kinds == L.V_INT
        if ints.any():
            out[ints] = raw[ints]  # (reads the int words before they are overwritten)
        return out.astype(value_type, copy=False)
    if value_type == "bool":
        return kinds == L.V_TRUE
    return raw.astype(value_type)
