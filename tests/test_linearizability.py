"""The linearizability checker itself: it passes correct histories and catches broken stores.

A checker that never fails proves nothing, so half of these tests build
stores that are wrong on purpose -- ``incr`` as a read then a write, reads
from a per-process copy that never refreshes, ``update`` one key at a time --
run them in real processes, and require the checker to say so.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

import shareit
from shareit.testing.linearizability import (
    INF,
    Op,
    check,
    run_random_history,
    run_token_ring,
)

ROUNDS = 6  # a broken store must be caught within this many recorded histories


def op(worker, kind, key, arg, t0, t1, result=None, known=True) -> Op:
    return Op(worker, 0, kind, key, arg, float(t0), float(t1), result, known)


# ---------------------------------------------------------------------------- hand-made histories


def test_sequential_history_that_reads_its_writes_passes() -> None:
    h = [op("p", "set", "a", 1, 0, 1), op("p", "get", "a", None, 2, 3, 1),
         op("p", "incr", "a", 2, 4, 5, 3), op("p", "del", "a", None, 6, 7, True),
         op("p", "get", "a", None, 8, 9, "<absent>")]
    assert check(h).ok


def test_a_stale_read_after_a_completed_write_fails() -> None:
    h = [op("p", "set", "a", 1, 0, 1), op("p", "set", "a", 2, 2, 3),
         op("q", "get", "a", None, 4, 5, 1)]
    result = check(h)
    assert not result.ok
    text = result.explain()
    assert "NOT linearizable" in text and "get('a') -> 1" in text and ">>" in text


def test_a_read_concurrent_with_a_write_may_see_either_value() -> None:
    for seen in (1, 2):
        h = [op("p", "set", "a", 1, 0, 1), op("p", "set", "a", 2, 2, 6),
             op("q", "get", "a", None, 3, 4, seen)]
        assert check(h).ok


def test_an_operation_of_a_killed_process_may_happen_later_or_never() -> None:
    killed = op("k", "set", "a", 9, 1, INF, known=False)
    for later in (0, 9):
        h = [op("p", "set", "a", 0, 0, 0.5), killed, op("q", "get", "a", None, 5, 6, later)]
        assert check(h).ok
    flipflop = [op("p", "set", "a", 0, 0, 0.5), killed, op("q", "get", "a", None, 5, 6, 9),
                op("q", "get", "a", None, 7, 8, 0)]
    assert not check(flipflop).ok, "once seen, a write cannot be undone"


def test_two_increments_may_not_return_the_same_value() -> None:
    h = [op("p", "incr", "n", 1, 0, 5, 1), op("q", "incr", "n", 1, 1, 6, 1)]
    assert not check(h).ok


def test_update_must_be_seen_whole_or_not_at_all() -> None:
    torn = [op("p", "update", None, {"a": 1, "b": 1}, 0, 10),
            op("q", "get", "a", None, 1, 2, 1), op("q", "get", "b", None, 3, 4, "<absent>")]
    assert not check(torn).ok
    whole = [op("p", "update", None, {"a": 1, "b": 1}, 0, 10),
             op("q", "get", "a", None, 1, 2, 1), op("q", "get", "b", None, 3, 4, 1)]
    assert check(whole).ok


def test_a_snapshot_must_be_one_state() -> None:
    h = [op("p", "set", "a", 1, 0, 1), op("p", "set", "b", 1, 2, 3),
         op("q", "snapshot", None, None, 4, 5, {"a": 1})]
    assert not check(h).ok
    h[-1] = op("q", "snapshot", None, None, 4, 5, {"a": 1, "b": 1})
    assert check(h).ok


def test_keys_no_operation_spans_are_checked_apart() -> None:
    h = [op("p", "set", str(k), k, 2 * k, 2 * k + 1) for k in range(200)]
    h += [op("q", "get", str(k), None, 500 + k, 500.5 + k, k) for k in range(200)]
    result = check(h)
    assert result.ok and result.groups == 200


# ---------------------------------------------------------------------------- broken stores


class NonAtomicIncr:
    """incr as get-then-set: lost updates under concurrency."""

    def __init__(self, d):
        self.d = d

    def __getitem__(self, k):
        return self.d[k]

    def __setitem__(self, k, v):
        self.d[k] = v

    def incr(self, k, delta=1):
        v = self.d.get(k, 0) + delta
        time.sleep(0.0005)  # widen the window between the read and the write
        self.d[k] = v
        return v

    def snapshot(self):
        return self.d.snapshot()


class StaleCopy(NonAtomicIncr):
    """Reads from a per-process copy that is filled once and never refreshed."""

    def __init__(self, d):
        super().__init__(d)
        self.cache: dict = {}
        self.pid = 0

    def __getitem__(self, k):
        if self.pid != os.getpid():
            self.cache, self.pid = {}, os.getpid()
        if k not in self.cache:
            self.cache[k] = self.d[k]
        return self.cache[k]


class KeyByKeyUpdate(NonAtomicIncr):
    """update() as one set per key: readers see half of it."""

    def update(self, items):
        for k, v in items.items():
            self.d[k] = v
            time.sleep(0.001)


@pytest.fixture
def shm():
    d = shareit.open(backend="shm")
    yield d
    d.close()


def _caught(run) -> str:
    """The explanation of the first failed history (its logs are kept, and removed here)."""
    for _ in range(ROUNDS):
        result = run()
        if not result.ok:
            logs = re.search(r"logs in (\S+)\)", result.failure)
            assert logs and os.path.isdir(logs[1]), "a failed history keeps its logs"
            shutil.rmtree(logs[1])
            return result.explain()
    return ""


def test_catches_incr_as_read_then_write(shm) -> None:
    text = _caught(lambda: run_random_history(NonAtomicIncr(shm), workers=3, ops_per_worker=40,
                                              keys=["n"], mix=(("incr", 1),)))
    assert "incr('n'" in text, "the checker missed lost increments"


def test_catches_reads_from_a_stale_copy(shm) -> None:
    shm["tok"] = -1
    text = _caught(lambda: run_token_ring(StaleCopy(shm), workers=3, rounds=5))
    assert "get('tok')" in text, "the checker missed reads from a stale per-process copy"


def test_catches_update_one_key_at_a_time(shm) -> None:
    text = _caught(lambda: run_random_history(
        KeyByKeyUpdate(shm), workers=3, ops_per_worker=40, keys=["a", "b"],
        mix=(("update", 2), ("snapshot", 2), ("get", 2))))
    assert "NOT linearizable" in text, "the checker missed a torn update()"


def test_passes_a_correct_store_on_the_same_workloads(shm) -> None:
    for _ in range(3):
        for run in (
            lambda: run_random_history(shm, workers=3, ops_per_worker=40, keys=["n"],
                                       mix=(("incr", 1),)),
            lambda: run_token_ring(shm, workers=3, rounds=5),
            lambda: run_random_history(shm, workers=3, ops_per_worker=40, keys=["a", "b"],
                                       mix=(("update", 2), ("snapshot", 2), ("get", 2))),
            lambda: run_random_history(shm, workers=3, ops_per_worker=40, kill=True),
        ):
            result = run()
            assert result.ok, result.explain()
