"""Why shm's snapshot() of 100,000 int -> float keys is not 3x Manager's copy().

Both end in the same work: a process creating 100,000 int and float objects
and a plain dict of them, in memory it has not touched before. This measures,
in a fresh child process each time (as a reader would), medians of 9:

- Manager().dict().copy() of the data;
- shm snapshot() of the same data;
- the floor for any snapshot that returns a plain dict: building it from two
  numpy arrays that are already in the process (no lock, no shared memory);
- pickle.loads of the dict (what Manager's client pays on its side).

    python benchmarks/shm_snapshot_floor.py
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import statistics
import time

import numpy as np

import shareit

N = 100_000
REPEATS = 9
FORK = mp.get_context("fork")


def in_child(fn) -> float:
    """Seconds ``fn`` takes in a freshly forked process."""
    out = FORK.Value("d", 0.0)

    def run() -> None:
        t0 = time.perf_counter()
        fn()
        out.value = time.perf_counter() - t0

    p = FORK.Process(target=run)
    p.start()
    p.join(60)
    if p.exitcode != 0:
        raise RuntimeError(f"child failed: {p.exitcode}")
    return out.value


def main() -> None:
    data = {i: float(i) for i in range(N)}
    keys, values = np.arange(N), np.arange(N, dtype=np.float64)
    blob = pickle.dumps(data, pickle.HIGHEST_PROTOCOL)
    manager = mp.Manager()
    md = manager.dict(data)
    d = shareit.open(backend="shm", value_type="float64")
    d.set_many(keys, values)
    cases = {
        "Manager copy()": md.copy,
        "shm snapshot()": d.snapshot,
        "floor: dict from two numpy arrays": lambda: dict(zip(keys.tolist(), values.tolist())),
        "pickle.loads of the dict": lambda: pickle.loads(blob),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(REPEATS):
            for name, fn in cases.items():
                times[name].append(in_child(fn))
    finally:
        d.close()
        manager.shutdown()
    base = statistics.median(times["Manager copy()"])
    print(f"{N:,} int -> float keys, each in a fresh child process, median of {REPEATS}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:36s} {t * 1e3:7.2f} ms   {base / t:5.2f}x Manager copy()")


if __name__ == "__main__":
    main()
