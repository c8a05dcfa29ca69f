"""The ``value`` backend: a fixed set of numeric counters and gauges on shared ctypes arrays.

Features
--------
- One slot per key declared with ``keys=`` (required), in a
  ``multiprocessing`` RawArray of the ``value_type`` (``int64`` default;
  ``int8``..``uint64``, ``float32``, ``float64``, ``bool``), plus a state
  word per key: deleting a key makes it absent, so the mapping still behaves
  like a dict whose keys are a subset of the declared ones.
- Declared keys start **present, at 0** (counters are ready to use); pass
  ``initial="absent"`` to start with an empty mapping instead.
- Reads take no lock and never wait for one: ``d[k]``, ``in``, ``len``,
  iteration, ``snapshot()`` (so ``items()``, ``==``, ``dict(d)``) and
  ``values_array()`` go on while another process holds ``lock()``, is
  stopped (SIGSTOP) in the middle of a write, or died in one.
- Linearizable: a read sees every write completed before it, and
  ``update()``/``clear()`` are seen whole or not at all -- also after their
  writer was killed half-way.
- Writes take process-shared, robust, recursive pthread mutexes: one per key,
  so processes updating different keys never wait for each other, plus one
  for the mapping. ``lock()`` and bulk writes take the mapping's and then every
  key's, in order. Futex-based, so cheap under contention; when a holder dies
  the next locker repairs (see below) and goes on -- a killed holder never
  deadlocks the rest, unlike ``Value.get_lock()``.
- Sharing is by inheritance only: ``fork``, ``Process`` arguments,
  ``Pool(initializer=..., initargs=(d,))``. Anything else (a ``Pool`` task
  argument, a queue, another interpreter) raises :class:`~shareit.ConfigError`
  naming the initializer pattern. No attach by name: a named value mapping
  only reserves its name while its creator lives (the ``InheritOnly`` open
  strategy).
- :meth:`ValueMapping.values_array` gives every value as numpy in one call.

How reads stay consistent without waiting
-----------------------------------------
x86-64 store ordering is assumed (stores are seen in program order, loads are
not reordered with loads), and a single aligned 8-byte load or store is atomic.

Each key has a state word next to its slot: ``present`` (bit 0), ``writing``
(bit 1), ``bulk`` (bit 2), a version (bits 3..62) that every change of the
word moves on, so a word never takes a value it had before, and a sign bit
set when the key is absent or ``bulk`` -- so the one-key read's test of
"present, no bulk write" is ``word >= 0``, one cheap comparison.

*Bulk writes* (``update``, ``clear``) use two counters in the header:
``begun`` and ``ended``. The writer, holding every mutex, copies all slots and
words to the undo area, increments ``begun``, then for each key stores its new
word with ``bulk`` set and its value, and commits by setting ``ended = begun``
-- one store, so the update becomes visible at once -- before it clears the
``bulk`` bits. While ``begun != ended`` the undo area holds exactly the
committed state, and it stays so until ``ended`` moves (the next bulk writer
refills it only after that). A reader who meets a ``bulk`` bit, or who reads
several keys, reads ``ended``, the slots, then ``begun``: equal, and no bulk
write was in flight at any moment of its read; else it reads the undo area
and checks that ``ended`` did not move. A reader therefore never waits for a
bulk writer and never sees part of its update: a writer stopped or killed
half-way leaves ``begun != ended``, and every reader keeps seeing the old
values from the undo area. The next locker, finding ``begun != ended`` under
the mutexes, copies the undo area back and sets ``ended = begun`` (rollback).

*Single-key writes* (``d[k] = v``, ``incr``, ``del``) hold only their key's
mutex, which excludes bulk writers. A write stores ``word | writing``, the
value, then the new word (present, version + 1); a delete stores just the new
word. A one-key read (``d[k]``) reads the word, the slot, and the word again:
the same word without ``bulk`` means no bulk write touched the key in between
(it sets ``bulk`` before it stores a value), and the value is stored before
the word that makes it present -- three loads, no header, as cheap as before
this scheme. ``k in d`` reads the word alone. A read of several keys (``snapshot``, ``len``,
iteration,
``values_array``) collects the words, the slots, then the words again: equal
collects with no ``writing`` bit mean that no key changed between them, so
the copy is the state at one instant. A ``writing`` bit that stays put for
``_STALLED`` seconds belongs to a writer stopped or dead between its stores;
its key then reads as before or after that write (each a state it really
had), and the reader goes on. The next locker of a dead writer's key clears it.

Configuration
-------------
``shareit.open("hits", backend="value", keys=["ok", "error"])``; in
``shareit.toml``::

    [mappings.hits]
    backend = "value"
    keys = ["ok", "error"]
    value_type = "int64"
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
import weakref
from collections.abc import Iterator, Mapping
from multiprocessing.sharedctypes import RawArray
from typing import Any, ClassVar

import numpy as np

from .. import _runtime
from .._contract import unhashable
from .._locks import OWNER_DIED, RobustMutex
from .._opening import INHERIT_ONLY
from .._ops import add, check_number
from ..base import Capabilities, SharedMapping
from ..config import Config
from ..errors import BackendDiedError, ConfigError, lock_timeout, reentrant_write

_CTYPES = {"int8": "b", "uint8": "B", "int16": "h", "uint16": "H", "int32": "i", "uint32": "I",
           "int64": "q", "uint64": "Q", "float32": "f", "float64": "d", "bool": "?"}
# header words: 0 state (1 live, 2 destroyed), 1 bulk writes begun, 2 bulk writes ended
_LIVE, _DESTROYED = 1, 2
_STATE, _BEGUN, _ENDED = 0, 1, 2
# a key's state word: bit 0 present, bit 1 a single-key write is between its stores, bit 2 a bulk
# write wrote it and may not have committed (read the header), bits 3..62 version (in steps of
# _STEP), sign (_BAD) set when absent or bulk; _OK clears the sign
_PRESENT, _WRITING, _BULK, _STEP = 1, 2, 4, 8
_BAD, _OK = -(1 << 63), (1 << 63) - 1
#: How long a ``writing`` bit may stay put before a multi-key read takes its writer for
#: stopped or dead (a running writer clears it within a few bytecodes).
_STALLED = 100e-6

#: Test-only fault injection: the step of a bulk write at which :func:`fault` acts.
FAULT: str | None = None


def fault(step: str) -> None:
    """At step :data:`FAULT` of a bulk write, SIGKILL this process (tests replace this)."""
    if FAULT == step:
        os.kill(os.getpid(), signal.SIGKILL)


#: Every value handle of this process: a child forked while one of its threads was inside
#: a write gets copies of its busy/bulk flags with no write behind them; cleared at the fork.
_handles: weakref.WeakValueDictionary[int, ValueMapping] = weakref.WeakValueDictionary()


def _clear_flags_in_child() -> None:
    for h in list(_handles.values()):
        h._busy[:] = bytes(len(h._busy))
        h._bulk = 0


os.register_at_fork(after_in_child=_clear_flags_in_child)


def _initial(name: str, v: Any) -> str:
    if v not in ("zero", "absent"):
        raise ConfigError(f"option 'initial' must be 'zero' or 'absent', got {v!r}")
    return str(v)


def _raw_array(code: str, n: int) -> Any:
    # multiprocessing knows no typecode "?": give it the ctypes type
    return RawArray(ctypes.c_bool if code == "?" else code, n)


def _view(array: Any, code: str) -> Any:
    """A plain-format memoryview of a RawArray: indexing it is cheaper than the ctypes array."""
    octets: Any = memoryview(array).cast("B")  # (cast() is typed for literal formats only)
    return octets.cast(code)


class ValueMapping(SharedMapping):
    """Counters and gauges: one shared ctypes slot per declared key."""

    backend = "value"
    capabilities = Capabilities(
        attach_by_name=False,
        fixed_keys=True,
        value_kinds=frozenset({"numeric"}),
        pickle_anytime=False,
        ordered=False,  # iteration follows the declared keys, not insertion
        notes="shared by inheritance only (fork, Process args, Pool initializer)",
    )
    opener = INHERIT_ONLY
    options: ClassVar[dict[str, tuple[Any, Any, str]]] = {
        "initial": (_initial, "zero", "declared keys start 'zero' (present, 0) or 'absent'"),
    }

    def __init__(self, name: str | None, config: Config, arrays: tuple[Any, ...]):
        super().__init__(name, config)
        self._arrays = arrays
        values, words, header, mutex_buf, undo_v, undo_w = arrays
        code = _CTYPES[config.value_type]
        self._code = code
        self._v, self._w, self._hdr = _view(values, code), _view(words, "q"), _view(header, "q")
        self._uv, self._uw = _view(undo_v, code), _view(undo_w, "q")
        # stores go through ctypes for float32: it turns a too-large float into inf as
        # before, where a memoryview raises
        self._vset = values if code == "f" else self._v
        self._raw = (values, words, undo_v, undo_w)
        self._mutexes = [RobustMutex(mutex_buf, RobustMutex.SIZE * j)
                         for j in range(len(config.keys) + 1)]  # [mapping, key 0, key 1, ...]
        self._kmutex = self._mutexes[1:]
        #: 1 while this process's ``incr`` of key i runs under its mutex: the mutex is
        #: recursive, so a write of key i begun then (by a signal handler of that thread:
        #: only the holder sees its own flag) raises ReentrantWriteError, never lost.
        self._busy = bytearray(len(config.keys))
        #: 1 while this process's bulk write (update, clear) runs under every mutex: a
        #: write begun then by a signal handler would take it for a dead writer's and undo it.
        self._bulk = 0
        _handles[id(self)] = self  # (forked while another thread wrote: cleared at the fork)
        self._index = {k: i for i, k in enumerate(config.keys)}
        self._keys = list(config.keys)
        self._numpy_dtype = config.value_type
        assert self._vt is not None  # (_create declares int64 when nothing else was)
        self._cv = self._vt.coerce

    @classmethod
    def _create(cls, name: str | None, config: Config) -> ValueMapping:
        if config.value_type is None:
            config = Config({**config.as_dict(), "value_type": "int64"}, config.sources)
        n = len(config.keys)
        code = _CTYPES[config.value_type]
        values = _raw_array(code, n)
        words = RawArray("q", n)
        header = RawArray("q", 4)
        mutex = RawArray("b", RobustMutex.SIZE * (n + 1))
        for j in range(n + 1):
            RobustMutex.init(mutex, RobustMutex.SIZE * j)
        arrays = (values, words, header, mutex, _raw_array(code, n), RawArray("q", n))
        if config.initial == "zero":
            words[:] = [_PRESENT] * n
        else:
            words[:] = [_BAD] * n
        header[_STATE] = _LIVE
        self = cls(name, config, arrays)
        if name is not None:
            self._publish()
        return self

    # ------------------------------------------------------------------ sharing

    @classmethod
    def _attach_record(cls, name: str, config: Config, record: Mapping[str, Any]) -> ValueMapping:
        raise ConfigError(
            f"a value mapping named {name!r} already exists in process {record['owner_pid']}; "
            f"value mappings cannot be attached by name. Pass it to child processes instead: "
            f"Process(args=(d,)) or Pool(initializer=f, initargs=(d,))"
        )

    def _handle(self) -> tuple[str | None, Config, tuple[Any, ...]]:
        # pickled only while a child process starts (capabilities.pickle_anytime=False):
        # the RawArrays travel by inheritance
        return (self._name, self._config, self._arrays)

    @classmethod
    def _from_handle(cls, handle: tuple[str | None, Config, tuple[Any, ...]]) -> ValueMapping:
        return cls(*handle)

    # ------------------------------------------------------------------ locking

    def _lock_acquire(self, timeout: float) -> bool:
        """The whole mapping: its own mutex, then every key's, in order (no deadlock:
        a single-key writer holds only its key's)."""
        deadline = time.monotonic() + timeout
        taken: list[RobustMutex] = []
        died = False
        for j, m in enumerate(self._mutexes):
            got = m.acquire(max(0.0, deadline - time.monotonic()))
            if not got:
                for t in reversed(taken):
                    t.release()
                return False
            taken.append(m)
            if got == OWNER_DIED:
                died = True
                if j:
                    self._abandoned(j - 1)
        # (every mutex is recursive: only this thread gets here while its own write is
        # in flight)
        if self._bulk or 1 in self._busy:
            self._lock_release()
            raise reentrant_write(f"value mapping {self._label()}")
        hdr = self._hdr
        if hdr[_STATE] == _DESTROYED:
            self._lock_release()
            raise self._died()
        if hdr[_BEGUN] != hdr[_ENDED]:  # a bulk writer died (or stopped for good) half-way
            self._undo()
        if died:  # it may have died after its commit: its bulk bits would only slow reads
            self._clear_bulk_bits(range(len(self._keys)))
        return True

    def _lock_release(self) -> None:
        for m in reversed(self._mutexes):
            m.release()

    def _key_acquire(self, i: int, rc: int) -> RobustMutex | None:
        """Lock key ``i`` after its ``trylock()`` answered ``rc``, or found a bulk write in
        flight: its mutex, or -- to repair first -- the whole mapping (None)."""
        m = self._kmutex[i]
        if rc == 130:  # EOWNERDEAD: held now
            m.make_consistent()
            self._abandoned(i)
        elif rc:
            self._check_open()
            got = m.acquire(self._config.timeout)
            if not got:
                raise lock_timeout(f"key {self._keys[i]!r} of value mapping {self._label()}",
                                   self._config.timeout, "another process holds lock()")
            if got == OWNER_DIED:
                self._abandoned(i)
        hdr = self._hdr
        if hdr[_BEGUN] != hdr[_ENDED]:  # a bulk writer died, or destroyed
            m.release()
            self._wlock()  # repairs, or raises BackendDiedError / ClosedError
            return None
        return m

    def _key_release(self, m: RobustMutex | None) -> None:
        if m is None:
            self._lock_release()
        else:
            m.release()

    def _abandoned(self, i: int) -> None:
        """Key ``i``'s mutex came back from a dead holder: end a write it left half done.

        Its value store may have happened or not; its word store did not. Either way the key
        holds a state it had before or after that write, so only the ``writing`` bit goes
        (and the version moves, so a multi-key read under way collects again).
        """
        w = self._w[i]
        if w & _WRITING:
            self._w[i] = (w & ~_WRITING) + _STEP

    def _wlock(self) -> None:
        self._check_open()
        if not self._lock_acquire(self._config.timeout):
            raise lock_timeout(f"value mapping {self._label()}", self._config.timeout,
                               "another process holds lock()")

    def _died(self) -> BackendDiedError:
        return BackendDiedError(f"value mapping {self._label()} was destroyed by its owner")

    def _begin_bulk(self) -> None:
        """Under every mutex: save the committed state, then tell readers to read it."""
        values, words, undo_v, undo_w = self._raw
        ctypes.memmove(undo_v, values, ctypes.sizeof(values))
        ctypes.memmove(undo_w, words, ctypes.sizeof(words))
        self._hdr[_BEGUN] += 1  # after the copy: a reader who sees it in flight reads undo

    def _end_bulk(self, touched: Any) -> None:
        """Commit: one store makes the whole bulk write visible; then readers of the
        ``touched`` keys may use their fast path again."""
        self._hdr[_ENDED] = self._hdr[_BEGUN]
        self._clear_bulk_bits(touched)

    def _clear_bulk_bits(self, slots: Any) -> None:
        words = self._w
        for i in slots:
            w = words[i]
            if w & _BULK:
                w &= ~_BULK  # a change of the word: a read across it reads again
                words[i] = w & _OK if w & _PRESENT else w

    def _undo(self) -> None:
        """Under every mutex: roll a bulk write back to the undo copy, then end it."""
        values, words, undo_v, undo_w = self._raw
        ctypes.memmove(values, undo_v, ctypes.sizeof(values))
        ctypes.memmove(words, undo_w, ctypes.sizeof(words))
        self._end_bulk(range(len(self._keys)))  # after the copy: readers leave undo only now

    # ------------------------------------------------------------------ consistent reads

    def _read_slot(self, i: int) -> tuple[int, Any]:
        """Key ``i``'s committed word and value by the header (the one-key reads' slow path:
        absent, a bulk write in flight or just done, or a write during the fast read)."""
        hdr = self._hdr
        while True:
            if hdr[_STATE] != _LIVE:
                self._check_open()
                raise self._died()
            ended = hdr[_ENDED]
            begun = hdr[_BEGUN]
            if begun == ended:
                w, v = self._w[i], self._v[i]
                if hdr[_BEGUN] == ended:
                    return w, v
            else:
                w, v = self._uw[i], self._uv[i]
                if hdr[_ENDED] == ended:  # still in flight: the undo area was not refilled
                    return w, v

    def _collect(self, values: bool, raw: bool = False) -> tuple[Any, Any]:
        """Every key's word (and value) as of one instant, without any lock.

        Lists, or with ``raw`` bytes. See the module docstring for why this is consistent.
        """
        hdr = self._hdr
        words, slots = self._w, self._v
        if raw:
            words, slots = words.cast("B"), slots.cast("B")
        get_w = words.tobytes if raw else words.tolist
        get_v = slots.tobytes if raw else slots.tolist
        stalled: tuple[Any, float] | None = None
        while True:
            ended = hdr[_ENDED]
            if hdr[_BEGUN] != ended:
                if hdr[_STATE] != _LIVE:
                    self._check_open()
                    raise self._died()
                uw, uv = self._uw, self._uv
                if raw:
                    uw, uv = uw.cast("B"), uv.cast("B")
                w1 = uw.tobytes() if raw else uw.tolist()
                v = (uv.tobytes() if raw else uv.tolist()) if values else None
                if hdr[_ENDED] == ended:  # still in flight: the undo area was not refilled
                    return w1, v
                continue
            w1 = get_w()
            v = get_v() if values else None
            w2 = get_w()
            if hdr[_BEGUN] != ended or w1 != w2:
                stalled = None
                continue  # a write happened while we read: read again
            if not values:
                return w1, v  # presence alone: a word is stored at once
            ws = memoryview(w1).cast("q") if raw else w1
            if not any(map(_WRITING.__and__, ws)):
                return w1, v
            # a single-key writer is between its stores: give it the moment it needs
            now = time.monotonic()
            if stalled is None or stalled[0] != w1:
                stalled = (w1, now)
            elif now - stalled[1] > _STALLED:
                return w1, v  # stopped or dead: its key reads as before or after its write
            os.sched_yield()

    # ------------------------------------------------------------------ the five

    def _slot(self, key: Any) -> int:
        try:
            return self._index[key]
        except TypeError:
            raise unhashable(key) from None
        except KeyError:
            raise self._undeclared(key) from None

    def __getitem__(self, key: Any) -> Any:
        try:
            i = self._index[key]
        except (KeyError, TypeError):
            self._check_open()
            i = self._slot(key)
        words = self._w
        w = words[i]  # the word, the slot, the word: see the module docstring
        v = self._v[i]
        if w >= 0 and words[i] == w:  # present, no bulk write, unchanged
            return v
        w, v = self._read_slot(i)  # absent, a bulk write, destroyed, or changed meanwhile
        if w & _PRESENT:
            return v
        raise KeyError(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        try:
            i = self._index[key]
        except (KeyError, TypeError):
            i = self._slot(key)
        value = self._cv(value)
        mutex = self._kmutex[i]
        rc = mutex.trylock()
        m: RobustMutex | None = mutex
        hdr = self._hdr
        if rc or hdr[1] != hdr[2]:
            m = self._key_acquire(i, rc)
        try:
            if self._busy[i]:
                raise reentrant_write(f"key {key!r} of value mapping {self._label()}")
            words = self._w
            w = words[i]
            words[i] = w | 2  # _WRITING: a multi-key read collects again, or waits a moment
            self._vset[i] = value
            words[i] = ((w | 7) + 2) & _OK  # present, no other bit, version + 1: after the value
        finally:
            if m is None:
                self._lock_release()
            else:
                m.release()

    def __delitem__(self, key: Any) -> None:
        i = self._slot(key)
        mutex = self._kmutex[i]
        rc = mutex.trylock()
        m: RobustMutex | None = mutex
        if rc or self._hdr[_BEGUN] != self._hdr[_ENDED]:
            m = self._key_acquire(i, rc)
        try:
            if self._busy[i]:
                raise reentrant_write(f"key {key!r} of value mapping {self._label()}")
            w = self._w[i]
            if not w & _PRESENT:
                raise KeyError(key)
            self._w[i] = ((w | 7) + 1) | _BAD  # absent, no other bit, version + 1: one store
        finally:
            self._key_release(m)

    def __iter__(self) -> Iterator[Any]:
        self._check_open()
        words, _ = self._collect(False)
        return iter([k for k, w in zip(self._keys, words) if w & _PRESENT])

    def __len__(self) -> int:
        self._check_open()
        words, _ = self._collect(False)
        return sum(map(_PRESENT.__and__, words))

    def __contains__(self, key: Any) -> bool:
        try:
            i = self._index[key]
        except KeyError:
            return False
        except TypeError:
            raise unhashable(key) from None
        if self._closed:
            self._check_open()
        w = self._w[i]  # presence changes in one store, which sets _BULK in a bulk write
        if w >= 0:
            return True
        if w & _BULK:
            w = self._read_slot(i)[0]
        return bool(w & _PRESENT)

    # ------------------------------------------------------------------ atomic and bulk

    def incr(self, key: Any, delta: Any = 1, default: Any = 0) -> Any:
        i = self._index.get(key)
        if i is None:
            i = self._slot(key)
        if type(delta) is not int and type(delta) is not float:
            check_number("delta", delta)
        mutex = self._kmutex[i]
        rc = mutex.trylock()
        m: RobustMutex | None = mutex
        hdr = self._hdr
        if rc or hdr[1] != hdr[2]:
            m = self._key_acquire(i, rc)
        try:
            busy = self._busy
            if busy[i]:
                raise reentrant_write(f"key {key!r} of value mapping {self._label()}")
            busy[i] = 1  # (calls from here to the store: a signal handler may run at each)
            try:
                words = self._w
                w = words[i]
                current = self._v[i] if w & 1 else self._cv(default)
                new = self._cv(add(key, current, delta))
                words[i] = w | 2  # as in __setitem__
                self._vset[i] = new
                words[i] = ((w | 7) + 2) & _OK
            finally:
                busy[i] = 0
        finally:
            if m is None:
                self._lock_release()
            else:
                m.release()
        return new

    def snapshot(self) -> dict[Any, Any]:
        """One consistent copy, taken without any lock (see the module docstring)."""
        self._check_open()
        words, values = self._collect(True)
        return {k: v for k, w, v in zip(self._keys, words, values) if w & _PRESENT}

    def _update_items(self, items: list[tuple[Any, Any]]) -> None:
        slots = [(self._index[k], v) for k, v in items]
        self._wlock()
        try:
            self._bulk = 1
            self._begin_bulk()
            try:
                words, vset = self._w, self._vset
                for i, v in slots:
                    # present, version + 1, _BULK: before the value, so a one-key read
                    # that could see the value sees the word change
                    words[i] = ((words[i] | 7) + 2) | _BULK | _BAD
                    vset[i] = v
                    if FAULT:
                        fault("mid_update")
                if FAULT:
                    fault("before_commit")
            except BaseException:
                self._undo()  # all or nothing, also for an interrupt
                raise
            self._end_bulk([i for i, _ in slots])
        finally:
            self._bulk = 0
            self._lock_release()

    def clear(self) -> None:
        self._wlock()
        try:
            self._bulk = 1
            self._begin_bulk()
            words = self._w
            touched = [i for i, w in enumerate(words.tolist()) if w & _PRESENT]
            try:
                for i in touched:
                    words[i] = ((words[i] | 7) + 1) | _BULK | _BAD  # absent, version + 1
                    if FAULT:
                        fault("mid_update")
            except BaseException:
                self._undo()
                raise
            self._end_bulk(touched)
        finally:
            self._bulk = 0
            self._lock_release()

    def values_array(self) -> np.ndarray:
        """A numpy copy of every present value, in declared-key order (see :meth:`keys_list`).

        Consistent and lock-free, like :meth:`snapshot`.
        """
        self._check_open()
        words, values = self._collect(True, raw=True)
        present = (np.frombuffer(words, dtype=np.int64) & _PRESENT).astype(bool)
        out: np.ndarray[Any, Any] = np.frombuffer(values, dtype=self._numpy_dtype)[present]
        return out

    def keys_list(self) -> list[Any]:
        """The present keys, in the order of :meth:`values_array`."""
        return list(self)

    # ------------------------------------------------------------------ lifetime

    def _close(self) -> None:
        pass  # the memory is freed when the last process holding it lets go

    def _destroy(self) -> None:
        self._wlock()
        try:
            self._hdr[_STATE] = _DESTROYED
            # a bulk write that never ends: every read takes its slow path, which sees the
            # state; one that got here first reads the undo copy, the state as of now
            self._begin_bulk()
            words = self._w
            for i in range(len(self._keys)):
                words[i] |= _BULK | _BAD
        finally:
            self._lock_release()
        mine, record = self._still_mine()  # (not the record of a later mapping of the name)
        if self._name is not None and mine:
            _runtime.remove_meta(self._name, expect=record)
