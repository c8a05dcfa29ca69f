"""The peer libraries ``shareit bench`` compares against: UltraDict, shared-memory-dict,
lmdb (a transaction per operation) and diskcache.

Each runs in a subprocess of its own (see ``runner``): peers have import-time
side effects and some crash. Each declares the module it needs and what to
``pip install``; a missing one is reported once, with that line. lmdb and
sqlite handles must not cross a fork, so a forked child reopens them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from .subjects import FORK, Cap, Subject


class PeerSubject(Subject):
    caps = frozenset({Cap.SHARED, Cap.ANY_VALUES, Cap.PEER})


class UltraDictSubject(PeerSubject):
    """UltraDict with its defaults; counters and edits under its own lock."""

    name, module, install = "UltraDict", "UltraDict", "UltraDict"

    def make(self, n_hint: int = 0, **opts: Any) -> Any:
        from UltraDict import UltraDict

        size = max(64 << 20, n_hint * 96)  # its full dump must hold the whole dict, or it raises
        return UltraDict(buffer_size=size, full_dump_size=size)

    def close(self, m: Any) -> None:
        m.unlink()

    def lock_for(self, m: Any) -> Any:
        return m.lock

    def snapshot(self, m: Any) -> dict[Any, Any]:
        return dict(m.items())


class SharedMemoryDictSubject(PeerSubject):
    """shared-memory-dict; it has no lock of its own, so counters use an ``mp.Lock``."""

    name, module, install = "shared-memory-dict", "shared_memory_dict", "shared-memory-dict"
    max_keys = 100_000
    max_keys_why = "it unpickles its whole dict on every read (40 gets/s at 100k)"

    def make(self, n_hint: int = 0, **opts: Any) -> Any:
        from shared_memory_dict import SharedMemoryDict

        self.mlock = FORK.Lock()
        return SharedMemoryDict(name=f"{TAG}smd{uuid.uuid4().hex[:8]}",
                                size=max(1 << 20, n_hint * 64))

    def close(self, m: Any) -> None:
        m.shm.close()
        m.shm.unlink()

    def lock_for(self, m: Any) -> Any:
        return self.mlock

    def snapshot(self, m: Any) -> dict[Any, Any]:
        return dict(m.items())


_MEMORY_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
#: in every file and segment name a peer makes, so that whoever started it can remove them
#: if it is killed (see runner.PeerWorker.stop)
TAG = os.environ.get("SHAREIT_BENCH_TAG", f"shareit-bench-{os.getpid()}-")


def remove_tagged(tag: str) -> None:
    """Remove what a killed peer process left in /dev/shm under ``tag``."""
    if _MEMORY_DIR is None:
        return
    for entry in os.listdir(_MEMORY_DIR):
        if tag in entry:
            path = os.path.join(_MEMORY_DIR, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _key(k: Any) -> bytes:
    return k.encode() if isinstance(k, str) else repr(k).encode()


class _PerProcess:
    """A handle a forked child must reopen (lmdb and sqlite must not cross a fork)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pid = -1
        self._h: Any = None
        self._inherited: list[Any] = []  # kept, never closed: closing them would touch the parent's

    def open(self) -> Any:
        raise NotImplementedError

    def forget(self, inherited: Any) -> None:
        self._inherited.append(inherited)

    @property
    def h(self) -> Any:
        if self._pid != os.getpid():
            if self._h is not None:
                self.forget(self._h)
            self._h, self._pid = self.open(), os.getpid()
        return self._h


