"""The shm backend's use of process and machine resources: descriptors and mappings of
handles received and dropped, a full runtime dir, the read cache, and heap sizing."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import tempfile

import pytest

import shareit
from shareit import _runtime
from shareit.backends.shm import layout as L
from shareit.backends.shm import mapping as shm_mapping
from shareit.errors import CapacityError, ShareitError
from shareit.testing import shareit_files

MB = 1 << 20
TIMEOUT = 120


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def mapped(stem: str) -> tuple[int, int]:
    """(mappings of ``stem``'s segments, of those whose file is deleted) in this process."""
    head = os.path.join(_runtime.runtime_dir(), stem + _runtime.SEP)
    lines = [ln for ln in open("/proc/self/maps") if head in ln]
    return len(lines), sum(1 for ln in lines if ln.rstrip().endswith("(deleted)"))


def segment_bytes(name: str) -> tuple[int, int]:
    """(apparent size, allocated bytes) of every segment of ``name``."""
    size = blocks = 0
    for f in shareit_files(name):
        if "@ctl" in f or "@g" in f:
            st = os.stat(os.path.join(_runtime.runtime_dir(), f))
            size, blocks = size + st.st_size, blocks + st.st_blocks * 512
    return size, blocks


# ------------------------------------------------------------------ handles received and dropped


def receive_and_drop(blob: bytes, rounds: int, write: bool) -> None:
    for i in range(rounds):
        e = pickle.loads(blob)  # what a Pool worker does with each task's handle
        assert e["fixed"] == "v" * 100
        if write:
            e[f"w{i % 5}"] = i
        del e


@pytest.mark.parametrize("lock", ["robust", "flock"])
def test_handles_received_and_dropped_hold_no_descriptors_or_mappings(name, lock,
                                                                      monkeypatch) -> None:
    if lock == "flock":
        monkeypatch.setattr(shm_mapping, "robust_mutex_available", lambda: False)
    d = shareit.open(name, backend="shm")
    try:
        d["fixed"] = "v" * 100
        blob = pickle.dumps(d)
        receive_and_drop(blob, 50, write=True)  # first use: numpy, ctypes, the flock fd
        fds, (maps, deleted) = fd_count(), mapped(name)
        for round_ in range(10):
            receive_and_drop(blob, 100, write=True)
            for i in range(300):  # the owner grows: the generations dropped handles saw go away
                d[f"grow{round_}-{i}"] = "x" * 64
        assert fd_count() <= fds, "no descriptor per handle (the flock fallback: one per process)"
        now_maps, now_deleted = mapped(name)
        assert now_maps <= maps and now_deleted == 0 == deleted, open("/proc/self/maps").read()
        assert d["fixed"] == "v" * 100 and d.verify() == []
    finally:
        d.close()
    assert mapped(name) == (0, 0)


def test_close_and_drop_leave_nothing_mapped(name) -> None:
    d = shareit.open(name, backend="shm", value_type="float64")
    try:
        d.set_many(list(range(1000)), [0.5] * 1000)
        e = pickle.loads(pickle.dumps(d))
        arr = e.values_array()  # a copy: it must not keep e's segments mapped
        gc.collect()
        before = mapped(name)[0]
        del e
        assert mapped(name)[0] == before - 2 and arr.sum() == 500.0
        e = pickle.loads(pickle.dumps(d))
        e.close()
        assert mapped(name)[0] == before - 2
        with pytest.raises(shareit.errors.ClosedError):
            e[1]
    finally:
        d.close()


def pool_task(args: tuple) -> int:
    blob, i = args
    e = pickle.loads(blob)
    e[f"t{i % 10}"] = e["fixed"]
    return fd_count()


def test_a_pool_of_1200_single_handle_tasks_keeps_its_descriptors(name) -> None:
    """The issue's joblib run: batch_size=1 tasks that each get the handle."""
    d = shareit.open(name, backend="shm")
    try:
        d["fixed"] = 1
        blob = pickle.dumps(d)
        with mp.get_context("fork").Pool(1) as pool:
            counts = pool.map(pool_task, [(blob, i) for i in range(1200)], chunksize=1)
        assert max(counts) == counts[50], counts[50:]
        assert d["t9"] == 1
    finally:
        d.close()


# ---------------------------------------------------------------------------- a full runtime dir

FILL = r"""
import sys
import shareit
from shareit.errors import CapacityError
d = shareit.open(sys.argv[1], backend="shm", create=False)
n = 0
try:
    while True:
        d[f"big{n}"] = bytes([n % 251]) * (256 * 1024)
        n += 1
except CapacityError as exc:
    assert "SHAREIT_RUNTIME_DIR" in str(exc) and "is full" in str(exc), exc
    assert n > 0 and f"big{n}" not in d and len(d) == n + 1, n
    d["counter"] = 2  # in place: still works
    d.incr("counter")
    del d["big0"]  # a delete wants to compact: optional, skipped without room
    print(n, flush=True)
"""


@pytest.fixture
def small_tmpfs(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where = tempfile.mkdtemp(prefix="shareit-tmpfs-")
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", where],
                              capture_output=True, text=True)
    except OSError as exc:
        os.rmdir(where)
        pytest.skip(f"cannot run mount: {exc}")
    if proc.returncode != 0:
        os.rmdir(where)
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        monkeypatch.setenv("SHAREIT_RUNTIME_DIR", where)
        yield where
    finally:
        monkeypatch.undo()
        subprocess.run(["umount", "-l", where], capture_output=True)
        os.rmdir(where)


def test_a_full_runtime_dir_raises_capacity_error_not_sigbus(small_tmpfs, name) -> None:
    assert _runtime.runtime_dir().startswith(small_tmpfs)
    d = shareit.open(name, backend="shm")
    try:
        d["counter"] = 1
        proc = subprocess.run([sys.executable, "-c", FILL, name], capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert proc.returncode == 0, (proc.returncode, proc.stderr)  # -7 would be SIGBUS
        n = int(proc.stdout)
        assert n >= 8, "most of the 8 MB was used before the error"
        assert d["counter"] == 3 and "big0" not in d and len(d) == n
        for i in range(1, n):  # everything written before the error, intact, read here
            assert d[f"big{i}"] == bytes([i % 251]) * (256 * 1024), i
        assert d.verify() == []
        d.clear()  # a small new generation fits again, and writes work again
        d["after"] = b"y" * (256 * 1024)
        assert d["after"] == b"y" * (256 * 1024)
    finally:
        d.close()
    assert os.listdir(_runtime.runtime_dir()) == []


def test_an_impossible_capacity_is_refused_at_open(small_tmpfs, name) -> None:
    with pytest.raises(CapacityError, match="SHAREIT_RUNTIME_DIR") as info:
        shareit.open(name, backend="shm", capacity=10**12)
    assert isinstance(info.value, ShareitError)
    assert os.listdir(_runtime.runtime_dir()) == [], "nothing is left behind"
    assert os.statvfs(small_tmpfs).f_bfree == os.statvfs(small_tmpfs).f_blocks


# ---------------------------------------------------------------------------- memory bounds


def test_the_read_cache_is_bounded_in_bytes(name) -> None:
    d = shareit.open(name, backend="shm")
    try:
        d.update({f"v{i}": bytes([i]) * (5 * MB) for i in range(100)})
        e = pickle.loads(pickle.dumps(d))  # a reader with a cache of its own
        for _ in range(2):
            for i in range(100):
                assert e[f"v{i}"][:1] == bytes([i])
                assert e._t.cache.nbytes <= L.CACHE_BYTES
        cached = sum(hit[7] for hit in e._cache.values())
        assert cached == e._t.cache.nbytes and 0 < cached <= L.CACHE_BYTES
        assert e["v99"][:1] == bytes([99]) and e["v0"][:1] == bytes([0])  # evicted: read again
        big = b"z" * (L.CACHE_VALUE_MAX + 1)
        d["huge"] = big
        assert e["huge"] == big and "huge" not in e._cache, "a huge value is never cached"
    finally:
        d.close()


def test_one_200mb_value_makes_a_generation_of_about_twice_it(name) -> None:
    d = shareit.open(name, backend="shm")
    try:
        d["big"] = b"b" * (200 * MB)
        size, blocks = segment_bytes(name)
        assert size <= 2.2 * 200 * MB and blocks <= 2.2 * 200 * MB, (size, blocks)
        assert blocks >= 200 * MB, "allocated in full (no sparse file to SIGBUS on)"
        assert len(d["big"]) == 200 * MB
    finally:
        d.close()


def test_a_rewritten_10mb_value_keeps_the_mapping_small(name) -> None:
    d = shareit.open(name, backend="shm")
    try:
        most = 0
        for i in range(32):
            d["k"] = bytes([i]) * (10 * MB)
            most = max(most, *segment_bytes(name))
        assert most <= 5 * 10 * MB, most
        assert d["k"] == bytes([31]) * (10 * MB) and len(d) == 1
    finally:
        d.close()
