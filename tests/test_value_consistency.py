"""value consistency: update() seen whole or not at all (also after a killed writer), reads
that never wait for the writer lock or a stopped writer, and linearizable histories of real
processes (with kills)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

import shareit
from helpers import wait_stopped
from shareit.backends import value as V
from shareit.testing import join_all
from shareit.testing.linearizability import run_random_history

FORK = mp.get_context("fork")
TIMEOUT = 60
KEYS = ["a", "b", "c"]
MIX = (("get", 4), ("update", 3), ("snapshot", 2), ("set", 1), ("incr", 1))
#: A plain read must return well within this, whatever a writer is doing (timeout is 60 s).
PROMPT = 0.5




def state_of(d) -> dict:
    """Everything a plain reader can observe, each read its own way."""
    return {"get": {k: d.get(k, "<absent>") for k in KEYS}, "in": {k: k in d for k in KEYS},
            "len": len(d), "keys": sorted(d), "items": dict(d.items()),
            "snapshot": d.snapshot(), "array": d.values_array().tolist()}


def expected(state: dict) -> dict:
    return {"get": {k: state.get(k, "<absent>") for k in KEYS}, "in": {k: k in state for k in KEYS},
            "len": len(state), "keys": sorted(state), "items": state, "snapshot": state,
            "array": [state[k] for k in KEYS if k in state]}


def timed_state(d) -> tuple[dict, float]:
    t0 = time.monotonic()
    s = state_of(d)
    same = d == s["snapshot"] and list(d) == [k for k in KEYS if k in s["snapshot"]]
    return s, time.monotonic() - t0 if same else float("inf")


def read_state_into(d, out) -> None:
    out.put(timed_state(d))


def state_from_another_process(d) -> tuple[dict, float]:
    q = FORK.Queue()
    reader = FORK.Process(target=read_state_into, args=(d, q))
    reader.start()
    got = q.get(timeout=TIMEOUT)
    assert join_all([reader], TIMEOUT) == [0]
    return got


# ---------------------------------------------------------------------------- a. linearizability


def widen(step: str) -> None:
    """Stretch a bulk write between its slots (~50 µs) so reads land inside it far more
    often: without this the window is a few hundred ns and a broken backend passes."""
    t = time.perf_counter()
    while time.perf_counter() - t < 50e-6:
        pass


@pytest.mark.timeout(300)
@pytest.mark.parametrize("widened", [False, True], ids=["plain", "widened"])
@pytest.mark.parametrize("kill", [False, True], ids=["nokill", "kill"])
def test_a_random_histories_are_linearizable(kill: bool, widened: bool, monkeypatch) -> None:
    if widened:  # inherited by the forked workers
        monkeypatch.setattr(V, "FAULT", "mid_update")
        monkeypatch.setattr(V, "fault", widen)
    failed = []
    for r in range(20):
        d = shareit.open(backend="value", keys=KEYS, initial="absent")
        try:
            result = run_random_history(d, workers=3, ops_per_worker=80, keys=KEYS, mix=MIX,
                                        method="fork", kill=kill,
                                        seed=3000 + 100 * kill + 1000 * widened + r)
            if not result.ok:
                failed.append(result.explain())
        finally:
            d.close()
    assert not failed, f"{len(failed)} of 20 histories not linearizable; the first:\n{failed[0]}"


def update_in_a_loop(d, stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1
        d.update(a=x, b=x, c=x)


def read_pairs(d, stop, out) -> None:
    """Every way of reading two or more keys must see one update, never parts of two."""
    torn = reads = 0
    while not stop.is_set():
        a, c = d["a"], d["c"]
        s = d.snapshot()
        torn += (a > c) + (len(set(s.values())) != 1)  # c is read later: it may only be newer
        reads += 2
    out.put((torn, reads))


@pytest.mark.timeout(TIMEOUT)
def test_a_readers_never_see_half_an_update() -> None:
    d = shareit.open(backend="value", keys=KEYS)
    try:
        stop, out = FORK.Event(), FORK.Queue()
        writer = FORK.Process(target=update_in_a_loop, args=(d, stop))
        readers = [FORK.Process(target=read_pairs, args=(d, stop, out)) for _ in range(2)]
        writer.start()
        for p in readers:
            p.start()
        deadline = time.monotonic() + 3.0  # until enough updates ran under the readers
        while d["a"] < 20000 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling our own view of the counter, with a deadline
        stop.set()
        results = [out.get(timeout=TIMEOUT) for _ in readers]
        assert join_all([writer, *readers], TIMEOUT) == [0, 0, 0]
        torn, reads = map(sum, zip(*results))
        assert d["a"] >= 1000 and reads >= 1000, "the writer and readers did not overlap"
        assert torn == 0, f"{torn} of {reads} reads saw part of an update"
    finally:
        d.close()


# ---------------------------------------------------------------------------- b. killed writers

OLD = {"a": 1, "b": 2, "c": 3}


def die_in_bulk_write(d, step: str, op: str) -> None:
    V.FAULT = step  # SIGKILLs this process at that step
    if op == "update":
        d.update(a=10, b=20, c=30)
    else:
        d.clear()
    os._exit(3)  # the fault point was not reached


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("step, op", [("mid_update", "update"), ("before_commit", "update"),
                                      ("mid_update", "clear")])
def test_b_a_writer_killed_mid_update_is_seen_not_at_all(step: str, op: str) -> None:
    d = shareit.open(backend="value", keys=KEYS)
    try:
        d.update(OLD)
        child = FORK.Process(target=die_in_bulk_write, args=(d, step, op))
        child.start()
        assert join_all([child], TIMEOUT) == [-signal.SIGKILL], "the fault point was not reached"
        assert d._hdr[V._BEGUN] != d._hdr[V._ENDED], "nobody has rolled it back yet"
        state, took = state_from_another_process(d)
        assert state == expected(OLD), "another process sees part of a dead writer's update"
        assert took < PROMPT, f"plain reads took {took:.3f} s after a dead writer"
        state, took = timed_state(d)
        assert state == expected(OLD) and took < PROMPT
        d["b"] = 5  # the next writer rolls the dead one back
        assert d._hdr[V._BEGUN] == d._hdr[V._ENDED]
        assert state_of(d) == expected({**OLD, "b": 5})
    finally:
        d.close()


def update_until_killed(d, arm: int) -> None:
    x = 0
    while True:
        x += 1
        if x == arm:
            V.FAULT = "mid_update"  # this update dies after its first slot
        d.update(a=x, b=x, c=x)


def read_until(d, stop, out) -> None:
    """Count reads that see values of two different updates (or none of the keys)."""
    torn = reads = 0
    while not stop.is_set():
        a, b, c = d["a"], d["b"], d["c"]
        s = d.snapshot()
        torn += (not a <= b <= c) + (len(set(s.values())) != 1) + (len(d) != 3)
        reads += 1
    out.put((torn, reads, d.snapshot()))


@pytest.mark.timeout(TIMEOUT)
def test_b_readers_racing_a_writer_killed_mid_update() -> None:
    d = shareit.open(backend="value", keys=KEYS)
    try:
        stop, out = FORK.Event(), FORK.Queue()
        readers = [FORK.Process(target=read_until, args=(d, stop, out)) for _ in range(2)]
        writer = FORK.Process(target=update_until_killed, args=(d, 3000))
        for p in readers:
            p.start()
        writer.start()
        assert join_all([writer], TIMEOUT) == [-signal.SIGKILL]
        last = d.snapshot()  # the dead writer's update is never repaired in this test
        deadline = time.monotonic() + 0.2  # readers go on reading the abandoned state a while
        while time.monotonic() < deadline:
            time.sleep(0.01)  # letting the readers run, with a deadline (no one to wait for)
        stop.set()
        results = [out.get(timeout=TIMEOUT) for _ in readers]
        assert join_all(readers, TIMEOUT) == [0, 0]
        assert last == {"a": 2999, "b": 2999, "c": 2999}, "the last committed update"
        for torn, reads, seen in results:
            assert torn == 0, f"{torn} of {reads} reads saw part of an update"
            assert seen == last
    finally:
        d.close()


# ---------------------------------------------------------------------------- c. stopped writers


def hold_lock_and_stop(d) -> None:
    with d.lock():
        d["a"] = 7
        os.kill(os.getpid(), signal.SIGSTOP)  # stopped while holding every mutex
    os._exit(0)


def stop_once(step: str) -> None:
    if step == V.FAULT:
        V.FAULT = None  # "mid_update" comes once per slot: stop at the first only
        os.kill(os.getpid(), signal.SIGSTOP)


def stop_in_bulk_write(d, step: str) -> None:
    V.FAULT, V.fault = step, stop_once
    d.update(a=10, b=20, c=30)
    os._exit(0)


class StopAtStore:
    """Stands in for the value slots of one process: a single-key write stops (SIGSTOP) at
    its value store, after it marked its key as being written."""

    def __init__(self, slots, before: bool):
        self.slots, self.before = slots, before

    def __setitem__(self, i, v) -> None:
        if self.before:
            os.kill(os.getpid(), signal.SIGSTOP)
        self.slots[i] = v
        if not self.before:
            os.kill(os.getpid(), signal.SIGSTOP)


def stop_in_single_write(d, what: str) -> None:
    d._vset = StopAtStore(d._vset, before=what == "before_value")
    d["a"] = 10
    os._exit(0)


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("how", ["lock", "mid_update", "before_commit", "before_value",
                                 "after_value"])
def test_c_reads_do_not_wait_for_a_stopped_writer(how: str) -> None:
    d = shareit.open(backend="value", keys=KEYS, timeout=0.5)
    try:
        d.update(OLD)
        if how == "lock":
            child = FORK.Process(target=hold_lock_and_stop, args=(d,))
            now, after = {**OLD, "a": 7}, {**OLD, "a": 7}
        elif how in ("mid_update", "before_commit"):
            child = FORK.Process(target=stop_in_bulk_write, args=(d, how))
            now, after = OLD, {"a": 10, "b": 20, "c": 30}
        else:
            child = FORK.Process(target=stop_in_single_write, args=(d, how))
            now, after = {**OLD, "a": 1 if how == "before_value" else 10}, {**OLD, "a": 10}
        child.start()
        try:
            wait_stopped(child.pid)
            for state, took in (state_from_another_process(d), timed_state(d)):
                assert state == expected(now)
                assert took < PROMPT, f"plain reads took {took:.3f} s behind a stopped writer"
            with pytest.raises(shareit.LockTimeoutError):
                d["a"] = 99  # a writer does wait for it, and gives up after timeout
            os.kill(child.pid, signal.SIGCONT)
            assert join_all([child], TIMEOUT) == [0]
        finally:
            if child.is_alive():  # never leave a stopped child behind: exit would wait for it
                child.kill()
                child.join()
        assert state_of(d) == expected(after)
    finally:
        d.close()
