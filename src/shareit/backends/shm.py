"""The ``shm`` backend: a crash-safe hash table in shared memory. The default.

Features
--------
- No server: every process maps the table (``NAME@ctl`` and ``NAME@gN`` in the
  user's private runtime dir, ``/dev/shm/shareit-UID``, mode 0600) and reads it
  directly. Keys: str, bytes, int and tuples of these,
  hashed with CRC-32 of a canonical encoding (the same in every interpreter;
  never ``hash()``), full key stored. Values: any picklable object; ints,
  floats, str, bytes, None and bools are stored unboxed.
- ``value_type="float64"`` (or ``int64``, ...): numeric values inline, and
  bulk numeric access through numpy with one lock: :meth:`ShmMapping.get_many`,
  :meth:`ShmMapping.set_many`, :meth:`ShmMapping.values_array`.
- Reads never take or wait for the writer lock, and never see a write that
  has not committed: a version per entry, a transaction word, and, while a
  writer (running, stopped or dead) is inside a transaction, its undo
  journal's pre-images laid over the data (``_shm_read``). Snapshots,
  iteration and ``len`` validate one numpy copy the same way. A process
  caches what it read and re-validates with one word per read, so a repeated
  read costs a few hundred nanoseconds.
- Writers take a robust, process-shared pthread mutex in the control segment
  (futex-based; ``flock`` where robust mutexes are missing): when its holder
  dies the next writer gets it, rolls back the dead writer's undo journal and
  goes on, so every key holds its old or its new value.
- Grows without limit: a full table, or one that is mostly deleted entries or
  dead heap bytes, is rebuilt into a new generation segment that attached
  processes follow; ``capacity`` is only the starting size.
- The owner's ``close()`` or exit removes the segments unless ``persist=True``.
- A handle holds no file descriptor (the ``flock`` fallback keeps one per
  process and segment), and a handle dropped without ``close()`` unmaps its
  segments when it is garbage collected: a worker may receive any number of
  handles. Segments are allocated in full when created, so a full runtime dir
  raises :class:`~shareit.errors.CapacityError` instead of SIGBUS; a
  generation's heap is sized from the live bytes (1.5x), and a process caches at
  most ``CACHE_BYTES`` of the values it read.

Configuration
-------------
``shareit.open("feats", backend="shm", value_type="float64", capacity=100_000)``;
in ``shareit.toml``::

    [mappings.feats]
    backend = "shm"
    value_type = "float64"

or ``SHAREIT_BACKEND=shm``. Lock-free reads rely on x86-64 store and load
ordering; on other machines single-key reads take the lock.
"""

from __future__ import annotations

import os
import platform
import weakref
from collections.abc import Iterator
from typing import Any

from .. import _runtime
from .._locks import RobustMutex, robust_mutex_available
from ..base import Capabilities, SharedMapping, _add, _check_number
from ..config import Config
from ..errors import BackendDiedError, ClosedError, ConfigError, NotFoundError
from . import _shm_layout as L
from ._shm_bulk import SMALL_BATCH, ShmBulk
from ._shm_layout import (
    C_GROW,
    C_GSEQ,
    C_JSTATE,
    C_STAMP,
    C_TSEQ,
    J_INLINE,
    LIVE,
    V_FLOAT,
    V_INT,
    _f2i,
    _i2f,
)
from ._shm_read import ShmReader
from ._shm_segments import Maps as _Maps
from ._shm_segments import flock_drop as _flock_drop
from ._shm_segments import flock_get as _flock_get
from ._shm_segments import release as _release
from ._shm_write import ShmWriter

_loads = __import__("pickle").loads
_LIVE_KIND = L.LIVE | 0xFF
_LIVE_INT, _LIVE_FLOAT = L.LIVE | V_INT, L.LIVE | V_FLOAT
_live: weakref.WeakValueDictionary[int, ShmMapping] = weakref.WeakValueDictionary()


def _after_fork_in_child() -> None:
    # The fast write path trusts its key -> entry cache to mean "this process's lock
    # is set up"; in a child it is not (a flock descriptor would be the parent's).
    for m in list(_live.values()):
        m._slots = {}


os.register_at_fork(after_in_child=_after_fork_in_child)
_crc32 = __import__("zlib").crc32
_LOCKFREE_READS = platform.machine() in ("x86_64", "AMD64", "i686", "i386")



