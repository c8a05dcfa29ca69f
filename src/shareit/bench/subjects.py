"""The subjects of ``shareit bench``: what is measured, declared as data.

A subject is one way of sharing a mapping — a shareit backend, a baseline
(plain ``dict``, raw ``Manager().dict()`` with and without a lock, raw
``Value``) or a peer library (UltraDict, shared-memory-dict, lmdb, diskcache)
— driven through one small interface. What it can do is stated by its
capabilities (:class:`Cap`); workloads pick subjects by capability, never by
name. The peer libraries are in ``peers``.
"""

from __future__ import annotations

import contextlib
import enum
import multiprocessing as mp
import time
import uuid
from typing import Any

FORK = mp.get_context("fork")
COUNTER_KEYS = ["hot"] + [f"c{i}" for i in range(8)]


class Cap(str, enum.Enum):
    """What a subject can do or is."""

    SHARED = "shared"               # usable from other processes
    ANY_VALUES = "any values"       # holds any picklable value, not only numbers
    NUMERIC_ONLY = "numeric only"   # counters and gauges only
    LOSSY = "lossy"                 # read-modify-write without a lock: loses updates on purpose
    FLOOR = "floor"                 # plain dict: the single-process floor, never recommended
    REFERENCE = "reference"         # raw Manager().dict(): the baseline ratios are taken against
    SHAREIT = "shareit"             # a shareit backend: a candidate for the recommendation
    PEER = "peer"                   # a third-party library, run in its own subprocess
    NEEDS_SERVER = "needs server"   # a server must be running (redis)
    ATTACH_BY_NAME = "attach by name"
    NUMPY_BULK = "numpy bulk"       # values_array(): numbers straight into numpy


class Subject:
    """One way of sharing a mapping, driven through the same small interface."""

    name = ""
    caps: frozenset[Cap] = frozenset({Cap.SHARED, Cap.ANY_VALUES})
    module = ""    # peers: the module to import
    install = ""   # peers: what to pip install
    max_keys: int | None = None   # larger rows are not run, for the reason below
    max_keys_why = ""

    def make(self, n_hint: int = 0, **opts: Any) -> Any:
        raise NotImplementedError

    def close(self, m: Any) -> None:
        pass

    def lock_for(self, m: Any) -> Any:
        """The lock a user of this baseline or peer would take around a read-modify-write."""
        return contextlib.nullcontext()

    def incr(self, m: Any, key: str) -> None:
        with self.lock_for(m):
            m[key] = m[key] + 1

    def edit(self, m: Any, key: str) -> None:
        with self.lock_for(m):
            v = m[key]
            v["x"] += 1
            m[key] = v

    def snapshot(self, m: Any) -> dict[Any, Any]:
        return dict(m)

    def bulk_build(self, m: Any, data: dict[Any, Any]) -> None:
        m.update(data)

    def read(self, m: Any, key: str) -> Any:
        return m[key]

    def set_counter(self, m: Any, key: str, value: int) -> None:
        m[key] = value

    def finish(self) -> None:
        """The run is over: release whatever the subject kept between workloads."""


class DictSubject(Subject):
    name, caps = "dict", frozenset({Cap.ANY_VALUES, Cap.FLOOR})

    def make(self, n_hint: int = 0, **opts: Any) -> dict[Any, Any]:
        return {}

    def incr(self, m: dict[Any, Any], key: str) -> None:
        m[key] = m.get(key, 0) + 1

    def edit(self, m: dict[Any, Any], key: str) -> None:
        m[key]["x"] += 1

    def snapshot(self, m: dict[Any, Any]) -> dict[Any, Any]:
        return m.copy()


class ManagerSubject(Subject):
    """Raw ``Manager().dict()``; counters and edits under an ``mp.Lock``, the stdlib recipe."""

    name, caps = "Manager().dict()", frozenset({Cap.SHARED, Cap.ANY_VALUES, Cap.REFERENCE})

    def make(self, n_hint: int = 0, **opts: Any) -> Any:
        self.manager = FORK.Manager()
        self.mlock = FORK.Lock()
        return self.manager.dict()

    def close(self, m: Any) -> None:
        self.manager.shutdown()

    def lock_for(self, m: Any) -> Any:
        return self.mlock

    def snapshot(self, m: Any) -> dict[Any, Any]:
        return dict(m.copy())


