"""The lifetime rule, attacked: a named mapping lives while any process uses it.

Creators are SIGKILLed or exit, replacements attach, six processes race to
open a name whose last user died, forked children close their copies -- and the
data must neither vanish under a live user, nor split into two copies under
one name, nor outlive its last user.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pytest

import shareit
from helpers import gone, wait_until
from shareit import _runtime
from shareit.testing import join_all, shareit_files

FORK = mp.get_context("fork")
TIMEOUT = 60
BACKENDS = ["shm", "manager", "queue"]


def _create_and_wait(name, backend, ready, done) -> None:
    d = shareit.open(name, backend=backend)
    d["hits"] = 1
    ready.set()
    done.wait(TIMEOUT)  # until SIGKILLed, or told to exit normally (exit hooks run)
    d["creator_left"] = True


def _attach_and_incr(name, backend, out) -> None:
    d = shareit.open(name, backend=backend, create=False)
    out.put(d.incr("hits"))
    d.close()


def _server_pid(d):
    return d.info()["pid"] if hasattr(d, "info") and d.backend != "shm" else None


@pytest.mark.parametrize("how", ["SIGKILL", "exit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_creator_leaving_takes_nothing_while_others_use_it(name, backend, how) -> None:
    ready, done = FORK.Event(), FORK.Event()
    creator = FORK.Process(target=_create_and_wait, args=(name, backend, ready, done))
    creator.start()
    assert ready.wait(TIMEOUT)
    survivor = shareit.open(name, backend=backend, create=False)
    try:
        assert survivor["hits"] == 1
        if how == "SIGKILL":
            os.kill(creator.pid, signal.SIGKILL)
        else:
            done.set()
        creator.join(TIMEOUT)
        assert survivor.incr("hits") == 2, "the data went with its creator"
        out = FORK.Queue()
        replacement = FORK.Process(target=_attach_and_incr, args=(name, backend, out))
        replacement.start()
        replacement.join(TIMEOUT)
        assert replacement.exitcode == 0 and out.get(timeout=TIMEOUT) == 3, "split in two"
        assert survivor["hits"] == 3
        server = _server_pid(survivor)
    finally:
        survivor.close()  # the last live user: now it goes
    assert shareit_files(name) == []
    if server is not None:
        wait_until(lambda: not _runtime.pid_alive(server) or gone(server), "server exit")


def _open_incr_report(name, backend, barrier, out) -> None:
    barrier.wait(TIMEOUT)  # all six open at once
    d = shareit.open(name, backend=backend)
    out.put((_runtime.read_meta(name)["created"], d.incr("n")))
    barrier.wait(TIMEOUT)  # nobody leaves before everyone has counted
    d.close()


def _create_then_die(name, backend, ready) -> None:
    d = shareit.open(name, backend=backend)
    d["old"] = 1
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("backend,rounds", [("shm", 50), ("manager", 50), ("queue", 50)])
def test_concurrent_openers_after_the_last_user_died_end_with_one_mapping(name, backend,
                                                                          rounds) -> None:
    for r in range(rounds):
        ready = FORK.Event()
        dead = FORK.Process(target=_create_then_die, args=(name, backend, ready))
        dead.start()
        dead.join(TIMEOUT)
        assert ready.is_set() and dead.exitcode == -signal.SIGKILL
        barrier, out = FORK.Barrier(6), FORK.Queue()
        procs = [FORK.Process(target=_open_incr_report, args=(name, backend, barrier, out))
                 for _ in range(6)]
        for p in procs:
            p.start()
        codes = join_all(procs, TIMEOUT)
        assert codes == [0] * 6, f"round {r}: an opener failed: {codes}"
        got = sorted(out.get(timeout=TIMEOUT) for _ in range(6))
        assert len({created for created, _ in got}) == 1, f"round {r}: two mappings: {got}"
        assert [n for _, n in got] == [1, 2, 3, 4, 5, 6], f"round {r}: {got}"
        # They were all started by this process, which outlives them: it keeps the mapping
        # for workers that would come back (a reload), until it removes it itself.
        record = _runtime.read_meta(name)
        assert record["users"] == [] and record["keeper"][0] == os.getpid(), record
        shareit.destroy(name)
        assert shareit_files(name) == []


def _close_in_child(d) -> None:
    d.close()


@pytest.mark.parametrize("named", [True, False], ids=["named", "anonymous"])
@pytest.mark.parametrize("backend", BACKENDS + ["value"])
def test_a_forked_childs_close_only_detaches_the_child(name, backend, named) -> None:
    opts = {"keys": ["a"]} if backend == "value" else {}
    d = shareit.open(name if named else None, backend=backend, **opts)
    try:
        d["a"] = 1
        p = FORK.Process(target=_close_in_child, args=(d,))
        p.start()
        p.join(TIMEOUT)
        assert p.exitcode == 0
        d["a"] = 2
        assert d["a"] == 2, "a child's close() removed the parent's mapping"
    finally:
        d.close()


def _use_handle_and_drop(d, out, go) -> None:
    out.put(d.incr("n"))  # a Pool task's handle: used, then dropped without close()
    go.wait(TIMEOUT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_handle_passed_to_a_process_keeps_the_mapping_alive_for_it(name, backend) -> None:
    ctx = mp.get_context("spawn")
    d = shareit.open(name, backend=backend)
    d["n"] = 0
    out, go = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_use_handle_and_drop, args=(d, out, go))
    p.start()
    try:
        assert out.get(timeout=TIMEOUT) == 1
        users = [pid for pid, _ in _runtime.read_meta(name)["users"]]
        assert sorted(users) == sorted([os.getpid(), p.pid]), "the receiver is not counted"
        d.close()  # the creator leaves; the receiver still uses it
        assert shareit_files(name) != [], "removed under a process that uses it"
    finally:
        go.set()
        p.join(TIMEOUT)
    assert p.exitcode == 0
    wait_until(lambda: shareit_files(name) == [], "removal by the last user's exit")


def test_only_the_last_user_leaving_removes_a_named_mapping(name) -> None:
    a = shareit.open(name)
    b = shareit.open(name)  # the same process, twice
    a["x"] = 1
    a.close()
    assert b["x"] == 1
    b.close()
    assert shareit_files(name) == []
    with pytest.raises(shareit.NotFoundError):
        shareit.open(name, create=False)


def _open_incr_close(name, backend, out, both_open) -> None:
    d = shareit.open(name, backend=backend)
    out.put(d.incr("n"))
    both_open.wait(TIMEOUT)  # workers of one server run side by side
    d.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_workers_restarted_all_at_once_find_their_data_while_their_supervisor_lives(
        name, backend) -> None:
    """A graceful reload: every worker leaves before the new ones open the name. The
    process that started them (this one: a gunicorn master) keeps the mapping."""
    out = FORK.Queue()
    for _generation in range(3):
        both_open = FORK.Barrier(2)
        workers = [FORK.Process(target=_open_incr_close, args=(name, backend, out, both_open))
                   for _ in range(2)]
        for w in workers:
            w.start()
        assert join_all(workers, TIMEOUT) == [0, 0]
    assert sorted(out.get(timeout=TIMEOUT) for _ in range(6)) == [1, 2, 3, 4, 5, 6]
    keeper = _runtime.read_meta(name)["keeper"]
    assert keeper == [os.getpid(), _runtime.proc_start_time(os.getpid())]
    assert "nothing to remove" in _gc_output(), "gc removed a mapping its keeper holds"
    shareit.destroy(name)


def test_a_script_that_exits_takes_its_mapping_with_it(name) -> None:
    """The keeper rule needs a parent that started two users: one script run from a
    shell (whose parent outlives it) removes its mapping when it ends."""
    code = ("import shareit, sys; d = shareit.open(sys.argv[1]); d['x'] = 1")
    for _ in range(2):  # one after the other: never two users of one parent at once...
        subprocess.run([sys.executable, "-c", code, name], check=True, timeout=TIMEOUT)
        assert shareit_files(name) == [], "a finished script's mapping was kept"


def _gc_output() -> str:
    proc = subprocess.run([sys.executable, "-m", "shareit", "gc"], capture_output=True,
                          text=True, timeout=TIMEOUT)
    return proc.stdout


@pytest.mark.parametrize("backend", ["manager", "queue"])
def test_attaching_by_name_needs_no_backend(name, backend) -> None:
    d = shareit.open(name, backend=backend)
    try:
        d["x"] = 1
        with shareit.open(name, create=False) as e:  # nothing chose a backend: the record's
            assert e.backend == backend and e["x"] == 1
        with shareit.open(name) as e:
            assert e.backend == backend
        with pytest.raises(shareit.ConfigError, match=f"exists with backend {backend!r}"):
            shareit.open(name, backend="shm")  # an explicit choice is not overridden
    finally:
        d.close()
