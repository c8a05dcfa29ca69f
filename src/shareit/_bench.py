"""The workloads and baselines behind ``shareit bench``.

Every subject (a shareit backend, or a baseline: plain ``dict``, raw
``Manager().dict()``, raw ``Value``) runs the same workload in the same run.
Times are medians of ``repeats`` runs; results are reported as ratios against
the baselines, because these machines are shared and one absolute time means
little. Counters report whether the final count was exact: a baseline that
loses updates is shown as such, not as fast.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import shareit

FORK = mp.get_context("fork")


@dataclass
class Result:
    workload: str
    subject: str
    ops_per_s: float | None = None
    seconds: float | None = None
    exact: bool | None = None
    note: str = ""
    samples: list = field(default_factory=list)


# --------------------------------------------------------------------------- subjects


class Subject:
    """One way of sharing a mapping, driven through the same small interface."""

    name = ""
    kind = "baseline"  # or "shareit"
    shared = True  # usable from child processes
    values = "any"  # or "numeric": only counters

    def make(self, n_hint: int = 0) -> Any:
        raise NotImplementedError

    def close(self, m: Any) -> None:
        pass

    def lock_for(self, m: Any) -> Any:
        """The lock a user of this baseline or peer would take around a read-modify-write."""
        raise NotImplementedError

    def incr(self, m: Any, key: str) -> None:
        with self.lock_for(m):
            m[key] = m[key] + 1

    def edit(self, m: Any, key: str) -> None:
        with self.lock_for(m):
            v = m[key]
            v["x"] += 1
            m[key] = v

    def snapshot(self, m: Any) -> dict:
        return dict(m)

    def bulk_build(self, m: Any, data: dict) -> None:
        m.update(data)


class DictSubject(Subject):
    name, shared = "dict", False

    def make(self, n_hint: int = 0) -> dict:
        return {}

    def incr(self, m: dict, key: str) -> None:
        m[key] = m.get(key, 0) + 1

    def edit(self, m: dict, key: str) -> None:
        m[key]["x"] += 1

    def snapshot(self, m: dict) -> dict:
        return m.copy()


class ManagerSubject(Subject):
    """Raw ``Manager().dict()``; counters and edits with an ``mp.Lock``, the stdlib recipe."""

    name = "Manager().dict()"

    def __init__(self, lock: bool = True):
        self.lock = lock
        if not lock:
            self.name = "Manager().dict() no lock"

    def make(self, n_hint: int = 0) -> Any:
        self.manager = FORK.Manager()
        self.mlock = FORK.Lock()
        return self.manager.dict()

    def close(self, m: Any) -> None:
        self.manager.shutdown()

    def lock_for(self, m: Any) -> Any:
        return self.mlock if self.lock else contextlib.nullcontext()

    def snapshot(self, m: Any) -> dict:
        return m.copy()


class ValueSubject(Subject):
    """Raw ``multiprocessing.Value('q')`` per key with its ``get_lock()``: counters only."""

    name, values = "Value+get_lock", "numeric"

    def make(self, n_hint: int = 0) -> dict:
        return {f"c{i}": FORK.Value("q", 0) for i in range(8)} | {"hot": FORK.Value("q", 0)}

    def incr(self, m: dict, key: str) -> None:
        v = m[key]
        with v.get_lock():
            v.value += 1

    def read(self, m: dict, key: str) -> int:
        return m[key].value


class ShareitSubject(Subject):
    kind = "shareit"

    def __init__(self, backend: str, url: str | None = None):
        self.backend = backend
        self.name = backend
        self.url = url
        caps = shareit.backends()[backend]
        self.values = "any" if "any" in caps.get("value_kinds", ["any"]) else "numeric"

    @staticmethod
    def extra_options(backend: str) -> dict:
        """Options a backend needs to open at all (declared keys for fixed-key ones)."""
        caps = shareit.backends()[backend]
        return {"keys": ["hot"] + [f"c{i}" for i in range(8)]} if caps.get("fixed_keys") else {}

    def make(self, n_hint: int = 0, **opts: Any) -> Any:
        opts = {**self.extra_options(self.backend), **opts}
        if self.url and self.backend == "redis":
            opts["url"] = self.url
        return shareit.open(f"bench-{uuid.uuid4().hex[:10]}", backend=self.backend,
                            capacity=max(n_hint, 1), **opts)

    def close(self, m: Any) -> None:
        m.close()

    def incr(self, m: Any, key: str) -> None:
        m.incr(key)

    def edit(self, m: Any, key: str) -> None:
        with m.edit(key) as v:
            v["x"] += 1

    def snapshot(self, m: Any) -> dict:
        return m.snapshot()


class UltraDictSubject(Subject):
    """UltraDict with its defaults; counters and edits under its own lock."""

    name, kind, module = "UltraDict", "peer", "UltraDict"

    def make(self, n_hint: int = 0) -> Any:
        from UltraDict import UltraDict

        return UltraDict(buffer_size=max(1 << 20, n_hint * 64), full_dump_size=max(1 << 20, n_hint * 64))

    def close(self, m: Any) -> None:
        m.unlink()

    def lock_for(self, m: Any) -> Any:
        return m.lock

    def snapshot(self, m: Any) -> dict:
        return dict(m.items())


class SharedMemoryDictSubject(Subject):
    """shared-memory-dict; it has no lock of its own, so counters use an ``mp.Lock``."""

    name, kind, module = "shared-memory-dict", "peer", "shared_memory_dict"

    def make(self, n_hint: int = 0) -> Any:
        from shared_memory_dict import SharedMemoryDict

        self.mlock = FORK.Lock()
        return SharedMemoryDict(name=f"smd{uuid.uuid4().hex[:8]}", size=max(1 << 20, n_hint * 64))

    def close(self, m: Any) -> None:
        m.shm.close()
        m.shm.unlink()

    def lock_for(self, m: Any) -> Any:
        return self.mlock

    def snapshot(self, m: Any) -> dict:
        return dict(m.items())


PEERS = {s.name: s for s in (UltraDictSubject, SharedMemoryDictSubject)}


class PeerProxy(Subject):
    """Runs a peer's workloads in a subprocess of their own: peers have import-time side effects."""

    kind = "peer"

    def __init__(self, cls: type):
        self.cls, self.name = cls, cls.name


