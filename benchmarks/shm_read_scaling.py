"""shm reads under writers: the 90/10 get/set mix over 1/2/4/8 processes, and what a
writer on the same mapping costs a reader of a hot key.

Run: python benchmarks/shm_read_scaling.py [--rounds 5] [--seconds 0.5] [--keys 1000]

90/10: P forked processes each run a random plan of reads (90%) and writes of a number
(10%) of the same ``--keys`` str keys for ``--seconds``; total ops/s is the sum. Every read of a key
another process wrote since this one last read it misses the read cache's version check.
Writer cost: one process reads one hot key while a second process (a) sleeps or (b) sets
another key to numbers in a loop; the ratio b/a is what the writer costs the reader.
The machine is shared: rounds are interleaved, medians reported, ratios are what count.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import time
import uuid
from typing import Any

import shareit


def _mix(d: Any, keys: list[str], seed: int, start: Any, seconds: float, out: Any) -> None:
    rnd = random.Random(seed)
    plan = [(rnd.choice(keys), rnd.random() < 0.1) for _ in range(10_000)]  # (key, write?)
    ops = 0
    start.wait()
    cpu = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for k, write in plan:
            if write:
                d[k] = ops
            else:
                d[k]
        ops += len(plan)
    out.put((ops, time.process_time() - cpu))


def _reader(d: Any, start: Any, seconds: float, out: Any) -> None:
    ops = 0
    start.wait()
    cpu = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            d["hot"]
        ops += 1000
    out.put((ops, time.process_time() - cpu))


def _writer(d: Any, start: Any, seconds: float, write: bool) -> None:
    start.wait()
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end:
        if write:
            for _ in range(100):
                i += 1
                d["other"] = i
        else:
            time.sleep(0.01)


def run(jobs: list[tuple[Any, tuple[Any, ...], bool]], seconds: float
        ) -> tuple[float, float]:
    """Run ``(target, args, reports)`` in forked processes started together: (ops per
    second of wall time, ops per CPU second) of the reporting ones together."""
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(len(jobs)), ctx.Queue()
    procs = [ctx.Process(target=f, args=(a[0], *a[1:], start, seconds, out) if rep
                         else (a[0], start, seconds, *a[1:]))
             for f, a, rep in jobs]
    for p in procs:
        p.start()
    got = [out.get() for _, _, rep in jobs if rep]
    for p in procs:
        p.join()
    ops, cpu = sum(o for o, _ in got), sum(c for _, c in got)
    return ops / seconds, ops / max(cpu, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--keys", type=int, default=1000)
    args = ap.parse_args()
    name = f"scale-{uuid.uuid4().hex[:8]}"
    d = shareit.open(name, backend="shm")
    try:
        keys = [f"k{i}" for i in range(args.keys)]
        d.update(dict.fromkeys(keys, 0))
        d["hot"], d["other"] = 1, 0
        for k in keys:
            d[k] = 1  # every key on the number fast path of this (forking) process
        mix: dict[int, list[tuple[float, float]]] = {}
        cost: dict[str, list[tuple[float, float]]] = {"idle": [], "writer": []}
        for _ in range(args.rounds):
            for p in (1, 2, 4, 8):
                mix.setdefault(p, []).append(
                    run([(_mix, (d, keys, s), True) for s in range(p)], args.seconds))
            for label, write in (("idle", False), ("writer", True)):
                cost[label].append(run([(_reader, (d,), True), (_writer, (d, write), False)],
                                       args.seconds))
        med = statistics.median
        print(f"90/10 get/set mix over {args.keys} keys (medians of {args.rounds} rounds of "
              f"{args.seconds}s; the machine's cores are shared: per CPU second is the cost)")
        print(f"{'processes':>10}{'ops/s':>14}{'x of 1':>8}{'ops/CPU s':>14}{'x of 1':>8}")
        one = [med(x[i] for x in mix[1]) for i in (0, 1)]
        for p, v in mix.items():
            wall, per_cpu = med(x[0] for x in v), med(x[1] for x in v)
            print(f"{p:>10}{wall:>14,.0f}{wall / one[0]:>8.2f}{per_cpu:>14,.0f}"
                  f"{per_cpu / one[1]:>8.2f}")
        idle, busy = (med(x[1] for x in cost[k]) for k in ("idle", "writer"))
        print(f"hot-key reads per CPU second: {idle:,.0f} beside an idle process, {busy:,.0f} "
              f"beside a writer of another key ({busy / idle:.2f}x)")
    finally:
        d.destroy()


if __name__ == "__main__":
    main()