class LossyManagerSubject(ManagerSubject):
    """Raw ``Manager().dict()`` with ``d[k] += 1`` and no lock: shown losing updates."""

    name, caps = "Manager().dict() no lock", frozenset({Cap.SHARED, Cap.ANY_VALUES, Cap.LOSSY})

    def lock_for(self, m: Any) -> Any:
        return contextlib.nullcontext()


class ValueSubject(Subject):
    """Raw ``multiprocessing.Value('q')`` per key with its ``get_lock()``: counters only."""

    name, caps = "Value+get_lock", frozenset({Cap.SHARED, Cap.NUMERIC_ONLY})

    def make(self, n_hint: int = 0, **opts: Any) -> dict[str, Any]:
        return {k: FORK.Value("q", 0) for k in COUNTER_KEYS}

    def incr(self, m: dict[str, Any], key: str) -> None:
        v = m[key]
        with v.get_lock():
            v.value += 1

    def read(self, m: dict[str, Any], key: str) -> Any:
        return m[key].value

    def set_counter(self, m: dict[str, Any], key: str, value: int) -> None:
        m[key].value = value


class ShareitSubject(Subject):
    """A shareit backend; its capabilities come from ``shareit.backends()``."""

    def __init__(self, backend: str, url: str | None = None) -> None:
        import shareit
        from shareit import registry

        info = shareit.backends()[backend]
        self.name = self.backend = backend
        self.url = url
        caps = {Cap.SHAREIT, Cap.SHARED}
        caps.add(Cap.ANY_VALUES if "any" in info.get("value_kinds", ["any"]) else Cap.NUMERIC_ONLY)
        if info.get("attach_by_name"):
            caps.add(Cap.ATTACH_BY_NAME)
        if info.get("cross_machine"):
            caps.add(Cap.NEEDS_SERVER)
        if hasattr(registry.load(backend), "values_array") and not info.get("fixed_keys"):
            caps.add(Cap.NUMPY_BULK)
        self.caps = frozenset(caps)
        self.fixed_keys = bool(info.get("fixed_keys"))
        self._spares: dict[str, Any] = {}
        self._keys: dict[int, str] = {}
        self._slow = False

    def options(self) -> dict[str, Any]:
        """Options the backend needs to open at all (declared keys, the server's URL)."""
        opts: dict[str, Any] = {"keys": COUNTER_KEYS} if self.fixed_keys else {}
        if self.url and Cap.NEEDS_SERVER in self.caps:
            opts["url"] = self.url
        return opts

    SLOW_OPEN = 0.05  # seconds: a backend that starts a server takes ~0.15 s per open

    def make(self, n_hint: int = 0, **opts: Any) -> Any:
        """A new mapping; or, for a backend slow to open, its cleared spare of the same options
        (each open of manager or queue starts a server: 40 of them would cost seconds)."""
        import shareit

        key = repr(sorted(opts.items()))
        spare = self._spares.pop(key, None)
        if spare is not None:
            spare.clear()
            self._keys[id(spare)] = key
            return spare
        t0 = time.perf_counter()
        m = shareit.open(f"bench-{uuid.uuid4().hex[:10]}", backend=self.backend,
                         capacity=max(n_hint, 1), **{**self.options(), **opts})
        self._slow = self._slow or time.perf_counter() - t0 > self.SLOW_OPEN
        self._keys[id(m)] = key
        return m

    def close(self, m: Any) -> None:
        key = self._keys.pop(id(m), "")
        if self._slow and key not in self._spares:
            self._spares[key] = m
        else:
            m.close()

    def finish(self) -> None:
        for m in self._spares.values():
            m.close()
        self._spares.clear()

    def incr(self, m: Any, key: str) -> None:
        m.incr(key)

    def edit(self, m: Any, key: str) -> None:
        with m.edit(key) as v:
            v["x"] += 1

    def snapshot(self, m: Any) -> dict[Any, Any]:
        return dict(m.snapshot())


def baselines() -> list[Subject]:
    return [DictSubject(), ManagerSubject(), LossyManagerSubject(), ValueSubject()]