def peer_available(cls: type) -> bool:
    import importlib.util

    return importlib.util.find_spec(cls.module) is not None


def run_peer(proxy: PeerProxy, workload: str, p: Params) -> Result:
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "shareit._bench", proxy.name, workload, json.dumps(vars(p))],
        capture_output=True, text=True, timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Result(TITLES.get(workload, workload), proxy.name, note=f"failed: {tail[:120]}")
    return Result(**json.loads(lines[-1]))


def subjects(backends: list[str], peers: bool = True, url: str | None = None) -> list[Subject]:
    out: list[Subject] = [DictSubject(), ManagerSubject(), ManagerSubject(lock=False), ValueSubject()]
    if peers:
        out += [PeerProxy(cls) for cls in PEERS.values() if peer_available(cls)]
    return out + [ShareitSubject(b, url) for b in backends]


# --------------------------------------------------------------------------- timing


def _rate(fn: Callable[[int], None], min_time: float, repeats: int) -> tuple[float, list]:
    """Median ops/s of ``fn(n)`` (n ops), n grown until one run takes ``min_time``."""
    n = 16
    while True:
        t0 = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= 1 << 24:
            break
        n = int(n * max(2.0, min(min_time / max(dt, 1e-9) * 1.2, 100.0)))
    samples = [n / dt]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        fn(n)
        samples.append(n / (time.perf_counter() - t0))
    return statistics.median(samples), samples


def _parallel(nprocs: int, target: Callable[[int], None]) -> float:
    """Wall seconds for ``nprocs`` forked children to each run ``target(i)``, started together."""
    barrier = FORK.Barrier(nprocs + 1)

    def child(i: int) -> None:
        barrier.wait(60)
        target(i)

    procs = [FORK.Process(target=child, args=(i,)) for i in range(nprocs)]
    for p in procs:
        p.start()
    barrier.wait(60)
    t0 = time.perf_counter()
    for p in procs:
        p.join(600)
    dt = time.perf_counter() - t0
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"benchmark child failed with exit codes {bad}")
    return dt


# --------------------------------------------------------------------------- workloads


@dataclass
class Params:
    procs: int = 2
    repeats: int = 5
    min_time: float = 0.2
    incr_per_proc: int = 20_000
    bulk_keys: int = 100_000
    propagation_changes: int = 1000


