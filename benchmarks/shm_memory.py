"""Bytes per entry of the shm table beyond its key and value bytes (issue: <= 64).

1,000,000 keys of 16-byte str -> float64, inserted one by one (so the table
grows from its smallest size), then half of the keys deleted and inserted
again. Segment sizes are read with os.stat: what /dev/shm really holds.

    python benchmarks/shm_memory.py [N]
"""

from __future__ import annotations

import os
import sys
import time

import shareit
from shareit.backends.shm.segments import all_paths

KEY_BYTES, VALUE_BYTES = 16, 8


def footprint(d) -> dict:
    seg = d._seg
    paths = all_paths(seg)
    total = sum(os.stat(p).st_size for p in paths)
    n = len(d)
    return {"keys": n, "segment_bytes": total,
            "bytes_per_entry": round(total / n, 1),
            "overhead_per_entry": round(total / n - KEY_BYTES - VALUE_BYTES, 1),
            **{k: v for k, v in d.info().items() if k in ("capacity", "index_slots", "heap_bytes")}}


def main(n: int = 1_000_000) -> None:
    d = shareit.open(backend="shm", value_type="float64")
    try:
        keys = [f"key-{i:012d}" for i in range(n)]
        assert all(len(k) == KEY_BYTES for k in keys[:10])
        t0 = time.perf_counter()
        for i, k in enumerate(keys):
            d[k] = float(i)
        grown = footprint(d)
        grown["seconds"] = round(time.perf_counter() - t0, 2)
        print("after growth:       ", grown)
        for k in keys[::2]:
            del d[k]
        print("after deleting half:", footprint(d))
        for i, k in enumerate(keys[::2]):
            d[k] = float(i)
        print("after re-inserting: ", footprint(d))
        assert len(d) == n
    finally:
        d.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
