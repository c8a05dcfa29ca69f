"""The ``shm`` backend's numeric bulk access and diagnostics.

A mixin of :class:`~shareit.backends.shm.ShmMapping`: numpy reads and writes
of many values under one lock, the integrity check used after crashes, and
the facts ``shareit inspect`` shows.
"""

from __future__ import annotations

import fcntl
import operator
import os
import zlib
from typing import TYPE_CHECKING, Any

from .. import _runtime
from .._locks import RobustMutex
from ..base import MISSING
from . import _shm_layout as L

if TYPE_CHECKING:
    import numpy as np  # imported for real by L.numpy(), on first bulk use

_crc32 = zlib.crc32
_first, _second = operator.itemgetter(0), operator.itemgetter(1)


SMALL_BATCH = 256  # up to this many keys, set_many journals key by key


class ShmBulk:
    """Bulk and diagnostic methods of ShmMapping (see the module docstring)."""

    def values_array(self) -> np.ndarray:
        """A numpy copy of every value, in iteration order (needs a numeric ``value_type``)."""
        self._need_numeric("values_array")
        cols = self._consistent_copy(with_heap=False, columns=("meta", "val"))[0]  # lock-free
        return _numeric(cols["meta"], cols["val"], self._config.value_type)

    def keys_list(self) -> list:
        """Every key in iteration order (the order of :meth:`values_array`)."""
        return self._live_keys_values(values=False)[0]

    def get_many(self, keys: Any, default: Any = MISSING) -> np.ndarray:
        """Values of many keys as a numpy array, read under one lock, in numpy.

        ``keys`` is a sequence, or a numpy integer array. A missing key raises
        ``KeyError`` unless ``default`` is given.
        """
        np = L.numpy()
        from ._shm_many import locate

        self._need_numeric("get_many")
        batch = self._key_batch(keys)
        self._wlock()
        try:
            found = locate(self._g, batch)
            have = found >= 0
            at = found[have]
            ents = self._g.entries()
            meta, val = ents["meta"][at], ents["val"][at]  # fancy indexing copies
        finally:
            self._lock_release()
        if not have.all() and default is MISSING:
            raise KeyError(batch.key(int(np.argmin(have))))
        out = np.empty(batch.n, dtype=self._config.value_type)
        out[have] = _numeric(meta, val, self._config.value_type)
        if not have.all():
            out[~have] = default
        return out

    def set_many(self, keys: Any, values: Any) -> None:
        """Set many keys from a sequence or numpy array of values, in one atomic step.

        ``keys`` is a sequence, or a numpy integer array. Beyond a few hundred keys the
        table is rebuilt with the changes applied, in numpy, and switched to at once.
        """
        np = L.numpy()
        from ._shm_many import has_duplicates

        self._need_numeric("set_many")
        batch = self._key_batch(keys)
        arr = np.asarray(values)
        if arr.ndim != 1 or len(arr) != batch.n:
            raise ValueError(f"set_many: {batch.n} keys but {arr.size} values")
        inline = self._inline_values(arr)
        if inline is None or batch.n <= SMALL_BATCH or has_duplicates(batch):
            keys = [batch.key(i) for i in range(batch.n)]  # journaled, one key at a time
            self._update_items(self._validated_items(zip(keys, arr.tolist()), {}))
            return
        self._set_batch(batch, L.V_FLOAT if self._vt.kind == "float" else L.V_INT, inline)

    def _set_batch(self, batch: Any, vkind: int, inline: np.ndarray) -> None:
        """Set distinct keys to inline numbers of one kind: locate them, then rebuild the
        table with the changes, all in numpy, under one lock; one store publishes it."""
        from ._shm_many import locate

        self._wlock()
        try:
            found = locate(self._g, batch)
            add = found < 0
            heap = int(((batch.lens[add] + 7) // 8).sum()) * 8
            self._rebuild(extra_entries=int(add.sum()), extra_heap=heap,
                          changes=(found, batch, vkind, inline))
        finally:
            self._lock_release()

    def _update_in_numpy(self, items: list) -> bool:
        """``update()`` of many (validated) items whose values are all ints or all floats,
        as one numpy rebuild; False (nothing done) for any other kind of batch."""
        np = L.numpy()
        from ._shm_many import encode_keys, has_duplicates

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
        self._set_batch(batch, L.V_INT if kind is int else L.V_FLOAT, inline.view("<i8"))
        return True

    def _key_batch(self, keys: Any) -> Any:
        np = L.numpy()
        from ._shm_many import encode_keys

        if self._declared is not None:
            keys = [self._check_key(k.item() if isinstance(k, np.generic) else k) for k in keys]
        try:
            return encode_keys(keys)
        except TypeError as exc:
            raise TypeError(f"{exc}; nothing was changed") from None

    def _inline_values(self, arr: np.ndarray) -> np.ndarray | None:
        """``arr`` as the table's inline int64 words, checked like ``value_type`` checks one
        value (the first bad one raises its error); None if numpy cannot do it."""
        np = L.numpy()
        vt = self._vt
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

    def _need_numeric(self, what: str) -> None:
        if self._vt is None or not self._vt.numeric:
            raise TypeError(
                f"{what}() needs a numeric value_type, e.g. shareit.open(name, backend='shm', "
                f"value_type='float64')"
            )

    def verify(self) -> list[str]:
        """Check the table's integrity under the lock (repairing first); the problems found.

        Every live entry must be reachable from the index by its own key, the
        index must point only at live entries, counts must agree, no entry may
        be mid-write, and every heap reference must lie inside the used heap.
        """
        np = L.numpy()
        problems: list[str] = []
        self._wlock()
        try:
            g = self._g
            q = g.q
            used, live_n, top = q[L.H_USED], q[L.H_LIVE], q[L.H_TOP]
            ents = g.entries()[:used]
            index = g.index()
            live = (ents["meta"] & L.LIVE) != 0
            if int(live.sum()) != live_n:
                problems.append(f"live count {live_n} != {int(live.sum())} live entries")
            if (ents["ver"] & 1).any():
                problems.append(f"entries mid-write: {np.nonzero(ents['ver'] & 1)[0].tolist()}")
            pointed = index[index >= 0]
            if len(pointed) != int(live.sum()) or not live[pointed].all():
                problems.append("the index does not point at exactly the live entries")
            if ((ents["koff"].astype(np.int64) + (ents["klen"] + 7) // 8) > top).any():
                problems.append("a key lies beyond the heap top")
            heap_vals = np.isin(ents["meta"] & 0xFF, list(L.HEAP_KINDS)) & live
            v = ents["val"][heap_vals]
            if ((v & 0xFFFFFFFF) + ((v >> 32) + 7) // 8 > top).any():
                problems.append("a value lies beyond the heap top")
            for e in np.nonzero(live)[0].tolist():
                u = (g.ew + e * 4) * 2
                start = g.hoff + g.u32[u + 4] * 8
                kb = bytes(g.mv[start : start + g.u32[u + 3]])
                found, _ = self._find(g, (g.u32[u + 5] >> 8) & 0xFF, kb, g.u32[u + 2])
                if found != e:
                    problems.append(f"entry {e} is not reachable by its key")
                    break
        finally:
            self._lock_release()
        return problems

    def _lock_held_elsewhere(self) -> bool:
        """Whether another thread or process holds the writer lock now (for ``inspect``)."""
        if self._c[L.C_LOCKKIND] != L.LOCK_ROBUST:
            return _flock_held(L.ctrl_path(self._seg))
        m = RobustMutex(self._cmm, L.MUTEX_OFFSET)
        rc = m.trylock()
        if rc == 16:
            return True
        if rc == 130:
            m.make_consistent()  # its holder died; the next writer repairs
        m.unlock()
        return False

    def _lock_holder(self) -> int | None:
        """The pid holding the writer lock, if the mutex says (glibc keeps the owner's
        thread id at offset 8 of ``pthread_mutex_t``); None when free or unknown."""
        if self._c[L.C_LOCKKIND] != L.LOCK_ROBUST:
            return None
        tid = int.from_bytes(self._cmm[L.MUTEX_OFFSET + 8 : L.MUTEX_OFFSET + 12], "little") & 0x3FFFFFFF
        if not tid:
            return None
        try:
            with open(f"/proc/{tid}/status") as f:
                for line in f:
                    if line.startswith("Tgid:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def info(self) -> dict:
        """Segment sizes and table statistics (for ``shareit inspect`` and benchmarks)."""
        self._check_open()
        g = self._g
        q = g.q
        writer = self._c[L.C_WRITER]
        return {
            "generation": g.gen, "capacity": g.cap, "index_slots": g.isize,
            "used_entries": q[L.H_USED], "keys": q[L.H_LIVE], "heap_bytes": g.heapw * 8,
            "heap_used_bytes": q[L.H_TOP] * 8, "garbage_bytes": q[L.H_GARBAGE] * 8,
            "segment_bytes": g.size, "control_bytes": L.CTRL_SIZE,
            "lock_held": self._lock_held_elsewhere(), "lock_holder": self._lock_holder(),
            "last_writer": writer or None,
        }


def _numeric(meta: np.ndarray, raw: np.ndarray, value_type: str) -> np.ndarray:
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


def _flock_held(path: str) -> bool:
    try:
        fd = _runtime.open_private(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