class LmdbMap(_PerProcess):
    """An lmdb environment used as a mapping: one transaction per operation."""

    def open(self) -> Any:
        import lmdb

        return lmdb.open(self.path, map_size=8 << 30, max_readers=256, metasync=False, sync=False)

    def forget(self, inherited: Any) -> None:
        inherited.close()  # py-lmdb refuses a second open of a path its process still has open

    def __getitem__(self, k: Any) -> Any:
        with self.h.begin() as txn:
            raw = txn.get(_key(k))
        if raw is None:
            raise KeyError(k)
        return pickle.loads(raw)

    def __setitem__(self, k: Any, v: Any) -> None:
        with self.h.begin(write=True) as txn:
            txn.put(_key(k), pickle.dumps(v))

    def __delitem__(self, k: Any) -> None:
        with self.h.begin(write=True) as txn:
            if not txn.delete(_key(k)):
                raise KeyError(k)

    @contextlib.contextmanager
    def edit(self, k: Any) -> Iterator[dict[str, Any]]:
        with self.h.begin(write=True) as txn:  # the write transaction excludes other writers
            v = pickle.loads(txn.get(_key(k)))
            yield v
            txn.put(_key(k), pickle.dumps(v))

    def update(self, data: dict[Any, Any]) -> None:
        with self.h.begin(write=True) as txn:
            txn.cursor().putmulti([(_key(k), pickle.dumps(v)) for k, v in data.items()])

    def snapshot(self) -> dict[bytes, Any]:
        with self.h.begin() as txn:
            return {k: pickle.loads(v) for k, v in txn.cursor()}


class LmdbSubject(PeerSubject):
    """lmdb, a transaction per operation; counters and edits in one write transaction.

    Its files are in memory (``/dev/shm``) and it does not fsync, like shareit's shm."""

    name, module, install = "lmdb", "lmdb", "lmdb"

    def make(self, n_hint: int = 0, **opts: Any) -> LmdbMap:
        return LmdbMap(tempfile.mkdtemp(prefix=f"{TAG}lmdb-", dir=_MEMORY_DIR))

    def close(self, m: LmdbMap) -> None:
        shutil.rmtree(m.path, ignore_errors=True)

    def incr(self, m: LmdbMap, key: str) -> None:
        k = _key(key)
        with m.h.begin(write=True) as txn:
            txn.put(k, pickle.dumps(pickle.loads(txn.get(k)) + 1))

    def edit(self, m: LmdbMap, key: str) -> None:
        with m.edit(key) as v:
            v["x"] += 1

    def snapshot(self, m: LmdbMap) -> dict[Any, Any]:
        return m.snapshot()


class DiskcacheMap(_PerProcess):
    """A diskcache ``Cache`` (SQLite plus files) in a temporary directory."""

    def open(self) -> Any:
        import diskcache

        # used as a mapping, not a cache: nothing is ever evicted, so no eviction bookkeeping
        return diskcache.Cache(self.path, eviction_policy="none", statistics=False, cull_limit=0)

    def __getitem__(self, k: Any) -> Any:
        return self.h[k]

    def __setitem__(self, k: Any, v: Any) -> None:
        self.h[k] = v

    def __delitem__(self, k: Any) -> None:
        del self.h[k]

    def update(self, data: dict[Any, Any]) -> None:
        h = self.h
        with h.transact():
            for k, v in data.items():
                h.set(k, v)


class DiskcacheSubject(PeerSubject):
    """diskcache's ``Cache``; ``incr`` is its own atomic one, edits run in ``transact()``."""

    name, module, install = "diskcache", "diskcache", "diskcache"
    max_keys, max_keys_why = 100_000, "it stores keys one by one (~30k/s): 1M would take ~40 s"

    def make(self, n_hint: int = 0, **opts: Any) -> DiskcacheMap:
        return DiskcacheMap(tempfile.mkdtemp(prefix=f"{TAG}diskcache-",
                                             dir=_MEMORY_DIR))

    def close(self, m: DiskcacheMap) -> None:
        m.h.close()
        shutil.rmtree(m.path, ignore_errors=True)

    def lock_for(self, m: DiskcacheMap) -> Any:
        return m.h.transact()

    def incr(self, m: DiskcacheMap, key: str) -> None:
        m.h.incr(key)

    def snapshot(self, m: DiskcacheMap) -> dict[Any, Any]:
        h = m.h
        with h.transact():
            return {k: h[k] for k in h}


PEERS: dict[str, type[PeerSubject]] = {
    cls.name: cls
    for cls in (UltraDictSubject, SharedMemoryDictSubject, LmdbSubject, DiskcacheSubject)
}


def peer_available(cls: type[PeerSubject]) -> bool:
    import importlib.util

    return importlib.util.find_spec(cls.module) is not None
