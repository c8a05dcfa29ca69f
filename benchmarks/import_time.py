"""What a spawned worker pays to import a backend, against ``multiprocessing.managers``.

Each import runs in a fresh interpreter, like a ``spawn`` worker's: the wall-clock
time of ``python -c "import MOD"`` minus that of ``python -c "pass"`` (the
interpreter's own start-up), and the cumulative microseconds ``-X importtime``
reports for the module; the median of ``--runs`` runs. The goal: the ``shm``
backend within 2x of ``multiprocessing.managers``.

    python benchmarks/import_time.py                       # this checkout
    python benchmarks/import_time.py --src /other/src      # another tree (before/after)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

MODULES = ["multiprocessing.managers", "shareit", "shareit.backends.shm", "numpy"]


def wall(code: str, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - t


def importtime_us(module: str, env: dict) -> int:
    """The cumulative import time of ``module`` itself, as ``-X importtime`` reports it."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          env=env, capture_output=True, text=True, check=True)
    for line in proc.stderr.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--src", help="put this directory first on PYTHONPATH (another checkout)")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.src, env.get("PYTHONPATH")]))
    base = statistics.median(wall("pass", env) for _ in range(args.runs))
    print(f"interpreter start-up: {base * 1e3:.1f} ms (subtracted below); median of {args.runs}")
    results = {}
    for module in MODULES:
        code = f"import {module}, sys; assert {module!r} in sys.modules"
        ms = statistics.median(wall(code, env) - base for _ in range(args.runs)) * 1e3
        us = statistics.median(importtime_us(module, env) for _ in range(args.runs))
        numpy = subprocess.run([sys.executable, "-c", f"import {module}, sys; "
                                "print('numpy' in sys.modules)"], env=env, capture_output=True,
                               text=True).stdout.strip()
        results[module] = ms
        print(f"{module:28s} wall {ms:6.1f} ms   -X importtime {us / 1e3:6.1f} ms   "
              f"numpy loaded: {numpy}")
    ratio = results["shareit.backends.shm"] / results["multiprocessing.managers"]
    print(f"shm / multiprocessing.managers: {ratio:.2f}x (goal: <= 2x)")


if __name__ == "__main__":
    main()
