"""How ``shareit bench`` times things: medians of repeats, parallel runs of forked children.

Every figure is a median of ``repeats`` runs, each long enough (``min_time``)
that the clock's resolution and the loop's start do not matter. A child that
fails sends its exception's text back, so the failure row says what went
wrong rather than "exit code 1".
"""

from __future__ import annotations

import os
import statistics
import time
import traceback
from collections.abc import Callable

from .subjects import FORK

MAX_OPS = 1 << 24


def rate(step: Callable[[int], float], min_time: float, repeats: int,
         max_ops: int = MAX_OPS) -> list[float]:
    """Rates (ops/s) of ``repeats`` runs of ``step(n)``, which does ``n`` ops and returns the
    seconds they took; ``n`` grows until one run lasts ``min_time`` (or reaches ``max_ops``,
    for a step whose untimed setup grows with ``n``)."""
    n = 4  # a slow subject (a few ops/s at 100k keys) must not take seconds to calibrate
    while True:
        dt = step(n)
        if dt >= min_time or n >= max_ops:
            break
        n = min(max_ops, int(n * max(2.0, min(min_time / max(dt, 1e-9) * 1.2, 100.0))))
    samples = [n / dt]
    for _ in range(repeats - 1):
        samples.append(n / step(n))
    return samples


def timed(fn: Callable[[int], object]) -> Callable[[int], float]:
    """``fn(n)`` as a step for :func:`rate`: the whole call is timed."""
    def step(n: int) -> float:
        t0 = time.perf_counter()
        fn(n)
        return time.perf_counter() - t0
    return step


def calibrate(work: Callable[[int], object], target: float) -> int:
    """How many ops one process does in about ``target`` seconds (at least 64)."""
    n = 64
    while True:
        t0 = time.perf_counter()
        work(n)
        dt = time.perf_counter() - t0
        if dt >= min(0.02, target / 2) or n >= MAX_OPS:
            return max(64, int(n * target / max(dt, 1e-9)))
        n *= 4


def per_process(ops: int, procs: int) -> int:
    """Ops for each of ``procs`` processes so that a parallel run lasts about as long as
    ``ops`` in one process: with more processes than cores they take turns."""
    cores = os.cpu_count() or 1
    return max(64, ops * cores // procs) if procs > cores else ops


class ChildFailed(RuntimeError):
    pass


def parallel(nprocs: int, target: Callable[[int], None], timeout: float = 20) -> float:
    """Wall seconds for ``nprocs`` forked children to each run ``target(i)``, started together.

    Raises :class:`ChildFailed` with the first child's exception text if any fails."""
    barrier = FORK.Barrier(nprocs + 1)
    recv, send = FORK.Pipe(duplex=False)

    def child(i: int) -> None:
        try:
            barrier.wait(60)
            target(i)
        except BaseException as exc:
            send.send(f"{type(exc).__name__}: {exc}".strip() or traceback.format_exc(limit=1))
            raise SystemExit(1) from None

    procs = [FORK.Process(target=child, args=(i,)) for i in range(nprocs)]
    for p in procs:
        p.start()
    send.close()
    try:
        barrier.wait(60)
    except Exception:  # a child died before the start: its reason is in the pipe
        pass
    t0 = time.perf_counter()
    for p in procs:
        p.join(max(1.0, timeout - (time.perf_counter() - t0)))
    dt = time.perf_counter() - t0
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if dt >= timeout:
        raise ChildFailed(f"the processes did not finish within {timeout:.0f} s (killed)")
    if bad:
        why = recv.recv() if recv.poll(0.5) else f"exit codes {bad}"
        raise ChildFailed(f"in a child process: {why}")
    return dt


def median(xs: list[float]) -> float:
    return statistics.median(xs)
