"""The floor of a general shm write in pure Python: where ``d[k] = "str"`` spends its time.

Run: python benchmarks/shm_write_floor.py [--n 20000] [--rounds 9]

Times, interleaved in one process (medians): ``d["s"] = value`` as shipped (an
existing key whose new value fits its room: written in place); the very same
stores done by one flat Python function with every step inlined and nothing
checked (the floor of this design in pure Python: no call, no branch it could
skip); and the parts that floor is made of -- the robust mutex's trylock +
unlock (two ctypes calls), one word read and one word write of the mapping
through a memoryview, the journal copy -- next to UltraDict's and lmdb's set
of a str when they are installed. Only the ratios mean anything (a shared
machine); see the module docstring of ``shareit.backends.shm.table`` for what
each step is for.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import tempfile
import time
import uuid
from collections.abc import Callable

import shareit
from shareit.backends.shm import layout as L
from shareit.backends.shm.layout import C_JCOUNT, C_JSTATE, C_JWORDS, C_STAMP, C_TSEQ, C_WRITER

_PACK_RECORD = struct.Struct("<QQ").pack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    n = args.n
    values = [f"value-{i:06d}" for i in range(256)]  # 12 bytes: two words, in place
    d = shareit.open(backend="shm")
    d["s"] = "x" * 16
    d["s"] = values[0]
    t = d._t
    g, c, cmv, lk = t.g, t.c, t.cmv, t.lock
    w = t.slots["s"]
    voff = g.qs[w + 3] & 0xFFFFFFFF
    hb = g.hoff + voff * 8
    meta = g.u32[w * 2 + 5]
    jb = L.JOURNAL_WORD * 8
    pid = os.getpid()

    def shipped(k: int) -> None:
        for i in range(k):
            d["s"] = values[i & 255]

    def floor(k: int) -> None:
        """The stores of an in-place write, flat: lock, begin, journal, entry, commit."""
        mv, q, qs, u32 = g.mv, g.q, g.qs, g.u32
        trylock, unlock = lk.trylock, lk.unlock
        for i in range(k):
            raw = values[i & 255].encode()
            if trylock():
                raise RuntimeError("contended")
            c[C_WRITER] = pid
            c[C_JWORDS] = 0
            c[C_JCOUNT] = 0
            c[C_TSEQ] += 1
            c[C_JSTATE] = 1
            blob = _PACK_RECORD(w * 8, 32) + mv[w * 8 : w * 8 + 32] + _PACK_RECORD(hb, 16) \
                + mv[hb : hb + 16]
            cmv[jb : jb + len(blob)] = blob
            c[C_JWORDS] = len(blob) >> 3
            c[C_JCOUNT] = 2
            stamp = c[C_STAMP] + 1
            c[C_STAMP] = stamp
            q[w] = 2 * stamp + 1
            mv[hb : hb + 16] = raw + b"\0\0\0\0"
            u32[w * 2 + 5] = meta
            qs[w + 3] = voff | (len(raw) << 32)
            q[w] = 2 * stamp + 2
            c[C_JSTATE] = 0
            c[C_TSEQ] += 1
            unlock()

    def lock_pair(k: int) -> None:
        trylock, unlock = lk.trylock, lk.unlock
        for _ in range(k):
            trylock()
            unlock()

    def word_read(k: int) -> None:
        for _ in range(k):
            c[C_STAMP]

    def word_write(k: int) -> None:
        for _ in range(k):
            c[C_WRITER] = pid

    def empty(k: int) -> None:
        for _ in range(k):
            pass

    ops: dict[str, Callable[[int], None]] = {
        "d[k] = str (shipped)": shipped, "same stores, flat (floor)": floor,
        "trylock + unlock": lock_pair, "one word read": word_read,
        "one word write": word_write, "empty loop": empty,
    }
    closers: list[Callable[[], None]] = [d.close]
    try:
        from UltraDict import UltraDict

        ud = UltraDict(name=f"ud{uuid.uuid4().hex[:8]}", create=True, auto_unlink=True)
        ud["s"] = values[0]

        def ultradict(k: int) -> None:
            for i in range(k):
                ud["s"] = values[i & 255]
        ops["UltraDict d[k] = str"] = ultradict
        closers.append(ud.unlink)
    except ImportError:
        pass
    try:
        import lmdb

        tmp = tempfile.mkdtemp(prefix="shareit-floor-", dir="/dev/shm")
        env = lmdb.open(os.path.join(tmp, "db"), map_size=1 << 26)

        def lmdb_set(k: int) -> None:
            begin = env.begin
            for i in range(k):
                with begin(write=True) as txn:
                    txn.put(b"s", values[i & 255].encode())
        ops["lmdb put (txn per op)"] = lmdb_set
        closers.append(env.close)
        closers.append(lambda: shutil.rmtree(tmp, ignore_errors=True))  # (after env.close)
    except ImportError:
        pass
    shipped(n)  # warm: the first write in this process sets its lock up
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(args.rounds):
        for name, op in ops.items():
            t0 = time.perf_counter()
            op(n)
            times[name].append((time.perf_counter() - t0) / n * 1e9)
    assert d["s"] == values[(n - 1) & 255] and d.verify() == []
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["empty loop"]
    print(f"ns per op, medians of {args.rounds} rounds of {n:,} (interleaved); "
          f"x = multiples of an empty loop iteration ({base:.0f} ns)")
    for name, v in med.items():
        print(f"  {name:<28}{v:>9.0f} ns {v / base:>7.1f}x")
    for close in closers:
        close()


if __name__ == "__main__":
    main()
