"""What each workload of ``shareit bench`` does to a subject, and what it measures.

Every function takes the subject, the run's :class:`~.workloads.Params`, the
size ``n`` and the number of processes ``procs`` of its row, and returns a
:class:`Measured` in the workload's unit. Setup (filling, building) is never
timed; counters check that every increment landed.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .subjects import FORK, Cap, ShareitSubject, Subject
from .timing import calibrate, median, parallel, per_process, rate, timed

if TYPE_CHECKING:
    from .workloads import Params


@dataclass
class Measured:
    value: float                 # in the workload's unit
    samples: list[float]
    exact: bool | None = None    # counters: did every increment land?
    note: str = ""


def _rate(samples: list[float], note: str = "") -> Measured:
    return Measured(median(samples), samples, note=note)


def _filled(s: Subject, keys: list[str], value: Callable[[int], Any] = lambda i: i) -> Any:
    m = s.make()
    s.bulk_build(m, {k: value(i) for i, k in enumerate(keys)})
    return m


KEYS = [f"key{i:04d}" for i in range(1024)]


def _hot_get(s: Subject, p: Params, value: Callable[[int], Any]) -> Measured:
    """One key read over and over, in a mapping of 100 keys holding ``value(i)``."""
    m = _filled(s, KEYS[:100], value)
    try:
        def run(k: int) -> None:
            for _ in range(k):
                m["key0042"]
        return _rate(rate(timed(run), p.min_time, p.repeats))
    finally:
        s.close(m)


def w_get(s: Subject, p: Params, n: int, procs: int) -> Measured:
    return _hot_get(s, p, lambda i: i)


def w_get_dict(s: Subject, p: Params, n: int, procs: int) -> Measured:
    return _hot_get(s, p, lambda i: {"x": i, "tag": "t"})


def w_get_spread(s: Subject, p: Params, n: int, procs: int) -> Measured:
    """Reads cycling over ``n`` distinct keys: no per-process cache holds them all for free."""
    keys = [f"k{i}" for i in range(n)]
    m = s.make(n)
    try:
        s.bulk_build(m, dict.fromkeys(keys, 1))
        it = itertools.cycle(keys)

        def run(k: int) -> None:
            for _ in range(k):
                m[next(it)]
        return _rate(rate(timed(run), p.min_time, p.repeats))
    finally:
        s.close(m)


def w_read_counter(s: Subject, p: Params, n: int, procs: int) -> Measured:
    m = s.make()
    try:
        s.set_counter(m, "hot", 0)

        def run(k: int) -> None:
            for _ in range(k):
                s.read(m, "hot")
        return _rate(rate(timed(run), p.min_time, p.repeats))
    finally:
        s.close(m)


def _sets(s: Subject, p: Params, value: Callable[[int], Any]) -> Measured:
    m = _filled(s, KEYS)
    try:
        def run(k: int) -> None:
            for i in range(k):
                m[KEYS[i & 1023]] = value(i)
        return _rate(rate(timed(run), p.min_time, p.repeats))
    finally:
        s.close(m)


STRS = [f"value {i:02d} of thirty-two chars." for i in range(16)]


def w_set(s: Subject, p: Params, n: int, procs: int) -> Measured:
    return _sets(s, p, lambda i: i)


def w_set_str(s: Subject, p: Params, n: int, procs: int) -> Measured:
    return _sets(s, p, lambda i: STRS[i & 15])


def w_set_new(s: Subject, p: Params, n: int, procs: int) -> Measured:
    m = s.make()
    base = itertools.count()
    try:
        def run(k: int) -> None:
            b = next(base) << 32
            for i in range(b, b + k):
                m[f"n{i}"] = i
        return _rate(rate(timed(run), p.min_time, p.repeats))
    finally:
        s.close(m)


def w_del(s: Subject, p: Params, n: int, procs: int) -> Measured:
    m = s.make()
    base = itertools.count()
    try:
        def step(k: int) -> float:
            b = next(base) << 32
            keys = [f"d{i}" for i in range(b, b + k)]
            s.bulk_build(m, dict.fromkeys(keys, 0))  # not timed: only the deletes are
            t0 = time.perf_counter()
            for key in keys:
                del m[key]
            return time.perf_counter() - t0
        return _rate(rate(step, p.min_time, p.repeats, max_ops=100_000))
    finally:
        s.close(m)


def w_edit(s: Subject, p: Params, n: int, procs: int) -> Measured:
    m = _filled(s, ["cfg"], lambda i: {"x": 0, "name": "cfg", "tags": ["a", "b"]})
    try:
        def run(k: int) -> None:
            for _ in range(k):
                s.edit(m, "cfg")
        return _rate(rate(timed(run), p.min_time, p.repeats))
    finally:
        s.close(m)


def w_mixed(s: Subject, p: Params, n: int, procs: int) -> Measured:
    """``procs`` processes at once, each 90 % get / 10 % set over 100 keys."""
    keys = KEYS[:100]
    m = _filled(s, keys)

    def loop(i: int, ops: int) -> None:
        for j in range(ops):
            k = keys[(j * 7 + i) % 100]
            if j % 10 == 0:
                m[k] = j
            else:
                m[k]
    try:
        ops = per_process(calibrate(lambda k: loop(0, k), p.min_time), procs)
        samples = [ops * procs / parallel(procs, lambda i: loop(i, ops)) for _ in range(p.repeats)]
        return _rate(samples)
    finally:
        s.close(m)


def _counters(s: Subject, p: Params, procs: int, own_key: bool) -> Measured:
    keys = [f"c{i % 8}" if own_key else "hot" for i in range(procs)]
    m = s.make()
    samples, exact = [], True
    try:
        def reset() -> None:
            for k in set(keys):
                s.set_counter(m, k, 0)
        reset()
        def incrs(key: str, k: int) -> None:
            for _ in range(k):
                s.incr(m, key)
        ops = per_process(calibrate(lambda k: incrs(keys[0], k), p.min_time), procs)
        for _ in range(p.repeats):
            reset()
            dt = parallel(procs, lambda i: incrs(keys[i], ops))
            exact = exact and sum(s.read(m, k) for k in set(keys)) == ops * procs
            samples.append(ops * procs / dt)
        return Measured(median(samples), samples, exact=exact)
    finally:
        s.close(m)


def w_incr(s: Subject, p: Params, n: int, procs: int) -> Measured:
    return _counters(s, p, procs, own_key=False)


def w_incr_own(s: Subject, p: Params, n: int, procs: int) -> Measured:
    return _counters(s, p, procs, own_key=True)


def _from_child(p: Params, one: Callable[[], None]) -> list[float]:
    """Seconds of ``repeats`` calls of ``one()`` in a forked child (a reader that did not write)."""
    out = FORK.Array("d", p.repeats)

    def work(_: int) -> None:
        for r in range(p.repeats):
            t0 = time.perf_counter()
            one()
            out[r] = time.perf_counter() - t0
    parallel(1, work)
    return [float(t) for t in out[:]]


def _floats(n: int) -> dict[Any, Any]:
    return {i: float(i) for i in range(n)}


def w_snapshot(s: Subject, p: Params, n: int, procs: int) -> Measured:
    m = s.make(n)
    try:
        s.bulk_build(m, _floats(n))

        def one() -> None:
            if len(s.snapshot(m)) != n:
                raise AssertionError("snapshot has the wrong size")
        return _rate([n / t for t in _from_child(p, one)])
    finally:
        s.close(m)


def w_build(s: Subject, p: Params, n: int, procs: int) -> Measured:
    data, samples = _floats(n), []
    for _ in range(p.repeats):
        m = s.make(n)
        try:
            t0 = time.perf_counter()
            s.bulk_build(m, data)
            samples.append(n / (time.perf_counter() - t0))
        finally:
            s.close(m)
    return _rate(samples)


def w_numeric(s: Subject, p: Params, n: int, procs: int) -> Measured:
    import numpy as np

    bulk = Cap.NUMPY_BULK in s.caps
    m = s.make(n, value_type="float64") if bulk else s.make(n)
    try:
        s.bulk_build(m, _floats(n))

        def one() -> None:
            arr = (m.values_array() if bulk
                   else np.fromiter(s.snapshot(m).values(), dtype=float, count=n))
            if len(arr) != n:
                raise AssertionError("array has the wrong size")
        return _rate([n / t for t in _from_child(p, one)],
                     "values_array()" if bulk else "snapshot, then np.fromiter")
    finally:
        s.close(m)


def w_propagation(s: Subject, p: Params, n: int, procs: int) -> Measured:
    """A set in one process until another process reads it; the writer waits for the
    reader's acknowledgement, so changes never coalesce. p50 in µs; p99 in the note."""
    changes = p.propagation_changes
    m = _filled(s, ["p"], lambda i: (-1, 0.0))
    try:
        lat = FORK.Array("d", changes, lock=False)
        reader_end, writer_end = FORK.Pipe()

        def reader() -> None:
            try:
                for i in range(changes):
                    while True:
                        seen, sent = m["p"]
                        if seen == i:
                            lat[i] = time.perf_counter() - sent
                            break
                    reader_end.send(i)
            except Exception as exc:
                reader_end.send(f"the reading process failed: {type(exc).__name__}: {exc}")

        proc = FORK.Process(target=reader)
        proc.start()
        try:
            for i in range(changes):
                m["p"] = (i, time.perf_counter())
                if not writer_end.poll(30):
                    raise RuntimeError("the reading process did not see the change in 30 s")
                got = writer_end.recv()
                if got != i:
                    raise RuntimeError(got)
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        xs = sorted(lat)
        p50, p99 = xs[len(xs) // 2] * 1e6, xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e6
        return Measured(p50, [p50, p99], note=f"p99 {p99:,.0f} µs, {changes:,} changes")
    finally:
        s.close(m)


def w_attach(s: Subject, p: Params, n: int, procs: int) -> Measured:
    import shareit

    assert isinstance(s, ShareitSubject)
    m = s.make(n)
    try:
        s.bulk_build(m, _floats(n))

        def one() -> None:
            a = shareit.open(m.name, backend=m.backend, create=False, **s.options())
            a[7]
            a.close()
        ms = [t * 1e3 for t in _from_child(p, one)]
        return Measured(median(ms), ms)
    finally:
        s.close(m)
