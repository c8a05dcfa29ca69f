"""The ``value`` backend: a fixed set of numeric counters and gauges on shared ctypes arrays.

Features
--------
- One slot per key declared with ``keys=`` (required), in a
  ``multiprocessing`` RawArray of the ``value_type`` (``int64`` default;
  ``int8``..``uint64``, ``float32``, ``float64``, ``bool``), plus a presence
  byte per key: deleting a key makes it absent, so the mapping still behaves
  like a dict whose keys are a subset of the declared ones.
- Declared keys start **present, at 0** (counters are ready to use); pass
  ``initial="absent"`` to start with an empty mapping instead.
- Reads take no lock (one aligned slot and its presence byte).
- Writes take process-shared, robust, recursive pthread mutexes: one per key,
  so processes updating different keys never wait for each other, plus one
  for the mapping. ``lock()`` and bulk writes take the mapping's and then every
  key's, in order. Futex-based, so cheap under contention; when a holder dies
  the next locker repairs from an undo copy (bulk writes) and goes on -- a
  killed holder never deadlocks the rest, unlike ``Value.get_lock()``.
- Sharing is by inheritance only: ``fork``, ``Process`` arguments,
  ``Pool(initializer=..., initargs=(d,))``. Anything else (a ``Pool`` task
  argument, a queue, another interpreter) raises :class:`~shareit.ShareitError`
  naming the initializer pattern. No attach by name.
- :meth:`ValueMapping.values_array` gives every value as numpy in one call.

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

import time
from multiprocessing.context import get_spawning_popen
from multiprocessing.sharedctypes import RawArray
from typing import Any, Iterator

import numpy as np

from .. import _runtime
from .._locks import RobustMutex
from ..base import Capabilities, SharedMapping, _add, _check_number
from ..config import Config, ConfigError
from ..errors import BackendDiedError, LockTimeoutError, ShareitError

_CTYPES = {"int8": "b", "uint8": "B", "int16": "h", "uint16": "H", "int32": "i", "uint32": "I",
           "int64": "q", "uint64": "Q", "float32": "f", "float64": "d", "bool": "?"}
# header words: 0 state (1 live, 2 destroyed), 1 undo valid
_LIVE, _DESTROYED = 1, 2


def _initial(name: str, v: Any) -> str:
    if v not in ("zero", "absent"):
        raise ConfigError(f"option 'initial' must be 'zero' or 'absent', got {v!r}")
    return v


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
    options = {"initial": (_initial, "zero", "declared keys start 'zero' (present, 0) or 'absent'")}

    def __init__(self, name: str | None, config: Config, arrays: tuple):
        super().__init__(name, config)
        self._arrays = arrays
        values, present, header, mutex_buf, undo_v, undo_p = arrays
        self._values, self._present, self._header = values, present, header
        self._undo_v, self._undo_p = undo_v, undo_p
        self._mutexes = [RobustMutex(mutex_buf, RobustMutex.SIZE * j)
                         for j in range(len(config.keys) + 1)]  # [mapping, key 0, key 1, ...]
        self._index = {k: i for i, k in enumerate(config.keys)}
        self._keys = list(config.keys)
        self._numpy_dtype = config.value_type

    @classmethod
    def _open(cls, name: str | None, config: Config, create: bool = True) -> "ValueMapping":
        if config.value_type is None:
            config = Config({**config.as_dict(), "value_type": "int64"}, config.sources)
        if not create:
            raise ConfigError(
                "the value backend cannot attach by name (create=False): share a value mapping "
                "by inheritance -- fork, Process(args=(d,)) or Pool(initializer=f, initargs=(d,))"
            )
        if name is not None:
            record = _runtime.read_meta(name)
            if record is not None and not _runtime.record_is_stale(record, _runtime.meta_path(name)):
                raise ShareitError(
                    f"a value mapping named {name!r} already exists in process "
                    f"{record['owner_pid']}; value mappings cannot be attached by name. Pass it to "
                    f"child processes instead: Process(args=(d,)) or Pool(initializer=f, initargs=(d,))"
                )
            _runtime.remove_meta(name, expect=record)
            if not _runtime.claim(name):
                raise ShareitError(f"another process is creating a mapping named {name!r}")
        obj = cls._create(name, config)
        obj._become_owner()
        return obj

    @classmethod
    def _create(cls, name: str | None, config: Config) -> "ValueMapping":
        n = len(config.keys)
        code = _CTYPES[config.value_type]
        values = RawArray(code, n)
        present = RawArray("b", n)
        header = RawArray("q", 4)
        mutex = RawArray("b", RobustMutex.SIZE * (n + 1))
        for j in range(n + 1):
            RobustMutex.init(mutex, RobustMutex.SIZE * j)
        arrays = (values, present, header, mutex, RawArray(code, n), RawArray("b", n))
        if config.initial == "zero":
            present[:] = [1] * n
        header[0] = _LIVE
        self = cls(name, config, arrays)
        if name is not None:
            self._publish()
        return self

    # ------------------------------------------------------------------ sharing

    def __reduce__(self):
        self._check_open()
        if get_spawning_popen() is None:
            raise ShareitError(
                "a value mapping is shared by inheritance only (its memory cannot travel "
                "through pickle): pass it when a process starts -- Process(target=f, args=(d,)) or "
                "Pool(initializer=init, initargs=(d,)) with init storing it in a global -- not as "
                "a Pool task argument, through a queue, or to another interpreter. Or use "
                "backend='shm', which attaches by name"
            )
        return (type(self)._from_handle, ((self._name, self._config, self._arrays),))

    @classmethod
    def _from_handle(cls, handle: tuple) -> "ValueMapping":
        return cls(*handle)

    # ------------------------------------------------------------------ locking

    def _lock_acquire(self, timeout: float) -> bool:
        """The whole mapping: its own mutex, then every key's, in order (no deadlock:
        a single-key writer holds only its key's)."""
        deadline = time.monotonic() + timeout
        taken: list[RobustMutex] = []
        for m in self._mutexes:
            if not m.acquire(max(0.0, deadline - time.monotonic())):
                for t in reversed(taken):
                    t.release()
                return False
            taken.append(m)
        if self._header[0] == _DESTROYED:
            self._lock_release()
            raise self._died()
        if self._header[1]:  # set only while a holder writes in bulk: that holder died
            self._values[:] = self._undo_v[:]  # undo its cut-short write
            self._present[:] = self._undo_p[:]
            self._header[1] = 0
        return True

    def _lock_release(self) -> None:
        for m in reversed(self._mutexes):
            m.release()

    def _key_acquire(self, i: int) -> RobustMutex | None:
        """Lock key ``i`` alone: its mutex, or -- to repair first -- the whole mapping (None)."""
        m = self._mutexes[i + 1]
        rc = m.trylock()
        if rc == 130:  # its holder died: a single-slot write leaves nothing half done
            m.make_consistent()
        elif rc:
            self._check_open()
            if not m.acquire(self._config.timeout):
                raise LockTimeoutError(
                    f"could not lock key {self._keys[i]!r} of value mapping {self._label()} within "
                    f"{self._config.timeout:g} s; another process holds lock(). Pass a larger timeout"
                )
        if self._header[1] or self._header[0] != _LIVE:  # a bulk writer died, or destroyed
            m.release()
            self._wlock()  # repairs, or raises BackendDiedError / ClosedError
            return None
        return m

    def _key_release(self, m: RobustMutex | None) -> None:
        if m is None:
            self._lock_release()
        else:
            m.release()

    def _wlock(self) -> None:
        self._check_open()
        if not self._lock_acquire(self._config.timeout):
            raise LockTimeoutError(
                f"could not lock value mapping {self._label()} within {self._config.timeout:g} s; "
                f"another process holds lock(). Pass a larger timeout"
            )

    def _died(self) -> BackendDiedError:
        return BackendDiedError(f"value mapping {self._label()} was destroyed by its owner")

    def _begin_bulk(self) -> None:
        self._undo_v[:] = self._values[:]
        self._undo_p[:] = self._present[:]
        self._header[1] = 1

    # ------------------------------------------------------------------ the five

    def _slot(self, key: Any) -> int:
        try:
            return self._index[key]
        except TypeError:
            raise TypeError(f"unhashable key type: {type(key).__name__!r}") from None
        except KeyError:
            raise KeyError(
                f"{key!r} is not one of the declared keys of mapping {self._label()}: "
                f"{self._keys}"
            ) from None

    def __getitem__(self, key: Any) -> Any:
        try:
            i = self._index[key]
        except (KeyError, TypeError):
            self._check_open()
            i = self._slot(key)
        if self._header[0] != _LIVE:
            self._check_open()
            raise self._died()
        if not self._present[i]:
            raise KeyError(key)
        return self._values[i]

    def __setitem__(self, key: Any, value: Any) -> None:
        i = self._slot(key)
        value = self._vt.coerce(value)
        m = self._key_acquire(i)
        try:
            self._values[i] = value
            self._present[i] = 1  # after the value: a lock-free reader never sees a stale one
        finally:
            self._key_release(m)

    def __delitem__(self, key: Any) -> None:
        i = self._slot(key)
        m = self._key_acquire(i)
        try:
            if not self._present[i]:
                raise KeyError(key)
            self._present[i] = 0
        finally:
            self._key_release(m)

    def __iter__(self) -> Iterator[Any]:
        self._check_alive()
        present = self._present[:]
        return iter([k for k, p in zip(self._keys, present) if p])

    def __len__(self) -> int:
        self._check_alive()
        return sum(self._present[:])

    def __contains__(self, key: Any) -> bool:
        try:
            i = self._index[key]
        except KeyError:
            return False
        except TypeError:
            raise TypeError(f"unhashable key type: {type(key).__name__!r}") from None
        self._check_alive()
        return bool(self._present[i])

    def _check_alive(self) -> None:
        self._check_open()
        if self._header[0] != _LIVE:
            raise self._died()

    # ------------------------------------------------------------------ atomic and bulk

    def incr(self, key: Any, delta: Any = 1, default: Any = 0) -> Any:
        i = self._index.get(key)
        if i is None:
            i = self._slot(key)
        if type(delta) is not int and type(delta) is not float:
            _check_number("delta", delta)
        m = self._key_acquire(i)
        try:
            values = self._values
            current = values[i] if self._present[i] else self._vt.coerce(default)
            new = self._vt.coerce(_add(key, current, delta))
            values[i] = new
            self._present[i] = 1
        finally:
            self._key_release(m)
        return new

    def snapshot(self) -> dict:
        self._wlock()
        try:
            values, present = self._values[:], self._present[:]
        finally:
            self._lock_release()
        return {k: v for k, v, p in zip(self._keys, values, present) if p}

    def _update_items(self, items: list[tuple[Any, Any]]) -> None:
        slots = [(self._index[k], v) for k, v in items]
        self._wlock()
        try:
            self._begin_bulk()
            for i, v in slots:
                self._values[i] = v
                self._present[i] = 1
            self._header[1] = 0
        finally:
            self._lock_release()

    def clear(self) -> None:
        self._wlock()
        try:
            self._present[:] = bytes(len(self._keys))
        finally:
            self._lock_release()

    def values_array(self) -> np.ndarray:
        """A numpy copy of every present value, in declared-key order (see :meth:`keys_list`)."""
        self._wlock()
        try:
            values = np.frombuffer(self._values, dtype=self._numpy_dtype).copy()
            present = np.frombuffer(self._present, dtype=np.int8).astype(bool)
        finally:
            self._lock_release()
        return values[present]

    def keys_list(self) -> list:
        """The present keys, in the order of :meth:`values_array`."""
        return list(self)

    # ------------------------------------------------------------------ lifetime

    def _close(self) -> None:
        pass  # the memory is freed when the last process holding it lets go

    def _destroy(self) -> None:
        self._wlock()
        try:
            self._header[0] = _DESTROYED
        finally:
            self._lock_release()
        if self._name is not None:
            _runtime.remove_meta(self._name)

