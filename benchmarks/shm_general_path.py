"""shm's general path against UltraDict and lmdb (one transaction per op), in one run.

Run: python benchmarks/shm_general_path.py [--rounds 7] [--n 20000] [--big]

Every op is timed for every subject in the same round, the subjects' order
rotating from round to round, and the medians over the rounds are compared:
the machine is shared and noisy, so only the ratios mean anything. Needs
``pip install lmdb UltraDict`` (a subject whose package is missing is left out).

Ops: a hot key read (cache hit); sets of an existing key to a number, a str,
bytes and a pickled value; sets of new keys; ``del`` and ``pop`` of those keys;
and cold reads of random keys of a table of 100k keys (1M with ``--big``), each
read for the first time in this process, so that no read is a hit in shm's read
cache (the batches of the rounds are disjoint). "trivial" is a Python class whose
``__getitem__`` returns from a dict: the floor of any Python-level mapping. lmdb
stores bytes, so its subject encodes and decodes str values (what a user of it
has to do); its environment is on /dev/shm like shareit's segments.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import shareit

Op = Callable[[int], None]  # run the op n times


class Trivial:
    def __init__(self) -> None:
        self._d: dict[Any, Any] = {}

    def __getitem__(self, key: Any) -> Any:
        return self._d[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._d[key] = value


def mapping_ops(d: Any, vals: list[str], blobs: list[bytes], objs: list[Any],
                fresh: Callable[[], list[str]]) -> dict[str, Op]:
    """The ops on anything dict-like (shm, UltraDict, trivial)."""
    d["hot"], d["num"], d["s"], d["b"], d["o"] = 1, 0, vals[0], blobs[0], objs[0]
    pending: list[list[str]] = []

    def get_hit(n: int) -> None:
        for _ in range(n):
            d["hot"]

    def set_num(n: int) -> None:
        for i in range(n):
            d["num"] = i

    def set_str(n: int) -> None:
        for i in range(n):
            d["s"] = vals[i & 1023]

    def set_bytes(n: int) -> None:
        for i in range(n):
            d["b"] = blobs[i & 1023]

    def set_pickled(n: int) -> None:
        for i in range(n):
            d["o"] = objs[i & 1023]

    def set_new(n: int) -> None:
        keys = fresh()[:n]
        for k in keys:
            d[k] = k
        pending.append(keys)

    def delete(n: int) -> None:
        for k in pending.pop():
            del d[k]

    def set_new_untimed(n: int) -> None:
        set_new(n)

    def pop(n: int) -> None:
        for k in pending.pop():
            d.pop(k)

    return {"get hit": get_hit, "set number": set_num, "set str": set_str,
            "set bytes (100 B)": set_bytes, "set pickled": set_pickled, "set new key": set_new,
            "del": delete, "(insert)": set_new_untimed, "pop": pop}


def lmdb_ops(env: Any, vals: list[str], blobs: list[bytes], objs: list[Any],
             fresh: Callable[[], list[str]]) -> dict[str, Op]:
    begin, dumps = env.begin, pickle.dumps
    with begin(write=True) as txn:
        txn.put(b"hot", b"1")
        txn.put(b"num", b"0")
    pending: list[list[bytes]] = []

    def get_hit(n: int) -> None:
        for _ in range(n):
            with begin() as txn:
                txn.get(b"hot").decode()

    def set_num(n: int) -> None:
        for i in range(n):
            with begin(write=True) as txn:
                txn.put(b"num", str(i).encode())

    def set_str(n: int) -> None:
        for i in range(n):
            with begin(write=True) as txn:
                txn.put(b"s", vals[i & 1023].encode())

    def set_bytes(n: int) -> None:
        for i in range(n):
            with begin(write=True) as txn:
                txn.put(b"b", blobs[i & 1023])

    def set_pickled(n: int) -> None:
        for i in range(n):
            with begin(write=True) as txn:
                txn.put(b"o", dumps(objs[i & 1023]))

    def set_new(n: int) -> None:
        keys = [k.encode() for k in fresh()[:n]]
        for k in keys:
            with begin(write=True) as txn:
                txn.put(k, k)
        pending.append(keys)

    def delete(n: int) -> None:
        for k in pending.pop():
            with begin(write=True) as txn:
                txn.delete(k)

    def pop(n: int) -> None:
        for k in pending.pop():
            with begin(write=True) as txn:
                txn.pop(k).decode()

    return {"get hit": get_hit, "set number": set_num, "set str": set_str,
            "set bytes (100 B)": set_bytes, "set pickled": set_pickled, "set new key": set_new,
            "del": delete, "(insert)": set_new, "pop": pop}


def cold_reads(subject: str, store: Any, rounds_keys: list[list[str]]) -> Op:
    """Reads of random keys, each read for the first time in this process (the batches
    are disjoint), so never a hit in shm's read cache."""
    batches = iter(rounds_keys)
    if subject == "lmdb":
        begin = store.begin

        def run(n: int) -> None:
            for k in next(batches):
                with begin() as txn:
                    txn.get(k.encode()).decode()
        return run

    def run_shm(n: int) -> None:
        d = store
        for k in next(batches):
            d[k]
    return run_shm


