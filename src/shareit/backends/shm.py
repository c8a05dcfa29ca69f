"""The ``shm`` backend: a crash-safe hash table in shared memory. The default.

Features
--------
- No server: every process maps the table (``/dev/shm/shareit-NAME*``, mode
  0600) and reads it directly. Keys: str, bytes, int and tuples of these,
  hashed with CRC-32 of a canonical encoding (the same in every interpreter;
  never ``hash()``), full key stored. Values: any picklable object; ints,
  floats, str, bytes, None and bools are stored unboxed.
- ``value_type="float64"`` (or ``int64``, ...): numeric values inline, and
  bulk numeric access through numpy with one lock: :meth:`ShmMapping.get_many`,
  :meth:`ShmMapping.set_many`, :meth:`ShmMapping.values_array`.
- Reads take no lock: a global seqlock and a version per entry; a reader that
  keeps losing to writers falls back to the lock after a bounded number of
  tries. A process caches what it read and re-validates with one word per
  read, so a repeated read costs a few hundred nanoseconds.
- Writers take a robust, process-shared pthread mutex in the control segment
  (futex-based; ``flock`` where robust mutexes are missing): when its holder
  dies the next writer gets it, rolls back the dead writer's undo journal and
  goes on, so every key holds its old or its new value.
- Grows without limit: a full table, or one that is mostly deleted entries or
  dead heap bytes, is rebuilt into a new generation segment that attached
  processes follow; ``capacity`` is only the starting size.
- The owner's ``close()`` or exit removes the segments unless ``persist=True``.

Configuration
-------------
``shareit.open("feats", backend="shm", value_type="float64", capacity=100_000)``;
in ``shareit.toml``::

    [mappings.feats]
    backend = "shm"
    value_type = "float64"

or ``SHAREIT_BACKEND=shm``. The seqlock relies on x86-64 store and load
ordering; on other machines reads take the lock.
"""

from __future__ import annotations

import fcntl
import os
import platform
import secrets
import signal
import time
from typing import Any, Iterator

import numpy as np

from .. import _runtime
from .._locks import FlockMutex, RobustMutex, robust_mutex_available
from ..base import MISSING, Capabilities, SharedMapping, _add, _check_number
from ..config import Config
from ..errors import BackendDiedError, ClosedError, ConfigError, NotFoundError
from . import _shm_layout as L
from ._shm_layout import (
    C_GEN, C_GROW, C_GSEQ, C_JSTATE, C_STAMP, J_INLINE, LIVE, V_FLOAT, V_INT, _f2i, _i2f,
)


_loads = __import__("pickle").loads
_crc32 = __import__("zlib").crc32
_SPINS = 200  # optimistic read attempts before a reader takes the lock
_CACHE_MAX = 1 << 16
_LOCKFREE_READS = platform.machine() in ("x86_64", "AMD64", "i686", "i386")

#: Test-only fault injection: the step name at which a writer SIGKILLs itself.
FAULT: str | None = None


def _fault(step: str) -> None:
    if FAULT == step:
        os.kill(os.getpid(), signal.SIGKILL)


_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Grow(Exception):
    """The current generation has no room: rebuild, then retry."""


class _ClosedCache(dict):
    def __missing__(self, key: Any) -> Any:
        raise ClosedError("this shm mapping is closed in this process; open it again by name")


