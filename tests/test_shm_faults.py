"""The shm backend under faults: torn reads, writers killed mid-write, growth, collisions, churn."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import shareit
from shareit.backends.shm import layout as L
from shareit.backends.shm import mapping as shm_mapping
from shareit.testing import join_all, shareit_files

FORK = mp.get_context("fork")
TIMEOUT = 120


@pytest.fixture
def d(name):
    m = shareit.open(name, backend="shm")
    yield m
    m.close()
    assert shareit_files(name) == []


# ---------------------------------------------------------------------------- torn reads

SIZES = {"w8": 8, "w64": 64, "w4k": 4096}


def self_checking(key: str, n: int):
    if key == "w8":  # one int64: both halves equal
        n &= 0x7FFFFFFF
        return (n << 32) | n
    return bytes([n % 251]) * SIZES[key]


def is_intact(key: str, v) -> bool:
    if key == "w8":
        return type(v) is int and (v >> 32) == (v & 0xFFFFFFFF)
    return type(v) is bytes and len(v) == SIZES[key] and v == v[:1] * len(v)


def torn_writer(d, stop, writes) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        for key in SIZES:
            d[key] = self_checking(key, n)
        writes.value = n


def torn_reader(d, reads: int, torn, done, writes, min_writes: int) -> None:
    """Check every read; stop after ``reads`` reads *and* ``min_writes`` writer rounds,
    so the writer is known to have run while we read, however the processes were scheduled."""
    bad = 0
    keys = list(SIZES)
    i = 0
    deadline = time.monotonic() + TIMEOUT
    while i < reads or writes.value < min_writes:
        key = keys[i % 3]
        if not is_intact(key, d[key]):
            bad += 1
        i += 1
        if i % 65536 == 0 and time.monotonic() > deadline:
            break
    with torn.get_lock():
        torn.value += bad
    done.set()


def test_no_torn_reads_in_a_million(d) -> None:
    for key in SIZES:
        d[key] = self_checking(key, 0)
    stop, torn, writes = FORK.Event(), FORK.Value("q", 0), FORK.Value("q", 0, lock=False)
    dones = [FORK.Event() for _ in range(2)]
    writer = FORK.Process(target=torn_writer, args=(d, stop, writes))
    readers = [FORK.Process(target=torn_reader, args=(d, 500_000, torn, ev, writes, 2000))
               for ev in dones]
    writer.start()
    for r in readers:
        r.start()
    try:
        assert join_all(readers) == [0, 0]
        written_while_reading = writes.value
    finally:
        stop.set()
        assert join_all([writer]) == [0]
    assert torn.value == 0, f"{torn.value} torn reads"
    assert written_while_reading >= 2000, "the writer did not run while the readers read"
    assert d.verify() == []


# ---------------------------------------------------------------------------- killed mid-write


def die_at(d, step: str, op: str) -> None:
    d["n"] = 1  # (unchanged) the first write in a child sets up its lock: then "n" goes fast
    if op == "set_fit":  # (unchanged) "s" gets room for the new value: it goes in place
        d["s"] = "x" * 40
        d["s"] = "old"
    L.FAULT = step
    if op == "set_int":
        d["n"] = 2  # fast path: one inline word
    elif op in ("set_str", "set_fit"):
        d["s"] = "new" * 10
    elif op == "insert":
        d["fresh"] = "new"
    elif op == "delete":
        del d["s"]
    elif op == "update":
        d.update({"n": 2, "s": "new" * 10, "fresh": "new"})
    elif op == "grow":  # ints: located and rebuilt in numpy
        d.update({f"g{i}": i for i in range(1000)})
    elif op == "grow_str":  # other values: put one by one into the unpublished generation
        d.update({f"g{i}": str(i) for i in range(1000)})
    os._exit(3)  # the fault point was not reached


CASES = [
    ("mid_entry", "set_int"), ("before_commit", "set_int"),
    ("after_begin", "set_str"), ("mid_entry", "set_str"), ("after_write", "set_str"),
    ("before_commit", "set_str"), ("after_begin", "set_fit"), ("mid_entry", "set_fit"),
    ("after_write", "set_fit"), ("before_commit", "set_fit"),
    ("mid_entry", "insert"), ("after_write", "insert"), ("before_commit", "insert"),
    ("after_begin", "delete"), ("mid_entry", "delete"), ("before_commit", "delete"),
    ("after_write", "update"), ("before_commit", "update"),
    ("mid_grow", "grow"), ("mid_switch", "grow"), ("after_switch", "grow"),
    ("mid_grow", "grow_str"), ("mid_switch", "grow_str"), ("after_switch", "grow_str"),
]
OLD = {"n": 1, "s": "old", "keep": [1, 2]}
NEW = {"n": 2, "s": "new" * 10, "fresh": "new"}


@pytest.mark.parametrize("step, op", CASES)
def test_writer_killed_at_a_fault_point_leaves_old_or_new(d, step: str, op: str) -> None:
    d.update(OLD)
    child = FORK.Process(target=die_at, args=(d, step, op))
    child.start()
    assert join_all([child]) == [-signal.SIGKILL], "the fault point was not reached"
    assert d.verify() == [], "the table is inconsistent after the writer's death"
    snap = d.snapshot()
    assert snap["keep"] == [1, 2]
    for key in ("n", "s", "fresh"):
        assert snap.get(key, "<absent>") in (OLD.get(key, "<absent>"), NEW[key], "<absent>")
        if key in OLD and op != "delete":
            assert key in snap
    if op.startswith("grow"):
        keys = [k for k in snap if isinstance(k, str) and k.startswith("g")]
        assert len(keys) in (0, 1000), "a bulk update must land whole or not at all"
    d["n"] = 10
    d["after"] = "works"
    assert d["n"] == 10 and d.incr("n") == 11 and d["after"] == "works"
    assert shareit_files(d.name) == [f"{d.name}@ctl", f"{d.name}@g{d.info()['generation']}",
                                     f"{d.name}@lock", f"{d.name}@meta"], \
        "a dead writer's segment leaked"


def random_writer(d, started) -> None:
    started.set()
    rnd = random.Random(os.getpid())
    n = 0
    while True:
        n += 1
        key = f"k{rnd.randrange(200)}"
        r = rnd.random()
        if r < 0.4:
            d[key] = self_checking("w64", n)
        elif r < 0.6:
            d.incr("counter")
        elif r < 0.8:
            d.pop(key, None)
        else:
            d.update({f"k{rnd.randrange(200)}": self_checking("w64", n) for _ in range(5)})


def test_random_kills_over_many_rounds(d) -> None:
    d["counter"] = 0
    rnd = random.Random(1234)
    last = 0
    for _ in range(25):
        started = FORK.Event()
        child = FORK.Process(target=random_writer, args=(d, started))
        child.start()
        assert started.wait(TIMEOUT)
        time.sleep(rnd.uniform(0, 0.03))  # a random kill moment, not a wait for the child
        os.kill(child.pid, signal.SIGKILL)
        join_all([child])
        assert d.verify() == []
        snap = d.snapshot()
        assert all(is_intact("w64", v) for k, v in snap.items() if k != "counter")
        assert snap["counter"] >= last
        last = snap["counter"]
    d["k0"] = b"x"
    assert d["k0"] == b"x"


# ------------------------------------------------------------------ growth, collisions, churn


def grow_writer(d, total: int, progress) -> None:
    for i in range(total):
        d[f"key{i}"] = i
        if i % 1000 == 999:
            progress.value = i + 1
    progress.value = total


def grow_reader(d, total: int, progress) -> None:
    rnd = random.Random(7)
    last_len = 0
    while True:
        done = progress.value
        if done:
            i = rnd.randrange(done)
            assert d[f"key{i}"] == i, f"key{i} missing or wrong while growing"
        n = len(d)
        assert n >= last_len, "len() went backwards"
        last_len = n
        if done == total:
            return


def test_grow_from_one_to_200k_keys_while_another_process_reads(d) -> None:
    total = 200_000
    progress = FORK.Value("q", 0, lock=False)
    procs = [FORK.Process(target=grow_writer, args=(d, total, progress)),
             FORK.Process(target=grow_reader, args=(d, total, progress))]
    for p in procs:
        p.start()
    assert join_all(procs, 300) == [0, 0]
    assert len(d) == total and d["key0"] == 0 and d[f"key{total - 1}"] == total - 1
    info = d.info()
    assert info["generation"] > 5 and info["capacity"] < total * 2
    assert d.verify() == []


def test_forced_hash_collisions(d, monkeypatch) -> None:
    monkeypatch.setattr(shm_mapping, "_crc32", lambda b, kind: 12345)
    keys = [f"c{i}" for i in range(300)] + list(range(100)) + [("t", i) for i in range(50)]
    for i, k in enumerate(keys):
        d[k] = i
    for i, k in enumerate(keys):
        assert d[k] == i
    for k in keys[::2]:
        del d[k]
    for i, k in enumerate(keys):
        assert (k in d) == (i % 2 == 1)
    d.update(dict.fromkeys(keys[::2], -1))
    assert all(d[k] == -1 for k in keys[::2]) and len(d) == len(keys)
    assert d.verify() == []


def test_delete_heavy_churn_stays_bounded(d) -> None:
    for round_ in range(200):
        for i in range(100):
            d[f"c{i}"] = "x" * (round_ % 7 * 50)
        for i in range(100):
            if i % 10:
                del d[f"c{i}"]
    info = d.info()
    assert len(d) == 10 and info["used_entries"] < 500 and info["capacity"] < 1000
    assert info["heap_bytes"] < 1 << 20, "space freed by deletes and overwrites is reclaimed"
    assert d.verify() == [] and d["c0"] == "x" * (199 % 7 * 50)


# ---------------------------------------------------------------------------- numeric bulk access


def test_numeric_bulk_access() -> None:
    d = shareit.open(backend="shm", value_type="float64")
    try:
        keys = list(range(1000))
        d.set_many(keys, np.arange(1000) * 0.5)
        assert d[10] == 5.0 and len(d) == 1000
        np.testing.assert_array_equal(d.values_array(), np.arange(1000) * 0.5)
        assert d.keys_list() == keys
        np.testing.assert_array_equal(d.get_many([3, 1]), [1.5, 0.5])
        np.testing.assert_array_equal(d.get_many([3, -1], default=np.nan), [1.5, np.nan])
        with pytest.raises(KeyError):
            d.get_many([-1])
        with pytest.raises(ValueError, match="2 keys but 1 values"):
            d.set_many([1, 2], [1.0])
        with pytest.raises(TypeError, match="float64"):
            d.set_many([1, 2], ["a", "b"])
        assert d[1] == 0.5, "a rejected bulk write changes nothing"
        del d[0]
        assert d.values_array()[0] == 0.5
    finally:
        d.close()
    plain = shareit.open(backend="shm")
    try:
        with pytest.raises(TypeError, match="numeric value_type"):
            plain.values_array()
    finally:
        plain.close()


# ---------------------------------------------------------------------------- files and the tracker


def test_segments_are_private_and_versioned(d, name) -> None:
    d["a"] = 1
    files = shareit_files(name)
    assert f"{name}@ctl" in files and f"{name}@meta" in files, files
    for f in files:
        path = os.path.join(shareit.api._runtime.runtime_dir(), f)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, f
    record = shareit.api._runtime.read_meta(name)
    assert record["owner_pid"] == os.getpid() and record["version"] == 3


ATTACH_AND_EXIT = """
import shareit, sys
d = shareit.open(sys.argv[1], create=False)
d["from_child"] = d["a"] + 1
"""


def test_attacher_exit_neither_unlinks_nor_warns(d, name) -> None:
    d["a"] = 1
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", ATTACH_AND_EXIT, name], capture_output=True,
                              text=True, timeout=TIMEOUT,
                              env={**os.environ, "SHAREIT_BACKEND": "shm"})
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert d["from_child"] == 2 and len(shareit_files(name)) == 4  # ctl, g1, lock, meta


OWN_AND_EXIT = """
import shareit, sys
d = shareit.open(sys.argv[1], backend="shm")
d["a"] = 1
"""


def test_owner_exit_removes_segments_without_tracker_output(name) -> None:
    proc = subprocess.run([sys.executable, "-c", OWN_AND_EXIT, name], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert shareit_files(name) == []


# ---------------------------------------------------------------------------- the flock fallback


def incr_and_hold(d, n, ready) -> None:
    for _ in range(n):
        d.incr("n")
    with d.lock():
        ready.set()
        os.kill(os.getpid(), signal.SIGKILL)


def test_flock_fallback_where_robust_mutexes_are_missing(monkeypatch, name) -> None:
    monkeypatch.setattr(shm_mapping, "robust_mutex_available", lambda: False)
    d = shareit.open(name, backend="shm")
    try:
        assert d._t.c[L.C_LOCKKIND] == L.LOCK_FLOCK
        d["n"] = 0
        readies = [FORK.Event() for _ in range(2)]
        procs = [FORK.Process(target=incr_and_hold, args=(d, 300, r)) for r in readies]
        for p in procs:
            p.start()
        assert join_all(procs) == [-signal.SIGKILL] * 2
        assert all(r.is_set() for r in readies)
        assert d.incr("n") == 601, "exact under the flock lock, and not blocked by dead holders"
        assert d.verify() == []
    finally:
        d.close()


@pytest.mark.parametrize("keys_kind", ["numpy ints", "str"])
def test_bulk_access_in_numpy_matches_a_dict(keys_kind: str) -> None:
    """get_many/set_many beyond the journaled size: located and applied in numpy."""
    d = shareit.open(backend="shm", value_type="int64")
    try:
        rng = np.random.default_rng(7)
        model: dict = {}
        for round_ in range(6):
            ints = rng.choice(5000, size=1500, replace=False)
            keys = ints if keys_kind == "numpy ints" else [f"k{i}" for i in ints.tolist()]
            values = rng.integers(-(2**40), 2**40, size=len(ints))
            d.set_many(keys, values)
            model.update(zip([k.item() if isinstance(k, np.generic) else k for k in keys],
                             values.tolist()))
            for k in list(model)[: 40 * round_]:  # deletes leave dead entries to skip
                if k in d:
                    del d[k]
                    del model[k]
            assert d.snapshot() == model and list(d.keys()) == list(model)
            probe = list(model)[::7]
            np.testing.assert_array_equal(d.get_many(probe), [model[k] for k in probe])
            assert d.verify() == []
        missing = 10**6 if keys_kind == "numpy ints" else "nope"
        got = d.get_many([next(iter(model)), missing], default=-1)
        assert got[1] == -1
        with pytest.raises(KeyError, match=str(missing)):
            d.get_many([missing])
        with pytest.raises(ValueError, match="does not fit"):
            d.set_many(np.arange(300), np.full(300, 2**63, dtype=np.uint64))
        assert d.snapshot() == model, "a rejected bulk write changes nothing"
    finally:
        d.close()


def set_many_and_die(d, step: str) -> None:
    d[0] = 0.0  # the first write in a child sets up its lock
    L.FAULT = step
    d.set_many(np.arange(2000), np.full(2000, 7.0))
    os._exit(3)


@pytest.mark.parametrize("step", ["mid_grow", "after_switch"])
def test_set_many_killed_lands_whole_or_not_at_all(step: str) -> None:
    d = shareit.open(backend="shm", value_type="float64")
    try:
        d.set_many(np.arange(1000), np.arange(1000.0))
        child = FORK.Process(target=set_many_and_die, args=(d, step))
        child.start()
        assert join_all([child]) == [-signal.SIGKILL], "the fault point was not reached"
        assert d.verify() == []
        values = d.values_array()
        assert len(values) in (1000, 2000)
        old = np.arange(1000.0)
        assert (values == 7.0).all() if len(values) == 2000 else (values == old).all()
        d.set_many(np.arange(3000), np.ones(3000))
        assert d.verify() == [] and d.values_array().sum() == 3000
    finally:
        d.close()


def test_set_many_of_existing_keys_keeps_the_index_and_adds_in_place() -> None:
    """A bulk rebuild that deletes nothing and fits keeps the table size and its index,
    placing only the new keys; every key stays reachable, old and new."""
    d = shareit.open(backend="shm", value_type="float64", capacity=10_000)
    try:
        d.set_many(np.arange(2000), np.arange(2000.0))
        cap = d.info()["capacity"]
        d.set_many(np.arange(2000), np.arange(2000.0) + 0.5)  # every key exists
        d.set_many(np.arange(1500, 2500), np.full(1000, -1.0))  # half exist, half are new
        assert d.info()["capacity"] == cap
        expect = np.concatenate([np.arange(1500.0) + 0.5, np.full(1000, -1.0)])
        np.testing.assert_array_equal(d.get_many(np.arange(2500)), expect)
        assert d[1499] == 1499.5 and d[2499] == -1.0 and 2500 not in d
        assert d.verify() == []
    finally:
        d.close()


def insert_long_key_and_die(d) -> None:
    d["n"] = 1  # the first write in a child sets up its lock
    L.FAULT = "mid_entry"
    d["abcdefghijk"] = 5  # key bytes are on the heap when the writer dies
    os._exit(3)


def test_bulk_lookup_after_a_rolled_back_insert() -> None:
    """A rolled-back insert leaves its key bytes past the heap top; a shorter key written
    there later is zero-padded, so get_many, which compares whole words, finds it."""
    d = shareit.open(backend="shm", value_type="int64")
    try:
        d["n"] = 1
        child = FORK.Process(target=insert_long_key_and_die, args=(d,))
        child.start()
        assert join_all([child]) == [-signal.SIGKILL], "the fault point was not reached"
        d["xyz"] = 7
        assert "abcdefghijk" not in d
        np.testing.assert_array_equal(d.get_many(["xyz", "n"]), [7, 1])
        assert d.verify() == []
    finally:
        d.close()


# ---------------------------------------------------------------------------- large values


def _segment_bytes(name: str) -> int:
    from shareit.backends.shm.segments import all_paths

    return sum(os.stat(p).st_size for p in all_paths(name) if os.path.exists(p))


@pytest.mark.parametrize("size", [15 << 10, 60 << 10, 1 << 20, 4 << 20])
def test_a_large_value_rewritten_many_times_stays_bounded_on_disk(d, size: int) -> None:
    """One key's large value rewritten 40 times (each a different value, some shorter):
    the segment files in the runtime dir stay within a small multiple of the live bytes
    (free heap was once 32x the largest write: 336 MB for a 10 MB value). Up to 63.5 KB
    the value is rewritten in its own room: no rebuild at all."""
    d["small"] = "x"
    most = 0
    gen = d.info()["generation"]
    for i in range(40):
        value = bytes([i % 251]) * (size - (i % 3) * 1000)
        d["big"] = value
        most = max(most, _segment_bytes(d.name))
        assert d["big"] == value
    assert d.verify() == []
    assert most <= 4 * size + (1 << 20), f"{most:,} bytes on disk for {size:,} live"
    if size <= L.INPLACE_MAX_WORDS * 8:
        assert d.info()["generation"] - gen <= 2, "rewritten in place, not appended"


def rewrite_large_and_die(d, step: str, size: int) -> None:
    d["big"] = b"o" * size  # (this child places "big": its next write of it may go flat)
    d["big"] = b"\x01" * size
    L.FAULT = step
    d["big"] = b"\x02" * (size - 8)
    os._exit(3)


@pytest.mark.parametrize("size", [15 << 10, 60 << 10, 1 << 20])
@pytest.mark.parametrize("step", ["after_begin", "mid_entry", "after_write", "before_commit"])
def test_a_writer_killed_mid_large_overwrite_leaves_old_or_new(d, step: str, size: int) -> None:
    """A writer SIGKILLed inside the overwrite of a large value (15 and 60 KB: written in
    place, its old bytes journaled; 1 MB: appended): readers see the old value whole, and
    the next writer repairs the table."""
    d.update({"keep": "k", "big": b"o" * size})
    child = FORK.Process(target=rewrite_large_and_die, args=(d, step, size))
    child.start()
    assert join_all([child]) == [-signal.SIGKILL], "the fault point was not reached"
    assert d["big"] == b"\x01" * size, "read without the lock: the last committed value"
    assert d.verify() == []
    assert d.snapshot() == {"keep": "k", "big": b"\x01" * size}
    d["big"] = b"\x03" * size
    assert d["big"] == b"\x03" * size and d.verify() == []