def timed(op: Op, n: int) -> float:
    t0 = time.perf_counter()
    op(n)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--big", action="store_true", help="cold reads over 1M keys too")
    args = ap.parse_args()
    n, rounds = args.n, args.rounds
    rnd = random.Random(1)
    vals = [f"value-{i:06d}-{'x' * (i % 13)}" for i in range(1024)]
    blobs = [bytes([i % 256]) * 100 for i in range(1024)]
    objs = [[i, "x", (i, 2.5)] for i in range(1024)]
    counter = iter(range(10**9))

    def fresh() -> list[str]:
        c = next(counter)
        return [f"new{c}-{i}" for i in range(n)]

    tmp = tempfile.mkdtemp(prefix="shareit-bench-", dir="/dev/shm")
    subjects: dict[str, dict[str, Op]] = {}
    closers: list[Callable[[], None]] = []
    name = f"bench-{uuid.uuid4().hex[:8]}"
    shm = shareit.open(name, backend="shm")
    closers.append(shm.destroy)
    subjects["shm"] = mapping_ops(shm, vals, blobs, objs, fresh)
    try:
        from UltraDict import UltraDict

        ud = UltraDict(name=f"ud{uuid.uuid4().hex[:8]}", create=True, auto_unlink=True)
        subjects["UltraDict"] = mapping_ops(ud, vals, blobs, objs, fresh)
        closers.append(ud.unlink)
    except ImportError:
        print("(UltraDict is not installed: left out)")
    env = None
    try:
        import lmdb

        env = lmdb.open(os.path.join(tmp, "db"), map_size=4 << 30)
        subjects["lmdb"] = lmdb_ops(env, vals, blobs, objs, fresh)
        closers.append(env.close)
    except ImportError:
        print("(lmdb is not installed: left out)")
    trivial = Trivial()
    subjects["trivial"] = {"get hit": mapping_ops(trivial, vals, blobs, objs, fresh)["get hit"]}

    # cold reads: tables of 100k (and 1M) str keys -> short str values
    sizes = [100_000] + ([1_000_000] if args.big else [])
    for size in sizes:
        keys = [f"key{i:07d}" for i in range(size)]
        shuffled = rnd.sample(keys, min(size, n * rounds))
        batches = [shuffled[i * n : (i + 1) * n] for i in range(rounds)]
        cname = f"{name}-{size}"
        big = shareit.open(cname, backend="shm")
        big.update({k: k for k in keys})
        closers.append(big.destroy)
        label = f"get cold, {size // 1000}k keys"
        subjects["shm"][label] = cold_reads("shm", big, batches)
        if env is not None:
            lenv = lmdb.open(os.path.join(tmp, f"cold{size}"), map_size=4 << 30)
            with lenv.begin(write=True) as txn:
                for k in keys:
                    txn.put(k.encode(), k.encode())
            subjects["lmdb"][label] = cold_reads("lmdb", lenv, batches)
            closers.append(lenv.close)

    ops = list(subjects["shm"])
    times: dict[tuple[str, str], list[float]] = {}
    order = list(subjects)
    for r in range(rounds):
        for op in ops:
            for s in order[r % len(order):] + order[: r % len(order)]:
                if op in subjects[s]:
                    times.setdefault((op, s), []).append(timed(subjects[s][op], n))
    try:
        peers = [s for s in ("UltraDict", "lmdb") if s in subjects]
        width = max(map(len, ops)) + 2
        print(f"ops/s, medians of {rounds} rounds of {n:,} ops (interleaved); "
              f"shm / faster peer > 1 means shm is faster")
        print(f"{'op':<{width}}" + "".join(f"{s:>12}" for s in order) + f"{'shm/peer':>10}")
        for op in ops:
            if op.startswith("("):
                continue
            rate = {s: n / statistics.median(times[op, s]) for s in order if (op, s) in times}
            best = max((rate[s] for s in peers if s in rate), default=None)
            cells = "".join(f"{rate[s]:>12,.0f}" if s in rate else f"{'-':>12}" for s in order)
            ratio = f"{rate['shm'] / best:>10.2f}" if best else f"{'':>10}"
            print(f"{op:<{width}}{cells}{ratio}")
        med = {key: statistics.median(v) for key, v in times.items()}
        hit = med["get hit", "shm"] / med["get hit", "trivial"]
        print(f"get hit: shm costs {hit:.2f}x a trivial Python __getitem__")
        for op in ops:
            if op.startswith("get cold"):
                print(f"{op}: shm {med[op, 'shm'] / n * 1e6:.2f} µs per read, "
                      f"{med[op, 'shm'] / med['get hit', 'trivial']:.0f}x a trivial __getitem__")
    finally:
        for close in closers:
            close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
