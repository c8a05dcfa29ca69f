"""Faults only a server backend has: the server killed, stopped or orphaned; round-trip counts."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import stat
import time

import pytest

import shareit
from helpers import gone, proc_state, wait_until
from shareit import _runtime
from shareit.backends import _manager_server
from shareit.testing import shareit_files


@pytest.fixture
def d(name):
    m = shareit.open(name, backend="manager", timeout=1.0)
    yield m
    m.close()
    assert shareit_files(name) == []


def test_killed_server_raises_backenddied_on_every_call_quickly(d) -> None:
    d["a"] = 1
    other = pickle.loads(pickle.dumps(d))
    assert other["a"] == 1
    os.kill(d.info()["pid"], signal.SIGKILL)
    wait_until(lambda: gone(d._proc.pid), what="server death")
    ops = [lambda: d["a"], lambda: d.__setitem__("b", 2), lambda: len(d), lambda: d.incr("a"),
           lambda: d.snapshot(), lambda: d.lock().acquire(), lambda: list(d), lambda: other["a"]]
    for op in ops * 2:  # every later call, not only the first
        started = time.monotonic()
        with pytest.raises(shareit.BackendDiedError, match="gone"):
            op()
        assert time.monotonic() - started < 1.0


def test_stopped_server_times_out_instead_of_hanging(d) -> None:
    d["a"] = 1
    pid = d.info()["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # kill() returns before it stops
        wait_until(lambda: proc_state(pid) == b"T", what="server stopped")
        started = time.monotonic()
        with pytest.raises(shareit.BackendTimeoutError, match="did not answer"):
            d["a"]
        elapsed = time.monotonic() - started
        assert 0.9 < elapsed < 1.15, (
            f"a stopped server made a call wait {elapsed:.2f} s (timeout 1 s)")
        assert isinstance(shareit.BackendTimeoutError("x"), TimeoutError)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert d["a"] == 1, "once the server answers again, a new call works"


def _own_then_report(name: str, conn) -> None:
    m = shareit.open(name, backend="manager")
    m["x"] = 1
    conn.send(m.info()["pid"])
    conn.recv()  # never answered: the parent kills us


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_server_outlives_its_killed_creator_while_used(name: str, method: str) -> None:
    """The lifetime rule: the creator's death takes nothing while another process uses
    the mapping; the last user's close removes it, server and files."""
    ctx = mp.get_context(method)
    parent_end, child_end = ctx.Pipe()
    owner = ctx.Process(target=_own_then_report, args=(name, child_end))
    owner.start()
    try:
        assert parent_end.poll(60), "owner never reported"
        server_pid = parent_end.recv()
        attached = shareit.open(name, backend="manager", create=False)
        assert attached["x"] == 1
        os.kill(owner.pid, signal.SIGKILL)
        owner.join(60)
        until = time.monotonic() + 3 * _manager_server.USERS_CHECK  # several of its checks
        while time.monotonic() < until:
            assert attached.incr("n") > 0 and not gone(server_pid)
        other = ctx.Process(target=_attach_and_incr, args=(name,))
        other.start()
        other.join(60)
        assert other.exitcode == 0, "a new process could not reach the surviving data"
        assert attached["x"] == 1 and attached["from_other"] == 1
        attached.close()  # the last live user leaves
        wait_until(lambda: gone(server_pid), what="server exit after the last user")
        wait_until(lambda: shareit_files(name) == [], what="record removal")
    finally:
        if owner.is_alive():
            owner.kill()
            owner.join()


def _attach_and_incr(name: str) -> None:
    m = shareit.open(name, backend="manager", create=False)
    m.incr("from_other")
    m.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_server_exits_when_its_only_user_is_killed(name: str, method: str) -> None:
    ctx = mp.get_context(method)
    parent_end, child_end = ctx.Pipe()
    owner = ctx.Process(target=_own_then_report, args=(name, child_end))
    owner.start()
    try:
        assert parent_end.poll(60), "owner never reported"
        server_pid = parent_end.recv()
        os.kill(owner.pid, signal.SIGKILL)
        owner.join(60)
        wait_until(lambda: gone(server_pid), what="server exit after its only user died")
        wait_until(lambda: shareit_files(name) == [], what="record removal")
    finally:
        if owner.is_alive():
            owner.kill()
            owner.join()