def _w_get(s: Subject, p: Params, workload: str, dict_values: bool) -> Result:
    m = s.make()
    try:
        for i in range(100):
            m[f"key{i:04d}"] = {"x": i, "tag": "t"} if dict_values else i
        key = "key0042"

        def run(n: int) -> None:
            for _ in range(n):
                m[key]

        rate, samples = _rate(run, p.min_time, p.repeats)
        return Result(workload, s.name, rate, samples=samples)
    finally:
        s.close(m)


def w_get(s: Subject, p: Params) -> Result:
    """Read an existing str key holding an int."""
    return _w_get(s, p, "get", dict_values=False)


def w_get_dict(s: Subject, p: Params) -> Result:
    """Read an existing str key holding a small dict: by-value backends copy it on every read."""
    return _w_get(s, p, "get dict", dict_values=True)


def w_read_counter(s: Subject, p: Params) -> Result:
    """Read a counter: raw ``Value.value`` takes its lock; shareit backends read lock-free."""
    m = s.make()
    try:
        read = getattr(s, "read", None)
        if read is None:
            m["hot"] = 0

        def run(n: int) -> None:
            if read is not None:
                v = m["hot"]
                for _ in range(n):
                    v.value
            else:
                for _ in range(n):
                    m["hot"]

        rate, samples = _rate(run, p.min_time, p.repeats)
        return Result("read counter", s.name, rate, samples=samples)
    finally:
        s.close(m)


def w_set(s: Subject, p: Params) -> Result:
    m = s.make()
    try:
        def run(n: int) -> None:
            for i in range(n):
                m[f"key{i & 1023:04d}"] = i

        rate, samples = _rate(run, p.min_time, p.repeats)
        return Result("set", s.name, rate, samples=samples)
    finally:
        s.close(m)


def _counter(s: Subject, p: Params, workload: str, own_key: bool) -> Result:
    per = p.incr_per_proc
    samples, exact = [], True
    for _ in range(p.repeats):
        m = s.make()
        try:
            keys = [f"c{i}" if own_key else "hot" for i in range(p.procs)]
            if s.values == "any" or not isinstance(m, dict):
                for k in set(keys):
                    m[k] = 0

            def work(i: int) -> None:
                key = keys[i]
                for _ in range(per):
                    s.incr(m, key)

            dt = _parallel(p.procs, work)
            read = getattr(s, "read", None)
            totals = [read(m, k) if read else m[k] for k in set(keys)]
            want = per * p.procs
            exact = exact and sum(totals) == want
            samples.append(want / dt)
        finally:
            s.close(m)
    return Result(workload, s.name, statistics.median(samples), exact=exact, samples=samples,
                  note=f"{p.procs} procs x {per}")


def w_incr(s: Subject, p: Params) -> Result:
    return _counter(s, p, "incr (hot key)", own_key=False)


def w_counters(s: Subject, p: Params) -> Result:
    return _counter(s, p, "incr (own key)", own_key=True)


def _calibrated_ops(work: Callable[[int], None], min_time: float) -> int:
    """Operations per process so that a parallel run lasts about ``min_time`` seconds
    (a fixed count would let process start and exit dominate for fast subjects)."""
    n = 256
    while True:
        t0 = time.perf_counter()
        work(0, n)
        dt = time.perf_counter() - t0
        if dt >= 0.02 or n >= 1 << 22:
            return max(256, int(n * min_time / max(dt, 1e-9)))
        n *= 4


def _parallel_workload(s: Subject, p: Params, name: str,
                       loop: Callable[[Any, list, int, int], None]) -> Result:
    """``p.procs`` processes each run ``loop(m, keys, i, ops)`` over 100 existing keys at once."""
    samples = []
    m = s.make()
    try:
        keys = [f"key{j:02d}" for j in range(100)]
        for j, k in enumerate(keys):
            m[k] = j
        ops = _calibrated_ops(lambda i, n: loop(m, keys, i, n), p.min_time)
        for _ in range(p.repeats):
            samples.append(ops * p.procs / _parallel(p.procs, lambda i: loop(m, keys, i, ops)))
    finally:
        s.close(m)
    return Result(name, s.name, statistics.median(samples), samples=samples, note=f"{p.procs} procs")


def _reads(m: Any, keys: list, i: int, ops: int) -> None:
    for j in range(ops):
        m[keys[(j + i) % 100]]


