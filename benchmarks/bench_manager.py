"""The manager backend against the raw stdlib it replaces, interleaved in one process.

get and set: shareit's manager vs a raw ``Manager().dict()`` (issue: at most
1.2x its cost). incr: 2 processes x 20,000 on one key, shareit's ``incr`` vs
the stdlib recipe ``with lock: d[k] += 1`` (a ``Manager().dict()`` and an
``mp.Lock``; issue: at least 2x faster). Each repeat measures both subjects
back to back, so the machine's noise hits both alike; medians are reported.

    python benchmarks/bench_manager.py [repeats]
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time

import shareit
from shareit.bench.timing import parallel as _parallel

FORK = mp.get_context("fork")
N_GETSET = 20_000
N_INCR = 20_000


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t0)


def parallel_incr(target, procs: int = 2) -> float:
    """ops/s of ``procs`` forked processes each running ``target(N_INCR)``, started together."""
    return procs * N_INCR / _parallel(procs, lambda i: target(N_INCR))


def main(repeats: int = 5) -> None:
    manager = FORK.Manager()
    raw, lock = manager.dict(), FORK.Lock()
    ours = shareit.open(backend="manager")
    raw["k"] = ours["k"] = 1
    names = ("raw get", "ours get", "raw set", "ours set", "raw incr", "ours incr")
    samples: dict[str, list[float]] = {k: [] for k in names}

    def raw_get(n):
        for _ in range(n):
            raw["k"]

    def ours_get(n):
        for _ in range(n):
            ours["k"]

    def raw_set(n):
        for i in range(n):
            raw["k"] = i

    def ours_set(n):
        for i in range(n):
            ours["k"] = i

    def raw_incr(n):
        for _ in range(n):
            with lock:
                raw["c"] += 1

    def ours_incr(n):
        for _ in range(n):
            ours.incr("c")

    exact = True
    for _ in range(repeats):
        samples["raw get"].append(rate(raw_get, N_GETSET))
        samples["ours get"].append(rate(ours_get, N_GETSET))
        samples["raw set"].append(rate(raw_set, N_GETSET))
        samples["ours set"].append(rate(ours_set, N_GETSET))
        raw["c"] = ours["c"] = 0
        samples["raw incr"].append(parallel_incr(raw_incr))
        samples["ours incr"].append(parallel_incr(ours_incr))
        exact = exact and raw["c"] == ours["c"] == 2 * N_INCR
    med = {k: statistics.median(v) for k, v in samples.items()}
    for k in samples:
        print(f"{k:<10} {med[k]:>12,.0f} ops/s   samples {[round(x) for x in samples[k]]}")
    print(f"\nget:  shareit manager costs {med['raw get'] / med['ours get']:.2f}x "
          "a raw Manager().dict() get")
    print(f"set:  shareit manager costs {med['raw set'] / med['ours set']:.2f}x "
          "a raw Manager().dict() set")
    print(f"incr: shareit manager is {med['ours incr'] / med['raw incr']:.1f}x faster than "
          "Manager + mp.Lock "
          f"(2 processes x {N_INCR}); totals exact: {exact}")
    ours.close()
    manager.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
