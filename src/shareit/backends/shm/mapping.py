"""The ``shm`` backend's :class:`ShmMapping`: a :class:`~shareit.base.SharedMapping` that
holds a :class:`~.table.Table` (see the package docstring for what it does).

The mapping validates and encodes, and calls the table; it keeps the two hot
paths -- a cached read, and ``d[k] = number`` for a key whose entry this
process knows -- inline, because a Python call costs as much as the work.
"""

from __future__ import annotations

import os
import pickle
import platform
import struct
import weakref
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

from ... import _runtime
from ..._codec import PROTOCOL, dumps
from ..._locks import RobustMutex, robust_mutex_available
from ...base import MISSING, Capabilities, SharedMapping, _add, _check_number
from ...config import Config
from ...errors import BackendDiedError, ConfigError, NotFoundError
from . import layout as L
from . import numeric
from .codec import decode_keys, decode_values, encode_key, encode_value, f2i, i2f
from .fastpath import ABSENT, NOT_FLAT, insert, overwrite, remove_flat, store_number, write_flat
from .layout import (
    C_GROW,
    C_GSEQ,
    C_JSTATE,
    C_STAMP,
    C_TSEQ,
    J_INLINE,
    K_STR,
    LIVE,
    V_BYTES,
    V_FLOAT,
    V_INT,
    V_PICKLE,
    V_STR,
)
from .read import AGAIN, Got, get_str, lookup, read_entry, reread
from .read import length as _length
from .segments import (
    all_paths,
    bytes_view,
    create_file,
    ctrl_path,
    open_file,
    release,
    release_quietly,
    unlink_quiet,
    unmap,
)
from .table import Table

_loads = pickle.loads
_ENTRY = struct.Struct("<QIIIIq").unpack_from  # an entry: ver, hash, klen, koff, meta, value
_crc32 = zlib.crc32
_pdumps = pickle.dumps
_LIVE_KIND = LIVE | 0xFF
_LIVE_INT, _LIVE_FLOAT = LIVE | V_INT, LIVE | V_FLOAT
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_LOCKFREE_READS = platform.machine() in ("x86_64", "AMD64", "i686", "i386")
_NOHIT = (None, None, None, None, None, None, None, None, None)  # (a cache miss, see .cache)
_live: weakref.WeakValueDictionary[int, ShmMapping] = weakref.WeakValueDictionary()


def _after_fork_in_child() -> None:
    # The fast write path trusts its key -> entry cache to mean "this process's lock
    # is set up"; in a child it is not (a flock descriptor would be the parent's).
    for m in list(_live.values()):
        m._t.slots = {}


os.register_at_fork(after_in_child=_after_fork_in_child)