def _reads_and_writes(m: Any, keys: list, i: int, ops: int) -> None:
    for j in range(ops):
        k = keys[(j * 7 + i) % 100]
        if j % 10 == 0:
            m[k] = j
        else:
            m[k]


def w_get_parallel(s: Subject, p: Params) -> Result:
    """N processes reading existing keys at once (read-heavy)."""
    return _parallel_workload(s, p, "get xN", _reads)


def w_mixed(s: Subject, p: Params) -> Result:
    """N processes, 90 % get / 10 % set over 100 keys."""
    return _parallel_workload(s, p, "mixed 90/10", _reads_and_writes)


def w_edit(s: Subject, p: Params) -> Result:
    m = s.make()
    try:
        m["cfg"] = {"x": 0, "name": "cfg", "tags": ["a", "b"]}

        def run(n: int) -> None:
            for _ in range(n):
                s.edit(m, "cfg")

        rate, samples = _rate(run, p.min_time, p.repeats)
        return Result("nested edit", s.name, rate, samples=samples)
    finally:
        s.close(m)


def w_snapshot(s: Subject, p: Params) -> Result:
    """Snapshot of ``bulk_keys`` int -> float keys, taken from another process."""
    m = s.make(p.bulk_keys)
    try:
        s.bulk_build(m, {i: float(i) for i in range(p.bulk_keys)})
        out = FORK.Array("d", p.repeats)

        def work(i: int) -> None:
            for r in range(p.repeats):
                t0 = time.perf_counter()
                snap = s.snapshot(m)
                out[r] = time.perf_counter() - t0
                assert len(snap) == p.bulk_keys

        _parallel(1, work)
        samples = [p.bulk_keys / t for t in out]
        return Result("snapshot 100k", s.name, statistics.median(samples), samples=samples,
                      seconds=statistics.median(out), note=f"{p.bulk_keys} keys, keys/s")
    finally:
        s.close(m)


def w_build(s: Subject, p: Params) -> Result:
    """Build a ``bulk_keys`` int -> float mapping in one update."""
    data = {i: float(i) for i in range(p.bulk_keys)}
    samples = []
    for _ in range(p.repeats):
        m = s.make(p.bulk_keys)
        try:
            t0 = time.perf_counter()
            s.bulk_build(m, data)
            samples.append(p.bulk_keys / (time.perf_counter() - t0))
        finally:
            s.close(m)
    return Result("build 100k", s.name, statistics.median(samples), samples=samples,
                  note="keys/s, one update()")


def w_bulk_numeric(s: Subject, p: Params) -> Result:
    """All ``bulk_keys`` float values as a numpy array, read from another process."""
    import numpy as np

    numeric = isinstance(s, ShareitSubject)
    m = s.make(p.bulk_keys, value_type="float64") if numeric else s.make(p.bulk_keys)
    try:
        s.bulk_build(m, {i: float(i) for i in range(p.bulk_keys)})
        out = FORK.Array("d", p.repeats)

        def work(i: int) -> None:
            for r in range(p.repeats):
                t0 = time.perf_counter()
                if numeric:
                    arr = m.values_array()
                else:
                    arr = np.fromiter(s.snapshot(m).values(), dtype=float, count=p.bulk_keys)
                out[r] = time.perf_counter() - t0
                assert len(arr) == p.bulk_keys

        _parallel(1, work)
        samples = [p.bulk_keys / t for t in out]
        return Result("bulk numeric 100k", s.name, statistics.median(samples), samples=samples,
                      seconds=statistics.median(out), note="values/s into numpy")
    finally:
        s.close(m)


