"""Soak: many recorded multi-process histories per backend, each checked for linearizability.

The suite runs one history per configuration; this runs ``--rounds`` of each
(fork and spawn, with and without a SIGKILLed worker, plus the token ring) and
prints, per backend, how many rounds were checked and how many failed, with
the first counterexample. Exits 1 if any round failed.

    python benchmarks/linearizability_soak.py --rounds 50 [--backends shm,queue]
"""

from __future__ import annotations

import argparse
import sys
import time

import shareit
from shareit.testing.linearizability import run_random_history, run_token_ring

KEYS = ["a", "b", "c"]


def open_for(backend: str, url: str | None):
    opts = {}
    if backend == "value":
        opts = {"keys": KEYS, "initial": "absent"}
    if backend == "redis" and url:
        opts = {"url": url}
    return shareit.open(backend=backend, **opts)


def soak(backend: str, rounds: int, url: str | None) -> tuple[int, int, str]:
    checked = failed = 0
    first = ""
    for i in range(rounds):
        for method in ("fork", "spawn") if i % 5 == 0 else ("fork",):
            for kill in (False, True):
                d = open_for(backend, url)
                try:
                    r = run_random_history(d, workers=3, ops_per_worker=80, keys=KEYS,
                                           method=method, kill=kill)
                finally:
                    d.close()
                checked += 1
                if not r.ok:
                    failed += 1
                    first = first or r.explain()
        d = open_for(backend, url)
        try:
            r = run_token_ring(d, workers=3, rounds=20, key="a")
        finally:
            d.close()
        checked += 1
        if not r.ok:
            failed += 1
            first = first or r.explain()
    return checked, failed, first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--backends", default="shm,manager,queue,value")
    p.add_argument("--url", help="a redis URL, to include the redis backend")
    args = p.parse_args()
    backends = args.backends.split(",") + (["redis"] if args.url else [])
    bad = 0
    for b in backends:
        started = time.monotonic()
        checked, failed, first = soak(b, args.rounds, args.url)
        print(f"{b:<8} {checked:>5} histories checked, {failed} not linearizable "
              f"({time.monotonic() - started:.0f} s)", flush=True)
        if first:
            print(first)
        bad += failed
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
