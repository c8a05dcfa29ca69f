"""Where a shm read's time goes, step by step, in one run: the floor of pure Python.

Run: python benchmarks/shm_read_floor.py [--keys 100000]

Hit: a trivial Python ``__getitem__`` (``return self._d[key]``), then the same frame
adding each step of ``ShmMapping.__getitem__``'s hit path in turn (the cache's dict
``get``, unpacking the hit, the key type check, the entry's version word, the epoch
word) -- the last line is the whole hit. Miss: each C-level step of a cold read of a
str key (:func:`shareit.backends.shm.read.get_str`) timed alone on warm memory, then a
plain dict lookup and the whole shm read over random keys of a ``--keys`` table (CPU
cache misses included). Medians of interleaved rounds; ratios are what count.
"""

from __future__ import annotations

import argparse
import random
import statistics
import struct
import timeit
import uuid
import zlib
from typing import Any

import shareit
from shareit.backends.shm.layout import C_GSEQ, K_STR
from shareit.backends.shm.mapping import _NOHIT


def hit_steps(cache: dict[Any, Any]) -> list[tuple[str, Any]]:
    def f0(self: Any, key: Any) -> Any:
        return self._d[key]

    def f1(self: Any, key: Any) -> Any:
        return self._cache.get(key, _NOHIT)

    def f2(self: Any, key: Any) -> Any:
        _fast, _c, _e, _q, _w, _ver, value, _, _kt = self._cache.get(key, _NOHIT)
        return value

    def f3(self: Any, key: Any) -> Any:
        fast, _c, _e, _q, _w, _ver, value, _, _kt = self._cache.get(key, _NOHIT)
        if fast is type(key):
            return value
        return None

    def f4(self: Any, key: Any) -> Any:
        fast, _c, _e, q, w, ver, value, _, _kt = self._cache.get(key, _NOHIT)
        if fast is type(key) and q[w] == ver:
            return value
        return None

    def f5(self: Any, key: Any) -> Any:
        fast, c, e, q, w, ver, value, _, _kt = self._cache.get(key, _NOHIT)
        if fast is type(key) and c[C_GSEQ] == e and q[w] == ver:
            return value
        return None

    out = []
    for label, f in [("trivial: return self._d[key]", f0), ("+ cache dict .get", f1),
                     ("+ unpack the hit (9)", f2), ("+ key type check", f3),
                     ("+ entry version word", f4), ("+ epoch word (= the hit)", f5)]:
        o = type("X", (), {"__getitem__": f})()
        o._d, o._cache = {"hot": 1}, cache
        out.append((label, o))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    d = shareit.open(f"floor-{uuid.uuid4().hex[:8]}", backend="shm")
    try:
        d["hot"] = 1
        d["hot"]
        keys = [f"key{i:07d}" for i in range(args.keys)]
        d.update({k: k for k in keys})
        t = d._t
        g, c = t.g, t.c
        kb = keys[1234].encode()
        h = zlib.crc32(kb, K_STR)
        unpack = struct.Struct("<QIIIIq").unpack_from
        e = g.i32[16 + h % g.isize]
        ent = unpack(g.mv, g.eoff + max(e, 0) * 32)
        k0 = g.hoff + ent[3] * 8
        ns = {"d": d, "t": t, "g": g, "c": c, "kb": kb, "h": h, "unpack": unpack,
              "mv": g.mv, "mm": g.mm, "i32": g.i32, "q": g.q, "off": g.eoff, "k0": k0,
              "key": keys[1234], "crc": zlib.crc32, "K": K_STR, "G": C_GSEQ}
        steps = [("key.encode", "key.encode('utf-8', 'surrogatepass')"),
                 ("crc32", "crc(kb, K)"), ("hash % isize", "h % g.isize"),
                 ("index slot i32[j]", "i32[16 + 5]"),
                 ("entry: struct unpack_from (6 fields)", "unpack(mv, off)"),
                 ("key bytes: mm slice == kb", "mm[k0:k0 + 10] == kb"),
                 ("value bytes: mm slice", "mm[k0:k0 + 10]"),
                 ("one control word c[i]", "c[G]"), ("one data word q[w]", "q[4]"),
                 ("attribute of the table", "t.g"),
                 ("bytes.decode", "kb.decode('utf-8', 'surrogatepass')")]
        res: dict[str, list[float]] = {}
        hits = hit_steps(d._cache)
        rnd = random.Random(1)
        pyd = dict.fromkeys(keys, 1)
        n = 10_000
        for _ in range(args.rounds):
            for label, o in hits:
                res.setdefault(label, []).append(
                    timeit.timeit("o['hot']", globals={"o": o}, number=200_000) / 200_000)
            for label, stmt in steps:
                res.setdefault(label, []).append(
                    timeit.timeit(stmt, globals=ns, number=100_000) / 100_000)
            for label, f in (("dict lookup, random keys", pyd.__getitem__),
                             ("shm d[key], random keys, cache missed", d.__getitem__)):
                batch = rnd.sample(keys, n)
                t.cache.clear()
                res.setdefault(label, []).append(
                    timeit.timeit(lambda b=batch, f=f: [f(k) for k in b], number=1) / n)
        base = statistics.median(res[hits[0][0]])
        print(f"ns per step, medians of {args.rounds} rounds; x: of a trivial __getitem__")
        for label, v in res.items():
            m = statistics.median(v)
            print(f"  {label:<40}{m * 1e9:>8.0f}{m / base:>7.1f}x")
    finally:
        d.destroy()


if __name__ == "__main__":
    main()