def w_propagation(s: Subject, p: Params) -> Result:
    """Time from a set in one process until another process reads the new value.

    The writer waits for the reader's acknowledgement before the next change,
    so changes never coalesce; ``time.perf_counter`` is the same clock in
    every process on Linux. Reports p50 (as ops/s = 1/p50, for the chart) and p99.
    """
    n = p.propagation_changes
    m = s.make()
    try:
        m["p"] = (-1, 0.0)
        lat = FORK.Array("d", n, lock=False)
        reader_end, writer_end = FORK.Pipe()

        def reader(_: int) -> None:
            for i in range(n):
                while True:
                    seen, sent = m["p"]
                    if seen == i:
                        lat[i] = time.perf_counter() - sent
                        break
                reader_end.send(i)

        ctx_proc = FORK.Process(target=reader, args=(0,))
        ctx_proc.start()
        for i in range(n):
            m["p"] = (i, time.perf_counter())
            if not writer_end.poll(60):
                raise RuntimeError("the reader never saw the change")
            writer_end.recv()
        ctx_proc.join(60)
        xs = sorted(lat)
        p50, p99 = xs[len(xs) // 2], xs[min(len(xs) - 1, int(len(xs) * 0.99))]
        return Result("propagation", s.name, 1 / p50, seconds=p50, samples=[p50, p99],
                      note=f"p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us over {n} changes")
    finally:
        s.close(m)


def w_attach(s: Subject, p: Params) -> Result:
    """Time for another process to attach by name to a ``bulk_keys`` mapping and read a key."""
    m = s.make(p.bulk_keys)
    try:
        s.bulk_build(m, {i: float(i) for i in range(p.bulk_keys)})
        out = FORK.Array("d", p.repeats)
        name, backend = m.name, m.backend

        def work(i: int) -> None:
            for r in range(p.repeats):
                t0 = time.perf_counter()
                url = {"url": s.url} if getattr(s, "url", None) and backend == "redis" else {}
                a = shareit.open(name, backend=backend, create=False, **url)
                a[7]
                out[r] = time.perf_counter() - t0
                a.close()

        _parallel(1, work)
        secs = statistics.median(out)
        return Result("attach 100k", s.name, 1 / secs, seconds=secs, samples=list(out),
                      note="attaches/s")
    finally:
        s.close(m)


#: workload name -> (function, which subjects it applies to)
WORKLOADS: dict[str, tuple[Callable[[Subject, Params], Result], Callable[[Subject], bool]]] = {
    "get": (w_get, lambda s: s.values == "any"),
    "getdict": (w_get_dict, lambda s: s.values == "any" and "no lock" not in s.name),
    "counter": (w_read_counter, lambda s: s.name == "Value+get_lock" or s.kind == "shareit"),
    "getN": (w_get_parallel, lambda s: s.shared and s.values == "any" and "no lock" not in s.name),
    "set": (w_set, lambda s: s.values == "any"),
    "mixed": (w_mixed, lambda s: s.shared and s.values == "any" and "no lock" not in s.name),
    "incr": (w_incr, lambda s: s.shared),
    "counters": (w_counters, lambda s: s.shared),
    "edit": (w_edit, lambda s: s.values == "any" and "no lock" not in s.name),
    "snapshot": (w_snapshot, lambda s: s.shared and s.values == "any" and "no lock" not in s.name),
    "build": (w_build, lambda s: s.shared and s.values == "any" and "no lock" not in s.name),
    "bulk": (w_bulk_numeric, lambda s: (s.kind == "baseline" and s.name == "Manager().dict()")
             or (s.kind == "shareit" and hasattr(registry_class(s.name), "values_array")
                 and not registry_class(s.name).capabilities.fixed_keys)),
    "propagation": (w_propagation, lambda s: s.shared and s.values == "any" and "no lock" not in s.name),
    "attach": (w_attach, lambda s: s.kind == "shareit" and s.values == "any"
               and shareit.backends()[s.name].get("attach_by_name", False)),
}


#: workload name -> the title its results carry (a failed peer's row goes under it too)
TITLES = {
    "get": "get", "getdict": "get dict", "counter": "read counter", "getN": "get xN",
    "set": "set", "mixed": "mixed 90/10", "incr": "incr (hot key)", "counters": "incr (own key)",
    "edit": "nested edit", "snapshot": "snapshot 100k", "build": "build 100k",
    "bulk": "bulk numeric 100k", "propagation": "propagation", "attach": "attach 100k",
}
assert TITLES.keys() == WORKLOADS.keys()


def registry_class(backend: str) -> type:
    from . import registry

    return registry.load(backend)


def _peer_main(argv: list[str]) -> None:
    """``python -m shareit._bench PEER WORKLOAD PARAMS``: one workload on one peer, as JSON."""
    import json

    peer, workload, params = argv
    result = WORKLOADS[workload][0](PEERS[peer](), Params(**json.loads(params)))
    print(json.dumps(vars(result)))


if __name__ == "__main__":
    import sys

    _peer_main(sys.argv[1:])
