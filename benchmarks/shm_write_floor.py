"""The floor of a general shm write in pure Python: where ``d[k] = "str"`` spends its time.

Run: python benchmarks/shm_write_floor.py [--n 20000] [--rounds 9] [--keys 100000]

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
import zlib
from collections.abc import Callable

import shareit
from shareit.backends.shm import layout as L
from shareit.backends.shm.layout import C_JCOUNT, C_JSTATE, C_JWORDS, C_STAMP, C_TSEQ, C_WRITER

_PACK_RECORD = struct.Struct("<QQ").pack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--keys", type=int, default=100_000)
    args = ap.parse_args()
    in_place(args)
    at_scale(args)


def in_place(args: argparse.Namespace) -> None:
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
    try:
        times = interleaved(ops, n, args.rounds)
        assert d["s"] == values[(n - 1) & 255] and d.verify() == []
        report(f"d[k] = str over an existing key, in place; {args.rounds} rounds of {n:,}",
               times, "empty loop")
    finally:
        for close in closers:
            close()


def interleaved(ops: dict[str, Callable[[int], None]], n: int,
                rounds: int) -> dict[str, float]:
    """Median ns per op of each op, timed in turn round after round."""
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            t0 = time.perf_counter()
            op(n)
            times[name].append((time.perf_counter() - t0) / n * 1e9)
    return {k: statistics.median(v) for k, v in times.items()}


def report(title: str, med: dict[str, float], base_name: str) -> None:
    base = med[base_name]
    print(f"{title}: ns per op, medians (interleaved); x = multiples of {base_name} "
          f"({base:.0f} ns)")
    for name, v in med.items():
        print(f"  {name:<36}{v:>9.0f} ns {v / base:>7.2f}x")


def at_scale(args: argparse.Namespace) -> None:
    """A new key and ``del`` in a table of ``args.keys`` keys: shipped, floor, peers."""
    n, rounds = args.n, args.rounds
    d = shareit.open(backend="shm", capacity=args.keys + 2 * n * rounds + 1000)
    for i in range(args.keys):  # (one by one: in the segment ``capacity`` sized)
        d[f"base{i}"] = i
    t = d._t
    g, c, cmv, lk = t.g, t.c, t.cmv, t.lock
    # no growth may happen while timing (the floors write into this generation)
    assert g.cap >= args.keys + 2 * n * rounds and g.heapw - g.q[L.H_TOP] > 4 * n * rounds
    fresh = (f"n{i}" for i in range(10**9))
    placed: list[list[str]] = []  # keys inserted, for the deletes (by shipped and floor)
    pid = os.getpid()
    jb = L.JOURNAL_WORD * 8
    hdr = L.HEADER_BYTES
    pack_insert = struct.Struct(f"<QQ{hdr}sQQ8s").pack_into
    pack_delete = struct.Struct(f"<QQ{hdr}sQQ{L.ENTRY_BYTES}sQQ8s").pack_into
    pack_tail = struct.Struct("<IIIIq").pack_into
    insert_words = (16 + hdr + 16 + 8) >> 3
    delete_words = (16 + hdr + 16 + L.ENTRY_BYTES + 16 + 8) >> 3
    meta_int = L.V_INT | (L.K_STR << 8) | L.LIVE
    crc32 = zlib.crc32

    def shipped_insert(k: int) -> None:
        keys = [next(fresh) for _ in range(k)]
        for i, key in enumerate(keys):
            d[key] = i
        placed.append(keys)

    def floor_insert(k: int) -> None:
        """fastpath.insert's stores, the probe inline, nothing checked."""
        keys = [next(fresh) for _ in range(k)]
        mv, mm, q, i32, u32 = g.mv, g.mm, g.q, g.i32, g.u32
        isize, ibase, ebase, hoff, ew = g.isize, hdr // 4, g.eoff // 4, g.hoff, g.ew
        trylock, unlock = lk.trylock, lk.unlock
        for i, key in enumerate(keys):
            kb = key.encode()
            nk = len(kb)
            h = crc32(kb, L.K_STR)
            trylock()
            j = h % isize
            e = i32[ibase + j]
            while e != L.EMPTY:  # (a new key: the probe ends at an empty slot)
                if e >= 0:
                    u = ebase + e * 8
                    if u32[u + 2] == h and u32[u + 3] == nk \
                            and mv[hoff + u32[u + 4] * 8 : hoff + u32[u + 4] * 8 + nk] == kb:
                        raise AssertionError("not a new key")
                j += 1
                if j == isize:
                    j = 0
                e = i32[ibase + j]
            c[C_WRITER] = pid
            c[C_JCOUNT] = 0
            c[C_TSEQ] += 1
            c[C_JSTATE] = 1
            ioff = hdr + (j * 4 & ~7)
            pack_insert(cmv, jb, 0, hdr, mm[0:hdr], ioff, 8, mm[ioff : ioff + 8])
            c[C_JWORDS] = insert_words
            c[C_JCOUNT] = 2
            used, top = q[L.H_USED], q[L.H_TOP]
            q[L.H_TOP] = top + ((nk + 7) >> 3)
            mv[hoff + top * 8 : hoff + top * 8 + nk] = kb  # (the heap past its top is zeros)
            stamp = c[C_STAMP] + 1
            c[C_STAMP] = stamp
            w = ew + used * 4
            q[w] = 2 * stamp + 1
            pack_tail(mv, w * 8 + 8, h, nk, top, meta_int, i)
            q[w] = 2 * stamp + 2
            q[L.H_USED] = used + 1
            q[L.H_LIVE] += 1
            i32[ibase + j] = used
            c[C_JSTATE] = 0
            c[C_TSEQ] += 1
            unlock()
        placed.append(keys)

    def shipped_delete(k: int) -> None:
        t.slots.clear()  # keys this process did not place: found by the probe
        for key in placed.pop(0):
            del d[key]

    def floor_delete(k: int) -> None:
        """remove_flat's stores for a key found by the probe, nothing checked."""
        mv, mm, q, i32, u32 = g.mv, g.mm, g.q, g.i32, g.u32
        isize, ibase, ebase, hoff, ew = g.isize, hdr // 4, g.eoff // 4, g.hoff, g.ew
        trylock, unlock = lk.trylock, lk.unlock
        for key in placed.pop(0):
            kb = key.encode()
            nk = len(kb)
            h = crc32(kb, L.K_STR)
            trylock()
            j = h % isize
            while True:
                e = i32[ibase + j]
                if e >= 0:
                    u = ebase + e * 8
                    if u32[u + 2] == h and u32[u + 3] == nk \
                            and mv[hoff + u32[u + 4] * 8 : hoff + u32[u + 4] * 8 + nk] == kb:
                        break
                j += 1
                if j == isize:
                    j = 0
            w = ew + e * 4
            c[C_WRITER] = pid
            c[C_JCOUNT] = 0
            c[C_TSEQ] += 1
            c[C_JSTATE] = 1
            ioff = hdr + (j * 4 & ~7)
            pack_delete(cmv, jb, 0, hdr, mm[0:hdr], w * 8, L.ENTRY_BYTES,
                        mm[w * 8 : w * 8 + L.ENTRY_BYTES], ioff, 8, mm[ioff : ioff + 8])
            c[C_JWORDS] = delete_words
            c[C_JCOUNT] = 3
            u = w * 2
            meta = u32[u + 5]
            stamp = c[C_STAMP] + 1
            c[C_STAMP] = stamp
            q[w] = 2 * stamp + 1
            pack_tail(mv, w * 8 + 8, h, nk, u32[u + 4], meta & ~L.LIVE, g.qs[w + 3])
            q[w] = 2 * stamp + 2
            i32[ibase + j] = L.DELETED
            q[L.H_LIVE] -= 1
            q[L.H_GARBAGE] += (nk + 7) >> 3
            c[C_JSTATE] = 0
            c[C_TSEQ] += 1
            unlock()

    ops: dict[str, Callable[[int], None]] = {
        "shm d[new] = int (shipped)": shipped_insert,
        "shm new key, same stores flat (floor)": floor_insert,
    }
    dels: dict[str, Callable[[int], None]] = {
        "shm del d[k], probed (shipped)": shipped_delete,
        "shm del, same stores flat (floor)": floor_delete,
    }
    closers: list[Callable[[], None]] = [d.destroy]
    try:
        from UltraDict import UltraDict

        size = 1 << 27  # as shareit bench configures it: no full dumps while timing
        ud = UltraDict(name=f"ud{uuid.uuid4().hex[:8]}", create=True, auto_unlink=True,
                       buffer_size=size, full_dump_size=size)
        ud.update({f"base{i}": i for i in range(args.keys)})
        ud_placed: list[list[str]] = []

        def ud_insert(k: int) -> None:
            keys = [next(fresh) for _ in range(k)]
            for i, key in enumerate(keys):
                ud[key] = i
            ud_placed.append(keys)

        def ud_delete(k: int) -> None:
            for key in ud_placed.pop(0):
                del ud[key]
        ops["UltraDict d[new] = int"] = ud_insert
        dels["UltraDict del d[k]"] = ud_delete
        closers.append(ud.unlink)
    except ImportError:
        pass
    try:
        import lmdb

        tmp = tempfile.mkdtemp(prefix="shareit-floor-", dir="/dev/shm")
        closers.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
        env = lmdb.open(os.path.join(tmp, "db"), map_size=1 << 30)
        closers.insert(len(closers) - 1, env.close)  # (before the rmtree)
        with env.begin(write=True) as txn:
            for i in range(args.keys):
                txn.put(f"base{i}".encode(), str(i).encode())
        lm_placed: list[list[bytes]] = []

        def lm_insert(k: int) -> None:
            keys = [next(fresh).encode() for _ in range(k)]
            begin = env.begin
            for i, key in enumerate(keys):
                with begin(write=True) as txn:
                    txn.put(key, str(i).encode())
            lm_placed.append(keys)

        def lm_delete(k: int) -> None:
            begin = env.begin
            for key in lm_placed.pop(0):
                with begin(write=True) as txn:
                    txn.delete(key)
        ops["lmdb put, new key (txn per op)"] = lm_insert
        dels["lmdb delete (txn per op)"] = lm_delete
    except ImportError:
        pass
    try:
        ins = interleaved(ops, n, rounds)
        # every insert op ran once per round and placed its keys; each delete op removes
        # one batch per round: the floor's deletes half of them, shipped the other half
        rm = interleaved(dels, n, rounds)
        assert t.g is g and d.verify() == [], d.verify()
        assert len(d) == args.keys, len(d)
        report(f"a new key, in a table of {args.keys:,}; {rounds} rounds of {n:,}", ins,
               "shm d[new] = int (shipped)")
        report(f"del of a key it did not place, in a table of {args.keys:,}", rm,
               "shm del d[k], probed (shipped)")
    finally:
        for close in closers:
            close()


if __name__ == "__main__":
    main()