def test_persistent_mapping_outlives_its_owner(name: str) -> None:
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_create_persistent, args=(name,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    d = shareit.open(name, backend="manager", create=False)
    try:
        assert d["kept"] == [1, 2]
        pid = d.info()["pid"]
    finally:
        d.destroy()
    wait_until(lambda: gone(pid), what="persistent server exit after destroy")
    assert shareit_files(name) == []


def _create_persistent(name: str) -> None:
    m = shareit.open(name, backend="manager", persist=True)
    m["kept"] = [1, 2]
    m.close()


def test_record_is_private_and_holds_address_and_key(d, name: str) -> None:
    path = _runtime.meta_path(name)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    record = _runtime.read_meta(name)
    assert record["backend"] == "manager" and record["owner_pid"] == os.getpid()
    fields = record["fields"]
    assert "address" not in fields, "paths follow from the name, never from a record"
    assert len(bytes.fromhex(fields["authkey"])) == 32
    sock = _runtime.socket_path(name)
    assert d._address == sock and stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


def test_stale_record_of_dead_owner_is_replaced(name: str) -> None:
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    owner = ctx.Process(target=_own_then_report, args=(name, child_end))
    owner.start()
    assert parent_end.poll(60)
    parent_end.recv()
    os.kill(owner.pid, signal.SIGKILL)
    owner.join(60)
    d = shareit.open(name, backend="manager")  # the dead owner's mapping is not attached
    try:
        assert d._owner and len(d) == 0
    finally:
        d.close()


def test_bulk_operations_cost_one_round_trip(d) -> None:
    data = {f"k{i}": i for i in range(500)}

    def round_trips(fn) -> int:
        before = d.info()["requests"]
        fn()
        return d.info()["requests"] - before - 1  # minus the info() call itself

    assert round_trips(lambda: d.update(data)) == 1
    # dict(d) and {**d} list the keys, then read each key: every read a round trip of its
    # own (serving them from the listing's snapshot also served later reads at the same
    # call site from it: stale). A copy in one round trip is d.copy() or d.snapshot().
    assert round_trips(lambda: dict(d)) >= len(data)
    assert dict(d) == data
    assert round_trips(lambda: d.snapshot()) == 1
    assert round_trips(lambda: [k for k in d]) == 1  # noqa: C416 (iteration, not list())
    assert round_trips(lambda: list(d)) == 2  # list() asks len() first, as a length hint
    assert round_trips(lambda: [kv for kv in d.items()]) == 1  # noqa: C416 (as above)
    assert round_trips(lambda: [v for v in d.values()]) == 1  # noqa: C416 (as above)
    assert round_trips(lambda: d.copy()) == 1
    assert round_trips(lambda: d.incr("k1")) == 1
    assert round_trips(lambda: d.transform("k1", lambda v: v + 1)) == 2
    keys = list(d.keys())
    assert round_trips(lambda: d[keys[5]]) == 1, "a later read is never served from an old snapshot"
    assert round_trips(lambda: d.clear()) == 1
    assert len(d) == 0


def test_key_the_server_cannot_import_is_refused(d) -> None:
    d["a"] = 1
    with pytest.raises(TypeError, match="cannot load this key"):
        d[LocalKey(1)] = 2
    assert dict(d) == {"a": 1}


class LocalKey:
    """Defined in a test module the server process cannot import."""

    def __init__(self, v: int):
        self.v = v

    def __hash__(self) -> int:
        return hash(self.v)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalKey) and other.v == self.v


def test_owner_close_destroys_and_attacher_close_does_not(name: str) -> None:
    owner = shareit.open(name, backend="manager")
    owner["a"] = 1
    attached = shareit.open(name, backend="manager", create=False)
    attached.close()
    assert owner["a"] == 1
    pid = owner.info()["pid"]
    owner.close()
    wait_until(lambda: gone(pid), what="server exit")
    assert shareit_files(name) == []


def test_update_counts_pickled_values_and_merges_repeated_keys(d) -> None:
    """The server keeps count of pickled values (a snapshot of plain data skips unpickling);
    one update() of mixed, repeated and overwriting items keeps that count exact."""
    d["a"] = [1]
    d["b"] = 2
    d.update([("a", 3), ("b", [4]), ("c", [5]), ("c", 6), ("d", [7]), ("a", [8])])
    assert dict(d) == {"a": [8], "b": [4], "c": 6, "d": [7]}
    assert list(d) == ["a", "b", "c", "d"]
    assert d.info()["pickled_values"] == 3
    d.update({"a": 1, "b": 2, "d": 3})
    assert d.info()["pickled_values"] == 0 and d.snapshot() == {"a": 1, "b": 2, "c": 6, "d": 3}