class ShmMapping(SharedMapping):
    """A hash table in shared memory; reads without locks, crash-safe writes."""

    backend = "shm"
    capabilities = Capabilities(
        attach_by_name=True,
        key_types=(str, bytes, int, tuple),
        ordered=True,
        notes="no server; lock-free reads; flock + undo journal for writes",
    )

    def __init__(self, name: str | None, config: Config, seg: str, cmm: Any,
                 g: L.Generation | None = None):
        """``g``: the first generation, just created and mapped (``_create``: each segment
        is mapped once); else the current one is mapped."""
        super().__init__(name, config)
        self._seg = seg
        self._t = t = Table(seg, cmm, self._label(), config.timeout, config.capacity or 0)
        self._finalizer = weakref.finalize(self, release, t.maps)
        self._finalizer.atexit = False  # at exit an owner still destroys through its maps
        self._cache = t.cache.entries  # (the hot read path looks here first)
        self._plain = self._declared is None and self._vt is None  # d[k] = number may go fast
        _live[id(self)] = self
        if g is not None:
            t.adopt(g)
        else:
            t.map_current()

    # ------------------------------------------------------------------ segments

    @classmethod
    def _create(cls, name: str | None, config: Config) -> ShmMapping:
        seg = name if name is not None else _runtime.anon_stem()
        for path in all_paths(seg):  # left by a dead owner
            unlink_quiet(path)
        cmm = create_file(ctrl_path(seg), L.CTRL_SIZE)
        c = bytes_view(cmm).cast("Q")
        g = None
        try:
            g = L.Generation.create(seg, 1, config.capacity or 8, (config.capacity or 8) * 16)
            if robust_mutex_available():
                RobustMutex.init(cmm, L.MUTEX_OFFSET)
                c[L.C_LOCKKIND] = L.LOCK_ROBUST
            else:
                c[L.C_LOCKKIND] = L.LOCK_FLOCK
            c[L.C_LAYOUT], c[L.C_GEN], c[L.C_GSEQ], c[L.C_MAGIC] = L.LAYOUT, 1, 2, L.MAGIC
            c.release()
            self = cls(name, config, seg, cmm, g)
        except BaseException:
            release_quietly(c)
            if g is not None:
                g.close()  # (twice, after the handle's finalizer ran: harmless)
            unmap(cmm)
            del c, cmm, g  # (the traceback keeps this frame: it must not keep the mapping)
            for path in all_paths(seg):
                unlink_quiet(path)
            raise
        if name is not None:
            self._publish()
        return self

    @classmethod
    def _attach_seg(cls, name: str | None, config: Config, seg: str) -> ShmMapping:
        try:
            cmm = open_file(ctrl_path(seg))
        except FileNotFoundError:
            raise NotFoundError(f"shm mapping {name or seg!r} no longer exists") from None
        c = bytes_view(cmm).cast("Q")
        ok = len(cmm) == L.CTRL_SIZE and c[L.C_MAGIC] == L.MAGIC and c[L.C_LAYOUT] == L.LAYOUT
        c.release()
        try:
            if not ok:
                raise ConfigError(f"segment of {name or seg!r} has an unknown layout")
            return cls(name, config, seg, cmm)
        except BaseException:
            unmap(cmm)  # (a handle made before the failure unmaps through its finalizer)
            raise

    @classmethod
    def _attach_record(cls, name: str, config: Config, record: Mapping[str, Any]) -> ShmMapping:
        return cls._attach_seg(name, config, name)  # paths follow from the name, never a record

    @classmethod
    def _cleanup_record(cls, name: str, record: Mapping[str, Any]) -> None:
        for path in all_paths(name):
            unlink_quiet(path)

    def _handle(self) -> tuple[Any, ...]:
        return (self._name, self._config, self._seg)

    @classmethod
    def _from_handle(cls, handle: tuple[Any, ...]) -> ShmMapping:
        name, config, seg = handle
        _runtime.check_stem(seg)
        try:
            return cls._attach_seg(name, config, seg)
        except NotFoundError as exc:
            raise BackendDiedError(str(exc)) from None

    def _close(self) -> None:
        self._t.close()
        self._cache = {}  # (empty for good: a read goes on to _check_open, which raises)
        self._finalizer()  # unmaps (once), as it would if the handle were dropped

    def _destroy(self) -> None:
        c = self._t.c
        c[L.C_GEN] = L.DESTROYED
        c[L.C_GSEQ] = 1  # odd: no reader's epoch matches any more
        for path in all_paths(self._seg):
            unlink_quiet(path)
        if self._name is not None:
            _runtime.remove_meta(self._name)
        self._close()

    # ------------------------------------------------------------------ the writer lock

    def _lock_acquire(self, timeout: float) -> bool:
        return self._t.acquire(timeout)

    def _lock_release(self) -> None:
        self._t.release()

    def _wlocked(self) -> Table:
        """The table, its writer lock held (within ``timeout``, else ``LockTimeoutError``)."""
        self._check_open()
        t = self._t
        t.wlock()
        return t

    # ------------------------------------------------------------------ reads

    def _read(self, key: Any) -> tuple[bool, Any]:
        """(found, value) of the last committed state, read without the lock (:mod:`.read`)."""
        kkind, kb = encode_key(key)
        h = _crc32(kb, kkind)
        if _LOCKFREE_READS:
            got = lookup(self._t, kkind, kb, h)
            if len(got) > 2:
                self._t.cache.remember(key, got)  # only now: a validated, committed value
            return got[0], got[1]
        t = self._wlocked()
        try:
            return self._read_locked(key, kkind, kb, h)
        finally:
            t.leave()

    def _read_locked(self, key: Any, kkind: int, kb: bytes, h: int) -> tuple[bool, Any]:
        got: Got | None = read_entry(self._t, kkind, kb, h)
        assert got is not None, "an entry is never mid-write while the writer lock is held"
        if len(got) > 2:
            self._t.cache.remember(key, got)  # committed: the lock is held, no transaction open
        return got[0], got[1]

    def __getitem__(self, key: Any) -> Any:
        hit = self._cache.get(key, _NOHIT)
        fast, c, e, q, w, ver, value, size, kt = hit
        if fast is type(key) and c[C_GSEQ] == e and q[w] == ver:
            return value  # (the hit: see .cache)
        t = self._t
        if kt is type(key):  # cached, but changed since (or a pickled value): its entry
            if not size and c[C_GSEQ] == e:
                # a number: replaced by a number? (read.reread's commonest case, inline)
                t1 = c[C_TSEQ]
                nver, _, _, _, meta, inline = _ENTRY(t.g.mv, w * 8)
                if (meta & _LIVE_KIND in (_LIVE_INT, _LIVE_FLOAT) and not (nver | t1) & 1
                        and q is t.q and q[w] == nver and c[C_TSEQ] == t1 and c[C_GSEQ] == e):
                    value = inline if meta & 0xFF == V_INT else i2f(inline)
                    self._cache[key] = (kt, c, e, q, w, nver, value, 0, kt)
                    return value
            value = reread(t, key, hit)
            if value is not AGAIN:
                return value
        if type(key) is str and self._declared is None and not self._closed and _LOCKFREE_READS:
            kb = key.encode("utf-8", "surrogatepass")  # (the cache miss of a str key)
            return get_str(t, key, kb, _crc32(kb, K_STR))
        self._check_open()
        found, value = self._read(self._check_key(key))
        if not found:
            raise KeyError(key)
        return value

    def __contains__(self, key: Any) -> bool:
        try:
            key = self._check_key(key)
        except KeyError:
            return False
        if key in self._cache:
            try:
                self[key]
                return True
            except KeyError:
                return False
        self._check_open()
        return self._read(key)[0]

    def __len__(self) -> int:
        self._check_open()
        return _length(self._t)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._live_keys_values(values=False)[0])

    def _live_keys_values(self, values: bool = True) -> tuple[list[Any], list[Any]]:
        """Keys (and values) of every live entry, in order, from one consistent copy."""
        from .copies import consistent_copy

        self._check_open()
        ents, heap, int_keys = consistent_copy(self._t)
        keys = int_keys.tolist() if int_keys is not None else decode_keys(ents, heap)
        vals = decode_values(ents, heap) if values else []
        return keys, vals

    def snapshot(self) -> dict[Any, Any]:
        keys, vals = self._live_keys_values()
        return dict(zip(keys, vals))

    # ------------------------------------------------------------------ writes

    def __setitem__(self, key: Any, value: Any) -> None:
        tv = type(value)
        tk = type(key)
        if tv is int or tv is float:
            if (tk is str or tk is int) and self._plain:  # (1.0 or True: not here)
                t = self._t
                w = t.slots.get(key, -1)
                if w >= 0:  # the hot path, inline: Table.store_inline, repeated for speed
                    if tv is float:
                        want, inline = _LIVE_FLOAT, f2i(value)
                    elif _INT64_MIN <= value <= _INT64_MAX:
                        want, inline = _LIVE_INT, value
                    else:
                        want = 0
                    lk = t.lock
                    if lk.busy:  # inside this thread's own write: the general path raises
                        want = 0
                    rc = lk.trylock() if want else 1
                    if not rc or (want and self._contended(rc)):
                        try:
                            c = t.c
                            g = t.g
                            if (c[C_GSEQ] == t.epoch and not c[C_JSTATE] and not c[C_GROW]
                                    and not c[C_TSEQ] & 1
                                    and g.u32[w * 2 + 5] & _LIVE_KIND == want):
                                if L.FAULT:
                                    t.store_inline(w, inline)
                                    return
                                c[C_JSTATE] = (w << 2) | J_INLINE
                                stamp = c[C_STAMP] + 1
                                c[C_STAMP] = stamp
                                q = g.q
                                q[w] = 2 * stamp + 1
                                g.qs[w + 3] = inline
                                q[w] = 2 * stamp + 2
                                c[C_JSTATE] = 0
                                return
                        finally:
                            lk.unlock()
                elif tk is str and not self._closed:  # a new key (to this process): flat
                    if tv is float:
                        vkind, vinl = V_FLOAT, f2i(value)
                    elif _INT64_MIN <= value <= _INT64_MAX:
                        vkind, vinl = V_INT, value
                    else:
                        vkind = 0
                    if vkind:
                        kb = key.encode("utf-8", "surrogatepass")
                        h = _crc32(kb, K_STR)
                        if insert(t, key, K_STR, kb, h, vkind, vinl, None):
                            return
                        t.set(key, K_STR, kb, h, vkind, vinl, None)
                        return
        elif self._plain and (tk is str or tk is bytes or tk is int):
            # a heap value (or None, a bool): the value encoded once, the key only if needed
            if tv is str:
                vkind, vinl, vraw = V_STR, 0, value.encode("utf-8", "surrogatepass")
            elif tv is bytes:
                vkind, vinl, vraw = V_BYTES, 0, value
            elif value is None or tv is bool:
                vkind, vinl, vraw = encode_value(value)
            else:  # (not int, not float: encode_value's last case, without the call)
                vkind, vinl = V_PICKLE, 0
                try:  # (pickle.dumps itself: _codec.dumps's frame costs ~100 ns)
                    vraw = _pdumps(value, PROTOCOL)
                except Exception:
                    vraw = dumps(value)  # raises the TypeError that says what would work
            t = self._t
            w = t.slots.get(key, -1)  # (empty once closed)
            if w >= 0:  # a key this process placed: in its room if it fits
                if vraw is not None and overwrite(t, key, w, vkind, vraw):
                    return
            else:
                if tk is str:
                    kkind, kb = K_STR, key.encode("utf-8", "surrogatepass")
                else:
                    kkind, kb = encode_key(key)
                h = _crc32(kb, kkind)
                if self._closed:
                    self._check_open()
                if insert(t, key, kkind, kb, h, vkind, vinl, vraw):
                    return
                t.set(key, kkind, kb, h, vkind, vinl, vraw)
                return
            kkind, kb = encode_key(key)
            if self._closed:
                self._check_open()
            t.set(key, kkind, kb, _crc32(kb, kkind), vkind, vinl, vraw)
            return
        if tk is not str or self._declared is not None:
            key = self._check_key(key)
        if self._vt is not None:
            value = self._vt.coerce(value)
            tv = type(value)
            if (tv is int and _INT64_MIN <= value <= _INT64_MAX
                    and store_number(self._t, key, V_INT, value, None, None)):
                return
            if tv is float and store_number(self._t, key, V_FLOAT, f2i(value), None, None):
                return
        if tv is str:  # (encode_value's first case, without the call)
            vkind, vinl, vraw = V_STR, 0, value.encode("utf-8", "surrogatepass")
        else:
            vkind, vinl, vraw = encode_value(value)
        if type(key) is str:
            kkind, kb = K_STR, key.encode("utf-8", "surrogatepass")
        else:
            kkind, kb = encode_key(key)
        h = _crc32(kb, kkind)
        if self._closed:
            self._check_open()
        t = self._t
        if not write_flat(t, key, kkind, kb, h, vkind, vinl, vraw):
            t.set(key, kkind, kb, h, vkind, vinl, vraw)

    def _contended(self, rc: int) -> bool:
        """The hot path's ``trylock()`` returned ``rc``: True once the lock is held; False
        sends it to the general path (which repairs after a dead holder)."""
        got = self._t.lock.contended(rc, self._config.timeout)
        if got is None:
            raise self._t.timed_out()  # (the general path must not wait a second timeout)
        return got

    def __delitem__(self, key: Any) -> None:
        if self._remove(key, False) is ABSENT:
            raise KeyError(key)

    def pop(self, key: Any, default: Any = MISSING) -> Any:
        try:
            value = self._remove(key, True)
        except KeyError:  # (an undeclared key)
            if default is MISSING:
                raise
            return default
        if value is ABSENT:
            if default is MISSING:
                raise KeyError(key)
            return default
        return value

    def _remove(self, key: Any, want: bool) -> Any:
        """Delete ``key`` in one locked step: its value with ``want``; ``ABSENT`` if none."""
        tk = type(key)
        if self._declared is None and (tk is str or tk is bytes or tk is int):
            w = self._t.slots.get(key, -1)  # a key this process placed: no encoding, no probe
            if w >= 0:
                got = remove_flat(self._t, key, 0, b"", 0, want, w)
                if got is not NOT_FLAT:
                    return got
        if tk is str and self._declared is None:
            kkind, kb = K_STR, key.encode("utf-8", "surrogatepass")
        else:
            key = self._check_key(key)
            kkind, kb = encode_key(key)
        h = _crc32(kb, kkind)
        if self._closed:
            self._check_open()
        t = self._t
        got = remove_flat(t, key, kkind, kb, h, want)
        if got is not NOT_FLAT:
            return got
        t.enter()
        try:
            return t.remove(key, kkind, kb, h, want)
        finally:
            t.leave()

    def _update_items(self, items: list[tuple[Any, Any]]) -> None:
        if len(items) > numeric.SMALL_BATCH and numeric.update_in_numpy(self, items):
            return
        encoded = []
        for key, value in items:
            kkind, kb = encode_key(key)
            encoded.append((key, kkind, kb, _crc32(kb, kkind), *encode_value(value)))
        t = self._wlocked()
        try:
            t.put_many(encoded)
        finally:
            t.leave()

    def clear(self) -> None:
        t = self._wlocked()
        try:
            t.rebuild(empty=True)
        finally:
            t.leave()

    def incr(self, key: Any, delta: Any = 1, default: Any = 0) -> Any:
        if type(key) is not str or self._declared is not None:
            key = self._check_key(key)
        _check_number("delta", delta)
        new = store_number(self._t, key, 0, 0, delta, self._vt)
        if new is not False:
            return new
        kkind, kb = encode_key(key)
        h = _crc32(kb, kkind)
        if self._closed:
            self._check_open()
        t = self._t
        t.enter()
        try:
            found, current = self._read_locked(key, kkind, kb, h)
            new = _add(key, current if found else self._coerce(default), delta)
            if self._vt is not None:
                new = self._vt.coerce(new)
            t.write_one(key, kkind, kb, h, *encode_value(new))
            return new
        finally:
            t.leave()

    # ------------------------------------------------------------------ numeric bulk access

    def values_array(self) -> Any:
        """A numpy copy of every value, in iteration order (needs a numeric ``value_type``)."""
        return numeric.values_array(self)

    def keys_list(self) -> list[Any]:
        """Every key in iteration order (the order of :meth:`values_array`)."""
        return self._live_keys_values(values=False)[0]

    def get_many(self, keys: Any, default: Any = MISSING) -> Any:
        """Values of many keys as a numpy array, read under one lock, in numpy.

        ``keys`` is a sequence, or a numpy integer array. A missing key raises
        ``KeyError`` unless ``default`` is given.
        """
        return numeric.get_many(self, keys, default)

    def set_many(self, keys: Any, values: Any) -> None:
        """Set many keys from a sequence or numpy array of values, in one atomic step.

        ``keys`` is a sequence, or a numpy integer array. Beyond a few hundred keys the
        table is rebuilt with the changes applied, in numpy, and switched to at once.
        """
        numeric.set_many(self, keys, values)

    # ------------------------------------------------------------------ diagnostics

    def verify(self) -> list[str]:
        """Check the table's integrity under the lock (repairing first); the problems found."""
        from .diagnostics import verify

        self._check_open()
        return verify(self._t)

    def info(self) -> dict[str, Any]:
        """Segment sizes and table statistics (for ``shareit inspect`` and benchmarks)."""
        from .diagnostics import info

        self._check_open()
        return info(self._t)