class ShmMapping(SharedMapping):
    """A hash table in shared memory; reads without locks, crash-safe writes."""

    backend = "shm"
    capabilities = Capabilities(
        attach_by_name=True,
        key_types=(str, bytes, int, tuple),
        ordered=True,
        notes="no server; lock-free reads; flock + undo journal for writes",
    )

    def __init__(self, name: str | None, config: Config, seg: str, cfd: int, cmm: Any):
        super().__init__(name, config)
        self._seg = seg
        self._cfd, self._cmm = cfd, cmm
        self._cmv = memoryview(cmm)
        self._c = self._cmv.cast("Q")
        self._g: L.Generation | None = None
        self._gen = -1
        self._epoch = -1
        self._q: Any = None
        self._cache: dict = {}
        self._slots: dict = {}
        self._mutex: Any = None
        self._depth = 0
        self._lock_forkgen = -1
        self._journaling = True
        self._saved_header = False
        self._map_current()

    # ------------------------------------------------------------------ segments

    @classmethod
    def _create(cls, name: str | None, config: Config) -> "ShmMapping":
        seg = name if name is not None else f"anon-{os.getpid()}-{secrets.token_hex(5)}"
        for path in [L.ctrl_path(seg)] + L.data_segments(seg):  # left by a dead owner
            L.unlink_quiet(path)
        cfd, cmm = L.create_file(L.ctrl_path(seg), L.CTRL_SIZE)
        try:
            c = memoryview(cmm).cast("Q")
            L.Generation.create(seg, 1, config.capacity or 8, (config.capacity or 8) * 16).close()
            if robust_mutex_available():
                RobustMutex.init(cmm, L.MUTEX_OFFSET)
                c[L.C_LOCKKIND] = L.LOCK_ROBUST
            else:
                c[L.C_LOCKKIND] = L.LOCK_FLOCK
            c[L.C_LAYOUT], c[L.C_GEN], c[L.C_GSEQ], c[L.C_MAGIC] = L.LAYOUT, 1, 2, L.MAGIC
            c.release()
            self = cls(name, config, seg, cfd, cmm)
        except BaseException:
            os.close(cfd)
            for path in [L.ctrl_path(seg)] + L.data_segments(seg):
                L.unlink_quiet(path)
            raise
        if name is not None:
            self._publish(segment=seg, layout=L.LAYOUT)
        return self

    @classmethod
    def _attach_seg(cls, name: str | None, config: Config, seg: str) -> "ShmMapping":
        try:
            cfd, cmm = L.open_file(L.ctrl_path(seg))
        except FileNotFoundError:
            raise NotFoundError(f"shm mapping {name or seg!r} no longer exists") from None
        c = memoryview(cmm).cast("Q")
        ok = c[L.C_MAGIC] == L.MAGIC and c[L.C_LAYOUT] == L.LAYOUT
        c.release()
        if not ok:
            os.close(cfd)
            raise ConfigError(f"segment of {name or seg!r} has an unknown layout")
        return cls(name, config, seg, cfd, cmm)

    @classmethod
    def _attach_record(cls, name: str, config: Config, record: dict) -> "ShmMapping":
        return cls._attach_seg(name, config, record.get("segment", name))

    @classmethod
    def _cleanup_record(cls, name: str, record: dict) -> None:
        seg = record.get("segment", name)
        for path in [L.ctrl_path(seg)] + L.data_segments(seg):
            L.unlink_quiet(path)

    def _handle(self) -> tuple:
        return (self._name, self._config, self._seg)

    @classmethod
    def _from_handle(cls, handle: tuple) -> "ShmMapping":
        name, config, seg = handle
        try:
            return cls._attach_seg(name, config, seg)
        except NotFoundError as exc:
            raise BackendDiedError(str(exc)) from None

    def _map_current(self) -> None:
        """Map the generation the control segment names (following growth)."""
        for _ in range(1000):
            gen = self._c[L.C_GEN]
            if gen == L.DESTROYED:
                raise self._died()
            if self._g is not None and self._g.gen == gen:
                return
            try:
                g = L.Generation.open(self._seg, gen)
            except FileNotFoundError:
                continue  # replaced by a newer generation meanwhile
            if self._g is not None:
                self._g.close()
            self._g, self._gen, self._epoch, self._q = g, gen, gen * 2, g.q
            self._cache.clear()
            self._slots.clear()
            return
        raise self._died()

    def _died(self) -> BackendDiedError:
        return BackendDiedError(
            f"shm mapping {self._label()} was destroyed by another process; open it again"
        )

    def _close(self) -> None:
        if self._g is not None:
            self._g.close()
            self._g = None
        self._cache = _ClosedCache()
        self._slots = {}
        self._c.release()
        self._cmv.release()
        if isinstance(self._mutex, FlockMutex) and self._lock_forkgen == _fork_generation:
            self._mutex.close()
        self._mutex = None  # the robust mutex holds no buffer export: the mmap can close
        self._cmm.close()
        os.close(self._cfd)

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
        if self._lock_forkgen != _fork_generation:
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
            try:
                self._mutex = FlockMutex(L.ctrl_path(self._seg))
            except FileNotFoundError:
                raise self._died() from None
        self._depth = 0
        self._lock_forkgen = _fork_generation

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
        if c[L.C_JSTATE] or c[L.C_GROW] or c[L.C_GSEQ] != c[L.C_GEN] * 2:
            self._recover()
        if c[L.C_GEN] != self._gen:
            self._map_current()
        c[L.C_WRITER] = os.getpid()

    def _recover(self) -> None:
        """Repair what a writer killed mid-write left: roll back its journal, finish growth."""
        c = self._c
        target = c[L.C_GROW]
        if target:
            if c[L.C_GEN] == target:  # switched; the old generation may still be linked
                for path in L.data_segments(self._seg):
                    if not path.endswith(f".g{target}"):
                        L.unlink_quiet(path)
            else:  # died while building: the half-built generation is garbage
                L.unlink_quiet(L.data_path(self._seg, target))
            c[L.C_GROW] = 0
        self._map_current()
        if c[L.C_JSTATE] == L.J_JOURNAL:  # (J_INLINE carries the entry's word offset)
            self._rollback()
        elif c[L.C_JSTATE] & 3 == L.J_INLINE:  # one value word, old or new: end the write
            w = c[L.C_JSTATE] >> 2
            if self._g.q[w] & 1:
                stamp = c[L.C_STAMP] + 1
                c[L.C_STAMP] = stamp
                self._g.q[w] = 2 * stamp + 2
        c[L.C_JSTATE] = 0
        c[L.C_GSEQ] = c[L.C_GEN] * 2  # even again, and right after a switch cut short
        self._epoch = c[L.C_GEN] * 2
        self._cache.clear()
        self._slots.clear()

    # ------------------------------------------------------------------ write transactions

    def _begin(self, multi: bool = False) -> None:
        """Open a journaled write; ``multi``: it changes several keys, so readers must wait."""
        c = self._c
        c[L.C_JWORDS] = 0
        c[L.C_JCOUNT] = 0
        if multi:
            c[L.C_GSEQ] += 1  # odd: readers retry until the whole write is done
        c[L.C_JSTATE] = 1
        self._saved_header = False
        _fault("after_begin")

    def _save(self, off: int, nbytes: int) -> None:
        """Journal the bytes [off, off+nbytes) of the data segment before changing them."""
        if not self._journaling:
            return
        c = self._c
        used = c[L.C_JWORDS]
        need = 2 + (nbytes + 7) // 8
        if used + need > L.JOURNAL_WORDS:
            raise _Grow  # a very large transaction: done by rebuilding instead
        w = L.JOURNAL_WORD + used
        c[w], c[w + 1] = off, nbytes
        b = (w + 2) * 8
        self._cmv[b : b + nbytes] = self._g.mv[off : off + nbytes]
        c[L.C_JWORDS] = used + need  # the record counts only once it is complete
        c[L.C_JCOUNT] += 1

    def _save_header(self) -> None:
        if not self._saved_header:
            self._save(0, L.HEADER_BYTES)
            self._saved_header = True

    def _rollback(self) -> None:
        c, g = self._c, self._g
        records, w = [], L.JOURNAL_WORD
        for _ in range(c[L.C_JCOUNT]):
            off, n = c[w], c[w + 1]
            records.append((off, n, (w + 2) * 8))
            w += 2 + (n + 7) // 8
        for off, n, b in reversed(records):
            g.mv[off : off + n] = self._cmv[b : b + n]
        c[L.C_JCOUNT] = 0
        c[L.C_JWORDS] = 0

    def _commit(self) -> None:
        _fault("before_commit")
        c = self._c
        c[L.C_JSTATE] = 0
        if c[L.C_GSEQ] & 1:
            c[L.C_GSEQ] += 1

    def _abort(self) -> None:
        self._rollback()
        self._commit()
        self._cache.clear()
        self._slots.clear()

    # ------------------------------------------------------------------ table primitives

    def _find(self, g: L.Generation, kkind: int, kb: bytes, h: int) -> tuple[int, int]:
        """(entry, index slot) of a key, or (-1, slot where it would go)."""
        isize, i32, u32, mv = g.isize, g.i32, g.u32, g.mv
        ibase, ebase, hoff, klen = L.HEADER_BYTES // 4, g.eoff // 4, g.hoff, len(kb)
        j = h % isize
        free = -1
        for _ in range(isize):
            e = i32[ibase + j]
            if e == L.EMPTY:
                return -1, (j if free < 0 else free)
            if e == L.DELETED:
                if free < 0:
                    free = j
            else:
                u = ebase + e * 8
                if u32[u + 2] == h and u32[u + 3] == klen and (u32[u + 5] >> 8) & 0xFF == kkind:
                    start = hoff + u32[u + 4] * 8
                    if mv[start : start + klen] == kb:
                        return e, j
            j += 1
            if j == isize:
                j = 0
        return -1, free

    def _alloc(self, g: L.Generation, data: bytes) -> int:
        """Append ``data`` to the heap; its offset in words. Header must be journaled."""
        q = g.q
        top = q[L.H_TOP]
        words = (len(data) + 7) // 8
        if top + words > g.heapw:
            raise _Grow
        q[L.H_TOP] = top + words
        b = g.hoff + top * 8
        g.mv[b : b + len(data)] = data
        return top

    def _write_entry(self, g: L.Generation, e: int, h: int, klen: int, koff: int, meta: int,
                     val: int) -> None:
        c = self._c
        stamp = c[L.C_STAMP] + 1
        c[L.C_STAMP] = stamp
        w = g.ew + e * 4
        g.q[w] = 2 * stamp + 1  # odd: being written
        u = w * 2
        g.u32[u + 2] = h
        g.u32[u + 3] = klen
        _fault("mid_entry")
        g.u32[u + 4] = koff
        g.u32[u + 5] = meta
        g.qs[w + 3] = val
        g.q[w] = 2 * stamp + 2

    def _put(self, key: Any, kkind: int, kb: bytes, h: int, vkind: int, vinl: int,
             vraw: bytes | None) -> None:
        """Set one key; the writer lock is held and a transaction is open."""
        g = self._g
        w = self._slots.get(key, -1)
        e = (w - g.ew) // 4 if w >= 0 and g.u32[w * 2 + 5] & L.LIVE else -1
        if e < 0:
            e, slot = self._find(g, kkind, kb, h)
        if e >= 0:  # overwrite in place (entry keeps its position: dict order)
            u = (g.ew + e * 4) * 2
            old_meta = g.u32[u + 5]
            self._save(g.eoff + e * L.ENTRY_BYTES, L.ENTRY_BYTES)
            if vraw is not None or (old_meta & 0xFF) in L.HEAP_KINDS:
                self._save_header()
            if (old_meta & 0xFF) in L.HEAP_KINDS:
                g.q[L.H_GARBAGE] += (g.u32[u + 7] + 7) // 8
            if vraw is not None:
                vinl = self._alloc(g, vraw) | (len(vraw) << 32)
            self._write_entry(g, e, h, g.u32[u + 3], g.u32[u + 4], vkind | (kkind << 8) | L.LIVE, vinl)
        else:  # insert at the end
            q = g.q
            used = q[L.H_USED]
            if used >= g.cap or slot < 0:
                raise _Grow
            self._save_header()
            self._save(L.HEADER_BYTES + (slot * 4 & ~7), 8)
            koff = self._alloc(g, kb)
            if vraw is not None:
                vinl = self._alloc(g, vraw) | (len(vraw) << 32)
            e = used
            self._write_entry(g, e, h, len(kb), koff, vkind | (kkind << 8) | L.LIVE, vinl)
            q[L.H_USED] = used + 1
            q[L.H_LIVE] += 1
            g.i32[L.HEADER_BYTES // 4 + slot] = e
        _fault("after_write")
        if len(self._slots) >= _CACHE_MAX:
            self._slots.clear()
        self._slots[key] = g.ew + e * 4

    def _delete(self, g: L.Generation, e: int, slot: int) -> None:
        u = (g.ew + e * 4) * 2
        meta = g.u32[u + 5]
        self._save_header()
        self._save(g.eoff + e * L.ENTRY_BYTES, L.ENTRY_BYTES)
        self._save(L.HEADER_BYTES + (slot * 4 & ~7), 8)
        garbage = (g.u32[u + 3] + 7) // 8
        if (meta & 0xFF) in L.HEAP_KINDS:
            garbage += (g.u32[u + 7] + 7) // 8
        self._write_entry(g, e, g.u32[u + 2], g.u32[u + 3], g.u32[u + 4], meta & ~L.LIVE,
                          g.qs[(g.ew + e * 4) + 3])
        g.i32[L.HEADER_BYTES // 4 + slot] = L.DELETED
        g.q[L.H_LIVE] -= 1
        g.q[L.H_GARBAGE] += garbage

    def _slot_of(self, g: L.Generation, e: int) -> int:
        u = (g.ew + e * 4) * 2
        start = g.hoff + g.u32[u + 4] * 8
        kb = bytes(g.mv[start : start + g.u32[u + 3]])
        kkind = (g.u32[u + 5] >> 8) & 0xFF
        found, slot = self._find(g, kkind, kb, g.u32[u + 2])
        assert found == e
        return slot

    # ------------------------------------------------------------------ growth

    def _rebuild(self, extra_entries: int = 0, extra_heap: int = 0, empty: bool = False) -> None:
        """Copy the live entries into a new generation with room to spare, then switch to it."""
        from ._shm_rebuild import build_generation

        c, old = self._c, self._g
        target = old.gen + 1
        c[L.C_GROW] = target
        new = build_generation(self._seg, old, target, extra_entries, extra_heap, empty,
                               self._config.capacity or 0, c)
        _fault("mid_grow")
        c[L.C_GEN] = target
        c[L.C_GSEQ] = target * 2  # one aligned store publishes the new generation
        _fault("after_switch")
        L.unlink_quiet(old.path)
        c[L.C_GROW] = 0
        old.close()
        self._g, self._gen, self._epoch, self._q = new, target, target * 2, new.q
        self._cache.clear()
        self._slots.clear()

    # ------------------------------------------------------------------ reads

    def _read(self, key: Any) -> tuple:
        """(found, value) read without the lock; falls back to the lock if writers keep winning."""
        kkind, kb = L.encode_key(key)
        h = _crc32(kb, kkind)
        if _LOCKFREE_READS:
            c = self._c
            for _ in range(_SPINS):
                e1 = c[C_GSEQ]
                if e1 != self._epoch:
                    if e1 & 1:
                        os.sched_yield()  # a multi-key write or a destroy: wait, or lock
                    else:
                        self._map_current()
                    continue
                try:
                    got = self._read_entry(key, kkind, kb, h)
                except (IndexError, ValueError, OverflowError):
                    got = None  # a torn read of the index or an entry: retry
                if got is not None and c[C_GSEQ] == e1:
                    return got
        self._wlock()
        try:
            got = self._read_entry(key, kkind, kb, h)
            assert got is not None
            return got
        finally:
            self._lock_release()

    def _read_entry(self, key: Any, kkind: int, kb: bytes, h: int) -> tuple | None:
        g = self._g
        e, _ = self._find(g, kkind, kb, h)
        if e < 0:
            return (False, None)
        w = g.ew + e * 4
        ver = g.q[w]
        if ver & 1:
            return None
        meta = g.u32[w * 2 + 5]
        kind = meta & 0xFF
        inline = g.qs[w + 3]
        raw = None
        if kind in L.HEAP_KINDS:
            start = g.hoff + (inline & 0xFFFFFFFF) * 8
            raw = bytes(g.mv[start : start + (inline >> 32)])
        if g.q[w] != ver or not meta & L.LIVE:
            return None
        value = L.decode_value(kind, inline, raw)
        self._slots[key] = w
        cache = self._cache
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        if kind in L.IMMUTABLE_KINDS:
            cache[key] = (w, ver, value, True)
        else:
            cache[key] = (w, ver, raw, False)
        return (True, value)

    # ------------------------------------------------------------------ the five

    def __getitem__(self, key: Any) -> Any:
        hit = self._cache.get(key)
        if hit is not None and self._c[C_GSEQ] == self._epoch and self._q[hit[0]] == hit[1]:
            return hit[2] if hit[3] else _loads(hit[2])
        self._check_open()
        found, value = self._read(self._check_key(key))
        if not found:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        if type(key) is not str or self._declared is not None:
            key = self._check_key(key)
        if self._vt is not None:
            value = self._vt.coerce(value)
        t = type(value)
        if t is int and -0x8000000000000000 <= value <= 0x7FFFFFFFFFFFFFFF:
            if self._fast_store(key, V_INT, value, None):
                return
        elif t is float:
            if self._fast_store(key, V_FLOAT, _f2i(value), None):
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
        w = self._slots.get(key, -1)
        if w < 0 or self._lock_forkgen != _fork_generation:
            return False
        m = self._mutex
        rc = m.trylock()
        if rc == 130:  # the last holder died: the general path repairs
            m.make_consistent()
            m.unlock()
            return False
        if rc:
            got = m.acquire(self._config.timeout)
            if got is not True:  # timed out (the general path raises), or the holder died
                if got:          # (held now and consistent): the general path repairs
                    m.unlock()
                return False
        try:
            c = self._c
            if c[C_JSTATE] or c[C_GROW] or c[C_GSEQ] != self._epoch:
                return False
            g = self._g
            meta = g.u32[w * 2 + 5]
            if not meta & LIVE:
                return False
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
            if meta & 0xFF != kind:
                return False
            c[C_JSTATE] = (w << 2) | J_INLINE
            stamp = c[C_STAMP] + 1
            c[C_STAMP] = stamp
            q = g.q
            q[w] = 2 * stamp + 1
            if FAULT:
                _fault("mid_entry")
            qs[w + 3] = inline
            q[w] = 2 * stamp + 2
            if FAULT:
                _fault("before_commit")
            c[C_JSTATE] = 0
        finally:
            m.unlock()
        return True if delta is None else new

    def _write_one(self, key: Any, kkind: int, kb: bytes, h: int, vkind: int, vinl: int,
                   vraw: bytes | None) -> None:
        for attempt in range(3):
            self._begin()
            try:
                self._put(key, kkind, kb, h, vkind, vinl, vraw)
            except _Grow:
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

    def _maybe_compact(self) -> None:
        """Rebuild when deleted entries or dead heap bytes dominate, so lookups stay short."""
        g = self._g
        q = g.q
        used, live = q[L.H_USED], q[L.H_LIVE]
        if used > 64 and live < used // 4:
            self._rebuild()
        elif q[L.H_GARBAGE] > 4096 and q[L.H_GARBAGE] * 2 > q[L.H_TOP]:
            self._rebuild()

    def __len__(self) -> int:
        self._check_open()
        c = self._c
        for _ in range(_SPINS):
            e1 = c[C_GSEQ]
            if e1 != self._epoch:
                if e1 & 1:
                    os.sched_yield()
                else:
                    self._map_current()
                continue
            n = self._q[L.H_LIVE]
            if c[C_GSEQ] == e1:
                return n
        self._wlock()
        try:
            return self._q[L.H_LIVE]
        finally:
            self._lock_release()

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

    def _consistent_copy(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Live entries, plus the heap or the int keys gathered from it, copied under the lock.

        Single-key writes do not announce themselves to readers (their entry's
        version is enough for a one-key read), so a whole-table copy takes the
        lock. Only memcpy-like numpy work happens while it is held; decoding to
        Python objects happens after.
        """
        self._wlock()
        try:
            g = self._g
            used, live_n = g.q[L.H_USED], g.q[L.H_LIVE]
            ents = g.entries()[:used]
            ents = ents.copy() if live_n == used else ents[(ents["meta"] & L.LIVE) != 0]
            meta = ents["meta"]
            heap = int_keys = None
            # all keys int64 and all values inline: gather the keys, skip copying the heap
            if len(ents) and meta.min() == meta.max() and (meta[0] >> 8) & 0xFF == L.K_INT \
                    and meta[0] & 0xFF not in L.HEAP_KINDS and (ents["klen"] == 8).all():
                heapq = np.frombuffer(g.mm, dtype="<i8", count=g.heapw, offset=g.hoff)
                int_keys = heapq[ents["koff"]]  # fancy indexing copies
            else:
                heap = g.heap()[: g.q[L.H_TOP] * 8].copy()
            return ents, heap, int_keys
        finally:
            self._lock_release()

    def snapshot(self) -> dict:
        keys, vals = self._live_keys_values()
        return dict(zip(keys, vals))

    def _update_items(self, items: list[tuple[Any, Any]]) -> None:
        encoded = []
        for key, value in items:
            kkind, kb = L.encode_key(key)
            encoded.append((key, kkind, kb, _crc32(kb, kkind), *L.encode_value(value)))
        self._wlock()
        try:
            self._put_many(encoded)
        finally:
            self._lock_release()

    def _put_many(self, encoded: list) -> None:
        """Apply many puts as one transaction; too big for the journal: in a new generation."""
        if len(encoded) <= 256:
            self._begin(multi=len(encoded) > 1)
            try:
                for item in encoded:
                    self._put(*item)
            except _Grow:
                self._abort()
            except BaseException:
                self._abort()
                raise
            else:
                self._commit()
                return
        heap = sum((len(kb) + 7) // 8 + (len(v or b"") + 7) // 8 + 1
                   for _, _, kb, _, _, _, v in encoded)
        self._rebuild_with(encoded, heap * 8)

    def _rebuild_with(self, encoded: list, heap_bytes: int) -> None:
        """Build a new generation holding the current data plus ``encoded``, then switch once.

        Nobody else can see the new generation until the switch, so the puts need
        no journal, and readers see all of them or none.
        """
        from ._shm_rebuild import build_generation

        c, old = self._c, self._g
        target = old.gen + 1
        c[L.C_GROW] = target
        new = build_generation(self._seg, old, target, len(encoded), heap_bytes, False,
                               self._config.capacity or 0, c)
        self._g, self._gen, self._q = new, target, new.q  # write into the unpublished generation
        self._epoch = old.gen * 2
        self._slots.clear()
        self._journaling = False
        try:
            for item in encoded:
                self._put(*item)
        except BaseException:
            self._g, self._gen, self._epoch, self._q = old, old.gen, old.gen * 2, old.q
            new.close()
            L.unlink_quiet(new.path)
            c[L.C_GROW] = 0
            self._slots.clear()
            raise
        finally:
            self._journaling = True
        _fault("mid_grow")
        c[L.C_GEN] = target
        _fault("mid_switch")
        c[L.C_GSEQ] = target * 2
        self._epoch = target * 2
        _fault("after_switch")
        L.unlink_quiet(old.path)
        c[L.C_GROW] = 0
        old.close()
        self._cache.clear()
        self._slots.clear()

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
        return got

    # ------------------------------------------------------------------ numeric bulk access

    def values_array(self) -> np.ndarray:
        """A numpy copy of every value, in iteration order (needs a numeric ``value_type``)."""
        self._need_numeric("values_array")
        self._check_open()
        self._wlock()
        try:
            ents = self._g.entries()[: self._g.q[L.H_USED]]
            live = ents["meta"] & L.LIVE
            cols = ents[["meta", "val"]]
            cols = np.array(cols) if live.all() else cols[live != 0]  # copies two columns only
        finally:
            self._lock_release()
        return _numeric(cols, self._config.value_type)

    def keys_list(self) -> list:
        """Every key in iteration order (the order of :meth:`values_array`)."""
        return self._live_keys_values(values=False)[0]

    def get_many(self, keys: Any, default: Any = MISSING) -> np.ndarray:
        """Values of many keys as a numpy array, read under one lock.

        A missing key raises ``KeyError`` unless ``default`` is given.
        """
        self._need_numeric("get_many")
        keys = [self._check_key(k) for k in keys]
        out = np.empty(len(keys), dtype=self._config.value_type)
        self._wlock()
        try:
            for i, key in enumerate(keys):
                kkind, kb = L.encode_key(key)
                found, value = self._read_entry_locked(key, kkind, kb, _crc32(kb, kkind))
                if not found:
                    if default is MISSING:
                        raise KeyError(key)
                    value = default
                out[i] = value
        finally:
            self._lock_release()
        return out

    def set_many(self, keys: Any, values: Any) -> None:
        """Set many keys from a sequence or numpy array of values, in one atomic step."""
        self._need_numeric("set_many")
        keys = list(keys)
        values = np.asarray(values).tolist()
        if len(keys) != len(values):
            raise ValueError(f"set_many: {len(keys)} keys but {len(values)} values")
        self._update_items(self._validated_items(zip(keys, values), {}))

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
            "lock_held": self._lock_held_elsewhere(), "last_writer": writer or None,
        }


def _numeric(ents: np.ndarray, value_type: str) -> np.ndarray:
    kinds = ents["meta"] & 0xFF
    raw = ents["val"]
    if value_type.startswith("float"):
        out = raw.view("<f8").copy()
        ints = kinds == L.V_INT
        if ints.any():
            out[ints] = raw[ints]
        return out.astype(value_type, copy=False)
    if value_type == "bool":
        return kinds == L.V_TRUE
    return raw.astype(value_type)


def _flock_held(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
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