class _ClosedCache(dict):
    def __missing__(self, key: Any) -> Any:
        raise ClosedError("this shm mapping is closed in this process; open it again by name")


class ShmMapping(ShmReader, ShmWriter, ShmBulk, SharedMapping):
    """A hash table in shared memory; reads without locks, crash-safe writes."""

    backend = "shm"
    capabilities = Capabilities(
        attach_by_name=True,
        key_types=(str, bytes, int, tuple),
        ordered=True,
        notes="no server; lock-free reads; flock + undo journal for writes",
    )

    def __init__(self, name: str | None, config: Config, seg: str, cmm: Any):
        super().__init__(name, config)
        self._seg = seg
        self._cmm = cmm
        self._cmv = L.bytes_view(cmm)
        self._c = self._cmv.cast("Q")
        self._maps = _Maps(cmm, self._cmv, self._c)
        self._finalizer = weakref.finalize(self, _release, self._maps)
        self._finalizer.atexit = False  # at exit an owner still destroys through its maps
        self._g: L.Generation | None = None
        self._gen = -1
        self._epoch = -1
        self._q: Any = None
        self._cache: dict = {}
        self._cache_bytes = 0  # of the heap values in _cache (``_remember``)
        self._slots: dict = {}
        self._mutex: Any = None
        self._depth = 0
        self._lock_forkgen = -1
        _live[id(self)] = self
        self._plain = self._declared is None and self._vt is None  # d[k] = number may go fast
        self._journaling = True
        self._saved_header = False
        self._over: tuple | None = None  # the journal overlay last built (``_shm_read``)
        self._map_current()

    # ------------------------------------------------------------------ segments

    @classmethod
    def _create(cls, name: str | None, config: Config) -> ShmMapping:
        seg = name if name is not None else _runtime.anon_stem()
        for path in [L.ctrl_path(seg)] + L.data_segments(seg):  # left by a dead owner
            L.unlink_quiet(path)
        cmm = L.create_file(L.ctrl_path(seg), L.CTRL_SIZE)
        c = L.bytes_view(cmm).cast("Q")
        try:
            L.Generation.create(seg, 1, config.capacity or 8, (config.capacity or 8) * 16).close()
            if robust_mutex_available():
                RobustMutex.init(cmm, L.MUTEX_OFFSET)
                c[L.C_LOCKKIND] = L.LOCK_ROBUST
            else:
                c[L.C_LOCKKIND] = L.LOCK_FLOCK
            c[L.C_LAYOUT], c[L.C_GEN], c[L.C_GSEQ], c[L.C_MAGIC] = L.LAYOUT, 1, 2, L.MAGIC
            c.release()
            self = cls(name, config, seg, cmm)
        except BaseException:
            L.release_quietly(c)
            L.unmap(cmm)
            del c, cmm  # (the traceback keeps this frame: it must not keep the mapping)
            for path in [L.ctrl_path(seg)] + L.data_segments(seg):
                L.unlink_quiet(path)
            raise
        if name is not None:
            self._publish()
        return self

    @classmethod
    def _attach_seg(cls, name: str | None, config: Config, seg: str) -> ShmMapping:
        try:
            cmm = L.open_file(L.ctrl_path(seg))
        except FileNotFoundError:
            raise NotFoundError(f"shm mapping {name or seg!r} no longer exists") from None
        c = L.bytes_view(cmm).cast("Q")
        ok = len(cmm) == L.CTRL_SIZE and c[L.C_MAGIC] == L.MAGIC and c[L.C_LAYOUT] == L.LAYOUT
        c.release()
        try:
            if not ok:
                raise ConfigError(f"segment of {name or seg!r} has an unknown layout")
            return cls(name, config, seg, cmm)
        except BaseException:
            L.unmap(cmm)  # (a handle made before the failure unmaps through its finalizer)
            raise

    @classmethod
    def _attach_record(cls, name: str, config: Config, record: dict) -> ShmMapping:
        return cls._attach_seg(name, config, name)  # paths follow from the name, never a record

    @classmethod
    def _cleanup_record(cls, name: str, record: dict) -> None:
        for path in [L.ctrl_path(name)] + L.data_segments(name):
            L.unlink_quiet(path)

    def _handle(self) -> tuple:
        return (self._name, self._config, self._seg)

    @classmethod
    def _from_handle(cls, handle: tuple) -> ShmMapping:
        name, config, seg = handle
        _runtime.check_stem(seg)
        try:
            return cls._attach_seg(name, config, seg)
        except NotFoundError as exc:
            raise BackendDiedError(str(exc)) from None

    def _map_current(self, want: int | None = None) -> None:
        """Map the generation the control segment names (following growth), or ``want``."""
        for _ in range(1000):
            gen = self._c[L.C_GEN] if want is None else want
            if gen == L.DESTROYED or self._c[L.C_GEN] == L.DESTROYED:
                raise self._died()
            if self._g is not None and self._g.gen == gen:
                return
            try:
                g = L.Generation.open(self._seg, gen)
            except FileNotFoundError:
                if want is not None:
                    return  # replaced meanwhile: the caller reads the epoch again
                continue  # replaced by a newer generation meanwhile
            if self._g is not None:
                self._g.close()
            self._g, self._gen, self._epoch, self._q = g, gen, gen * 2, g.q
            self._maps.g = g
            self._forget()
            return
        raise self._died()

    def _died(self) -> BackendDiedError:
        return BackendDiedError(
            f"shm mapping {self._label()} was destroyed by another process; open it again"
        )

    def _forget(self) -> None:
        """Drop what this process cached of the current generation."""
        self._cache.clear()
        self._cache_bytes = 0
        self._slots.clear()

    def _close(self) -> None:
        self._g = None
        self._cache = _ClosedCache()
        self._cache_bytes = 0
        self._slots = {}
        self._mutex = None
        self._finalizer()  # unmaps (once), as it would if the handle were dropped
        self._cmm = self._cmv = self._c = self._q = None  # (a closed handle pins nothing)

    def _destroy(self) -> None:
        self._c[L.C_GEN] = L.DESTROYED
        self._c[L.C_GSEQ] = 1  # odd: no reader's epoch matches any more
        for path in [L.ctrl_path(self._seg)] + L.data_segments(self._seg):
            L.unlink_quiet(path)
        if self._name is not None:
            _runtime.remove_meta(self._name)
        self._close()

    # ------------------------------------------------------------------ the writer lock

    def _lock_acquire(self, timeout: float) -> bool:
        if self._lock_forkgen != _runtime.fork_generation:
            self._reinit_lock()
        if not self._mutex.acquire(timeout):
            return False
        self._depth += 1  # only the holding thread changes it
        if self._depth == 1:
            try:
                self._after_acquire()  # repairs whatever a dead writer left
            except BaseException:
                self._lock_release()
                raise
        return True

    def _lock_release(self) -> None:
        self._depth -= 1
        self._mutex.release()

    def _reinit_lock(self) -> None:
        # First use, or a forked child: the robust mutex is shared memory and works as
        # is, but the depth count is the parent's, and a flock descriptor must be our own.
        if self._c[L.C_LOCKKIND] == L.LOCK_ROBUST:
            self._mutex = RobustMutex(self._cmm, L.MUTEX_OFFSET)
        else:
            if self._maps.flock is not None:  # the one of before a fork (the parent's: kept)
                _flock_drop(self._maps.flock)
                self._maps.flock = None
            try:
                self._mutex, self._maps.flock = _flock_get(L.ctrl_path(self._seg))
            except FileNotFoundError:
                raise self._died() from None
        self._trylock, self._unlock = self._mutex.trylock, self._mutex.unlock  # (hot path)
        self._depth = 0
        self._lock_forkgen = _runtime.fork_generation

    def _wlock(self) -> None:
        self._check_open()
        if not self._lock_acquire(self._config.timeout):
            from ..errors import LockTimeoutError

            raise LockTimeoutError(
                f"could not lock shm mapping {self._label()} within {self._config.timeout:g} s; "
                f"another process holds lock(). Pass a larger timeout"
            )

    def _after_acquire(self) -> None:
        c = self._c
        if c[L.C_GEN] == L.DESTROYED:
            raise self._died()
        if c[L.C_JSTATE] or c[L.C_GROW] or c[L.C_GSEQ] != c[L.C_GEN] * 2 or c[C_TSEQ] & 1:
            self._recover()
        if c[L.C_GEN] != self._gen:
            self._map_current()
        c[L.C_WRITER] = os.getpid()

    # ------------------------------------------------------------------ write transactions

    # ------------------------------------------------------------------ table primitives

    # ------------------------------------------------------------------ growth

    # ------------------------------------------------------------------ reads

    def _read(self, key: Any) -> tuple:
        """(found, value) of the last committed state, read without the lock (``_shm_read``)."""
        kkind, kb = L.encode_key(key)
        h = _crc32(kb, kkind)
        if _LOCKFREE_READS:
            return self._read_lockfree(key, kkind, kb, h)
        self._wlock()
        try:
            return self._read_entry_locked(key, kkind, kb, h)
        finally:
            self._lock_release()

    def _read_entry(self, key: Any, kkind: int, kb: bytes, h: int) -> tuple | None:
        """One direct read attempt: ``(found, value[, w, ver, kind, raw])``, the long form
        for a value that may be cached once the caller has validated the read; None: retry."""
        g = self._g
        e, _ = self._find(g, kkind, kb, h)
        if e < 0:
            return (False, None)
        w = g.ew + e * 4
        ver = g.q[w]
        meta = g.u32[w * 2 + 5]
        kind = meta & 0xFF
        if ver & 1:
            # only an inline numeric write in flight (or stopped) may be read as is: its
            # one aligned word holds the old or the new value, and the kind stays
            if self._c[C_JSTATE] != (w << 2) | J_INLINE or not meta & L.LIVE \
                    or kind not in (V_INT, V_FLOAT):
                return None
            return (True, L.decode_value(kind, g.qs[w + 3], None))
        inline = g.qs[w + 3]
        raw = None
        if kind in L.HEAP_KINDS:
            start = g.hoff + (inline & 0xFFFFFFFF) * 8
            raw = bytes(g.mv[start : start + (inline >> 32)])
        if g.q[w] != ver or not meta & L.LIVE:
            return None
        return (True, L.decode_value(kind, inline, raw), w, ver, kind, raw)

    def _remember(self, key: Any, got: tuple) -> None:
        """Cache a validated read (and the key's entry, for the fast write path)."""
        _, value, w, ver, kind, raw = got
        kt = type(key)
        if kt is tuple:  # never cached: (1,) == (1.0,), and the float one is no valid key
            return
        if self._lock_forkgen == _runtime.fork_generation:  # (the fast write path's key)
            if len(self._slots) >= L.CACHE_MAX:
                self._slots.clear()
            self._slots[key] = w
        cache = self._cache
        size = len(raw) if raw is not None else 0
        if size > L.CACHE_VALUE_MAX:
            cache.pop(key, None)  # (an older, smaller value of it must not stay cached)
            return
        old = cache.get(key)
        if old is not None:
            self._cache_bytes -= old[5]
        elif len(cache) >= L.CACHE_MAX:
            self._evict(cache, L.CACHE_MAX // 8)
        self._cache_bytes += size
        if self._cache_bytes > L.CACHE_BYTES:
            self._evict(cache, 0)
        # A hit must be of the same type: 1 == 1.0 == True, but only 1 is a valid key.
        if kind in L.IMMUTABLE_KINDS:
            cache[key] = (w, ver, value, True, kt, size)
        else:
            cache[key] = (w, ver, raw, False, kt, size)

    def _evict(self, cache: dict, want: int) -> None:
        """Drop the oldest cached reads: ``want`` of them, and more until the cached bytes
        are within three quarters of ``CACHE_BYTES`` (FIFO: a hit costs no bookkeeping)."""
        target = L.CACHE_BYTES * 3 // 4
        freed, victims = 0, []
        try:
            for k, hit in cache.items():  # insertion order: the oldest first
                if len(victims) >= want and self._cache_bytes - freed <= target:
                    break
                victims.append(k)
                freed += hit[5]
        except RuntimeError:  # another thread of ours changed it meanwhile: start afresh
            cache.clear()
            self._cache_bytes = 0
            return
        for k in victims:
            cache.pop(k, None)
        self._cache_bytes = max(0, self._cache_bytes - freed)

    # ------------------------------------------------------------------ the five

    def __getitem__(self, key: Any) -> Any:
        hit = self._cache.get(key)
        if (hit is not None and hit[4] is type(key) and self._c[C_GSEQ] == self._epoch
                and self._q[hit[0]] == hit[1]):
            return hit[2] if hit[3] else _loads(hit[2])
        self._check_open()
        found, value = self._read(self._check_key(key))
        if not found:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        t = type(value)
        if (t is int or t is float) and (type(key) is str or type(key) is int):
            w = self._slots.get(key, -1) if self._plain else -1  # (1.0 or True: not here)
            if w >= 0:  # the hot path, inline: see _fast_store, which it repeats for speed
                if t is float:
                    want, inline = _LIVE_FLOAT, _f2i(value)
                elif -0x8000000000000000 <= value <= 0x7FFFFFFFFFFFFFFF:
                    want, inline = _LIVE_INT, value
                else:
                    want = 0
                m = self._mutex
                rc = self._trylock() if want else 1
                if not rc or (want and self._fast_contended(m, rc)):
                    try:
                        c = self._c
                        g = self._g
                        if (c[C_GSEQ] == self._epoch and not c[C_JSTATE] and not c[C_GROW]
                                and g.u32[w * 2 + 5] & _LIVE_KIND == want):
                            if L.FAULT:
                                self._store_inline(c, g, w, inline)
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
                        self._unlock()
        if type(key) is not str or self._declared is not None:
            key = self._check_key(key)
        if self._vt is not None:
            value = self._vt.coerce(value)
            t = type(value)
            if (t is int and -0x8000000000000000 <= value <= 0x7FFFFFFFFFFFFFFF
                    and self._fast_store(key, V_INT, value, None)):
                return
            if t is float and self._fast_store(key, V_FLOAT, _f2i(value), None):
                return
        vkind, vinl, vraw = L.encode_value(value)
        kkind, kb = L.encode_key(key)
        h = _crc32(kb, kkind)
        self._wlock()
        try:
            self._write_one(key, kkind, kb, h, vkind, vinl, vraw)
        finally:
            self._lock_release()

    def _fast_store(self, key: Any, kind: int, inline: int, delta: Any) -> Any:
        """The hot path of ``d[k] = number`` and ``incr``: the key's entry in this
        generation holds a number inline and gets another of the same kind in place.

        Only one aligned 8-byte word changes, which is atomic, so no undo journal
        is needed: the entry is marked in flight (``J_INLINE``), and a writer
        killed here leaves the old or the new value with an odd version, which
        the next writer makes even again. Returns False, having changed nothing,
        whenever anything is unusual (key not yet placed, repair pending, growth,
        a kind change, another thread inside ``lock()``) and the caller takes the
        general path. With ``delta`` (``incr``), adds it and returns the new value.
        """
        w = self._slots.get(key, -1)  # filled only once this process's lock is set up
        if w < 0:
            return False
        m = self._mutex
        rc = m.trylock()
        if rc and not self._fast_contended(m, rc):
            return False
        try:
            c = self._c
            if c[C_GSEQ] != self._epoch or c[C_JSTATE] or c[C_GROW]:
                return False
            g = self._g
            meta = g.u32[w * 2 + 5]
            qs = g.qs
            if delta is not None:  # incr: the new value from the current one
                old_kind = meta & 0xFF
                if old_kind == V_INT:
                    new = qs[w + 3] + delta
                elif old_kind == V_FLOAT:
                    new = _i2f(qs[w + 3]) + delta
                else:
                    return False
                if self._vt is not None:
                    new = self._vt.coerce(new)
                if type(new) is int and -0x8000000000000000 <= new <= 0x7FFFFFFFFFFFFFFF:
                    kind, inline = V_INT, new
                elif type(new) is float:
                    kind, inline = V_FLOAT, _f2i(new)
                else:
                    return False
            if meta & _LIVE_KIND != LIVE | kind:
                return False
            self._store_inline(c, g, w, inline)
        finally:
            m.unlock()
        return True if delta is None else new

    def _store_inline(self, c: Any, g: Any, w: int, inline: int) -> None:
        """With the lock held: one inline value word of entry ``w`` changes in place."""
        c[C_JSTATE] = (w << 2) | J_INLINE
        stamp = c[C_STAMP] + 1
        c[C_STAMP] = stamp
        q = g.q
        q[w] = 2 * stamp + 1
        if L.FAULT:
            L.fault("mid_entry")
        g.qs[w + 3] = inline
        q[w] = 2 * stamp + 2
        if L.FAULT:
            L.fault("before_commit")
        c[C_JSTATE] = 0

    def _fast_contended(self, m: Any, rc: int) -> bool:
        """``trylock()`` did not simply get the lock: wait for it; False sends the caller to
        the general path (which repairs after a dead holder). A timeout raises here: the
        general path must not wait a second ``timeout``."""
        if rc == 130:  # the last holder died
            m.make_consistent()
            m.unlock()
            return False
        got = m.acquire(self._config.timeout)
        if got is True:
            return True
        if got:  # held now, after a dead holder: unlock, and the general path repairs
            m.unlock()
            return False
        from ..errors import LockTimeoutError

        raise LockTimeoutError(
            f"could not lock shm mapping {self._label()} within {self._config.timeout:g} s; "
            f"another process holds lock(). Pass a larger timeout"
        )

    def _write_one(self, key: Any, kkind: int, kb: bytes, h: int, vkind: int, vinl: int,
                   vraw: bytes | None) -> None:
        for attempt in range(3):
            self._begin()
            try:
                self._put(key, kkind, kb, h, vkind, vinl, vraw)
            except L.Grow:
                self._abort()
                words = (len(kb) + 7) // 8 + (len(vraw or b"") + 7) // 8
                self._rebuild(extra_entries=1, extra_heap=words * 8 + 8)
                continue
            except BaseException:
                self._abort()
                raise
            self._commit()
            return
        raise AssertionError("shm: no room after growing")  # pragma: no cover

    def __delitem__(self, key: Any) -> None:
        key = self._check_key(key)
        kkind, kb = L.encode_key(key)
        h = _crc32(kb, kkind)
        self._wlock()
        try:
            g = self._g
            e, slot = self._find(g, kkind, kb, h)
            if e < 0:
                raise KeyError(key)
            self._begin()
            try:
                self._delete(g, e, slot)
            except BaseException:
                self._abort()
                raise
            self._commit()
            self._slots.pop(key, None)
            self._maybe_compact()
        finally:
            self._lock_release()

    def __len__(self) -> int:
        self._check_open()
        return self._len_lockfree()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._live_keys_values(values=False)[0])

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

    # ------------------------------------------------------------------ bulk

    def _live_keys_values(self, values: bool = True) -> tuple[list, list]:
        """Keys (and values) of every live entry, in order, from one consistent copy."""
        from ._shm_rebuild import decode_keys, decode_values

        self._check_open()
        ents, heap, int_keys = self._consistent_copy()
        keys = int_keys.tolist() if int_keys is not None else decode_keys(ents, heap)
        vals = decode_values(ents, heap, self._vt) if values else []
        return keys, vals

    def snapshot(self) -> dict:
        keys, vals = self._live_keys_values()
        return dict(zip(keys, vals))

    def _update_items(self, items: list[tuple[Any, Any]]) -> None:
        if len(items) > SMALL_BATCH and self._update_in_numpy(items):
            return
        encoded = []
        for key, value in items:
            kkind, kb = L.encode_key(key)
            encoded.append((key, kkind, kb, _crc32(kb, kkind), *L.encode_value(value)))
        self._wlock()
        try:
            self._put_many(encoded)
        finally:
            self._lock_release()

    def clear(self) -> None:
        self._wlock()
        try:
            self._rebuild(empty=True)
        finally:
            self._lock_release()

    # ------------------------------------------------------------------ atomic operations

    def incr(self, key: Any, delta: Any = 1, default: Any = 0) -> Any:
        if type(key) is not str or self._declared is not None:
            key = self._check_key(key)
        _check_number("delta", delta)
        new = self._fast_store(key, 0, 0, delta)
        if new is not False:
            return new
        kkind, kb = L.encode_key(key)
        h = _crc32(kb, kkind)
        self._wlock()
        try:
            found, current = self._read_entry_locked(key, kkind, kb, h)
            new = _add(key, current if found else self._coerce(default), delta)
            if self._vt is not None:
                new = self._vt.coerce(new)
            self._write_one(key, kkind, kb, h, *L.encode_value(new))
            return new
        finally:
            self._lock_release()

    def _read_entry_locked(self, key: Any, kkind: int, kb: bytes, h: int) -> tuple:
        got = self._read_entry(key, kkind, kb, h)
        assert got is not None, "an entry is never mid-write while the writer lock is held"
        if len(got) > 2:
            self._remember(key, got)  # committed: the lock is held and no transaction is open
        return got[0], got[1]

    # ------------------------------------------------------------------ numeric bulk access
