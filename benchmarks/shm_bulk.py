"""shm's numeric bulk access against Manager's bulk calls, 100,000 int -> float keys.

Run: python benchmarks/shm_bulk.py
Medians of 7 repeats, in one process, interleaved: set_many (new keys, then
existing keys), get_many and values_array on shm; update() and copy() of a
raw Manager().dict() of the same data.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

import numpy as np

import shareit

N = 100_000
REPEATS = 7


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    keys = np.arange(N)
    values = np.arange(N, dtype=np.float64)
    as_dict = dict(zip(keys.tolist(), values.tolist()))
    manager = mp.Manager()
    times: dict[str, list[float]] = {}
    try:
        for _ in range(REPEATS):
            md = manager.dict()
            times.setdefault("Manager update (new keys)", []).append(
                timed(lambda md=md: md.update(as_dict)))
            times.setdefault("Manager copy", []).append(timed(md.copy))
            d = shareit.open(backend="shm", value_type="float64")
            try:
                times.setdefault("shm set_many (new keys)", []).append(
                    timed(lambda d=d: d.set_many(keys, values)))
                times.setdefault("shm set_many (existing keys)", []).append(
                    timed(lambda d=d: d.set_many(keys, values + 1)))
                times.setdefault("shm get_many", []).append(timed(lambda d=d: d.get_many(keys)))
                times.setdefault("shm values_array", []).append(timed(d.values_array))
            finally:
                d.close()
    finally:
        manager.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{N:,} int -> float keys, median of {REPEATS}")
    for name, t in med.items():
        writes = "set" in name or "update" in name
        base = med["Manager update (new keys)"] if writes else med["Manager copy"]
        print(f"  {name:30s} {t * 1e3:8.1f} ms   {base / t:6.1f}x the Manager call")


if __name__ == "__main__":
    main()
