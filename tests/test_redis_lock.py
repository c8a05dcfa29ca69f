"""The redis lock() is a fenced lease: a holder that lost it writes nothing.

On the real redis-server that ``test_redis`` starts (its fixture is reused),
with real processes: a holder stopped past its lease (SIGSTOP) resumes and
finds every write refused with LockLostError, while the process that took
the lock meanwhile keeps all its effects.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import uuid

import pytest

import shareit
from helpers import proc_state, wait_until
from shareit.backends import redis as redis_backend
from test_redis import SERVER, _raw, redis_server  # noqa: F401 - the module's server fixture

FORK = mp.get_context("fork")
TIMEOUT = 30.0


@pytest.fixture
def d():
    m = shareit.open(f"lock-{uuid.uuid4().hex[:8]}", backend="redis", url=SERVER["url"])
    yield m
    m.destroy()


def _hold(d) -> redis_backend._Hold:
    return d._held[threading.get_ident()]


def _stop_renewing(d, monkeypatch) -> None:
    """This process stops renewing and stops noticing a loss: only Redis can refuse now."""
    monkeypatch.setattr(d, "_renew_one", lambda hold: None)


# ---------------------------------------------------------------------- the stopped holder


def hold_then_write_after_resume(d, held, go, conn) -> None:
    report = []
    try:
        with d.lock():
            d["before"] = "A"  # written while the lease was good: kept
            held.set()
            go.wait(TIMEOUT)  # the parent stops us here, past the lease, then lets us go
            for what, write in (("set", lambda: d.__setitem__("x", 1)),
                                ("incr", lambda: d.incr("n"))):
                try:
                    write()
                    report.append((what, "written"))
                except Exception as exc:
                    report.append((what, type(exc).__name__))
    except Exception as exc:  # leaving the block must not say it a second time
        report.append(("release", type(exc).__name__))
    conn.send(report)


def take_lock_and_count(d, times) -> None:
    with d.lock(timeout=TIMEOUT):
        for _ in range(times):
            d.incr("n")


@pytest.mark.timeout(90)
def test_stopped_holder_resumes_and_its_writes_raise_and_change_nothing(d) -> None:
    held, go = FORK.Event(), FORK.Event()
    ours, theirs = FORK.Pipe(duplex=False)
    a = FORK.Process(target=hold_then_write_after_resume, args=(d, held, go, theirs))
    a.start()
    b = None
    try:
        assert held.wait(TIMEOUT), "A did not take the lock"
        os.kill(a.pid, signal.SIGSTOP)
        wait_until(lambda: proc_state(a.pid) == b"T", "A stopped")
        wait_until(lambda: not _raw().exists(d._lock_key), "A's lease expired", TIMEOUT)
        b = FORK.Process(target=take_lock_and_count, args=(d, 100))
        b.start()
        b.join(TIMEOUT)
        assert b.exitcode == 0, "B took the lock and counted to 100"
        os.kill(a.pid, signal.SIGCONT)
        go.set()
        assert ours.poll(TIMEOUT), "A did not report"
        assert ours.recv() == [("set", "LockLostError"), ("incr", "LockLostError")]
        a.join(TIMEOUT)
        assert a.exitcode == 0
    finally:
        for p in (a, b):
            if p is not None and p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.join(TIMEOUT)
    assert d.snapshot() == {"before": "A", "n": 100}, "only B's effects after A's lease ran out"
    assert not _raw().exists(d._lock_key), "A's leaving did not release what it no longer held"


# ---------------------------------------------------------------------- fencing in Redis itself


def test_every_write_in_a_lost_lock_is_refused_by_redis(d, monkeypatch) -> None:
    _stop_renewing(d, monkeypatch)
    d.update(a=1, b=[1])
    before = _raw().hgetall(d._key)
    writes = {
        "set": lambda: d.__setitem__("x", 1), "incr": lambda: d.incr("a"),
        "float incr": lambda: d.incr("a", 0.5), "update": lambda: d.update(a=2, y=3),
        "clear": d.clear, "del": lambda: d.__delitem__("a"), "pop": lambda: d.pop("a"),
        "setdefault": lambda: d.setdefault("z", 1),
        "transform": lambda: d.transform("a", lambda v: v + 1),
        "edit": lambda: _edit_append(d, "b"),
    }
    for holder in (None, b"someone-else"):  # expired and free, or expired and taken since
        for what, write in writes.items():
            with d.lock():
                _raw().delete(d._lock_key)
                if holder is not None:
                    _raw().set(d._lock_key, holder)
                assert not _hold(d).lost, (
                    "the refusal below comes from Redis, not from this process")
                with pytest.raises(shareit.LockLostError, match="nothing was written"):
                    write()
                assert _hold(d).lost
                with pytest.raises(shareit.LockLostError):
                    d["again"] = 1  # known lost now: refused without asking Redis
            assert _raw().hgetall(d._key) == before, f"{what} changed something"
            assert _raw().get(d._lock_key) == holder, "leaving released nothing it did not hold"
            _raw().delete(d._lock_key)


def _edit_append(d, key) -> None:
    with d.edit(key) as v:
        v.append(2)


def test_the_write_script_refuses_a_stale_token_and_lets_the_lockless_through(d) -> None:
    keys = [d._key, d._lock_key, d._meta_key]
    d._r()
    setter = d._scripts["set"]
    import redis

    for lock_value in (None, b"other"):
        _raw().delete(d._lock_key)
        if lock_value:
            _raw().set(d._lock_key, lock_value)
        with pytest.raises(redis.exceptions.ResponseError, match=r"^LOST$"):
            setter(keys, ["mine", b"k", b"1"])
    with pytest.raises(redis.exceptions.ResponseError, match=r"^LOCKED$"):
        setter(keys, ["", b"k", b"1"])
    _raw().set(d._lock_key, "mine")
    assert setter(keys, ["mine", b"k", b"1"]) == 1
    _raw().delete(d._lock_key)
    assert setter(keys, ["", b"k", b"2"]) == 1
    assert d == {"k": 2}


def test_the_renewer_notices_a_loss_before_the_next_write(d) -> None:
    with d.lock():
        d["a"] = 1
        _raw().delete(d._lock_key)
        wait_until(lambda: _hold(d).lost, "the renewer marked the lock lost", TIMEOUT)
        with pytest.raises(shareit.LockLostError):
            d["a"] = 2
        assert d["a"] == 1, "reads inside a lost lock still work"
    assert d == {"a": 1}


# ---------------------------------------------------------------------- leaving a lost block


def test_leaving_a_lost_block_that_wrote_nothing_since_raises(d, monkeypatch) -> None:
    _stop_renewing(d, monkeypatch)
    with pytest.raises(shareit.LockLostError, match="what it read"), d.lock():
        d["a"] = 1
        _raw().delete(d._lock_key)
        d.get("a")
    assert d == {"a": 1}, "the write made while the lease was good is kept"
    lk = d.lock()
    lk.acquire()
    _raw().delete(d._lock_key)
    with pytest.raises(shareit.LockLostError):
        lk.release()
    assert d._held == {}, "released all the same: the lock can be taken again"
    inner_left = []
    with pytest.raises(shareit.LockLostError, match="what it read"), d.lock():
        with d.lock():
            _raw().delete(d._lock_key)
        inner_left.append(True)  # an inner block's end does not report: the outermost does
    assert inner_left == [True]
    with d.lock():
        d["b"] = 2
    assert d == {"a": 1, "b": 2}


def test_leaving_a_lost_block_raises_no_second_error(d, monkeypatch) -> None:
    _stop_renewing(d, monkeypatch)
    with pytest.raises(shareit.LockLostError, match="nothing was written"), d.lock():  # the write's
        _raw().delete(d._lock_key)
        d["a"] = 1
    with d.lock():  # the block was told by the write and handled it: nothing more on leaving
        _raw().delete(d._lock_key)
        with pytest.raises(shareit.LockLostError):
            d["a"] = 1
    with pytest.raises(KeyError, match="the block's own") as err, d.lock():  # kept, not replaced
        _raw().delete(d._lock_key)
        raise KeyError("the block's own")
    assert err.value.__context__ is None
    if hasattr(err.value, "add_note"):  # Python 3.11+
        assert "had expired" in err.value.__notes__[0]
    d["a"] = 2
    assert d == {"a": 2}


# ---------------------------------------------------------------------- a holder that stays


def hold_for(d, ttl, holds, conn, may_leave) -> None:
    redis_backend.LOCK_TTL = ttl  # read at each use: a short lease keeps the test short
    try:
        with d.lock():
            conn.send("held")
            end = time.monotonic() + holds * ttl
            i = 0
            while time.monotonic() < end:  # this holder itself stays that long, busy writing
                d["i"] = i = i + 1
                time.sleep(ttl / 20)
            conn.send(("wrote", d["i"] == i))
            may_leave.wait(TIMEOUT)
        conn.send(("left", None))
    except Exception as exc:
        conn.send(("failed", type(exc).__name__))


@pytest.mark.timeout(90)
def test_the_renewer_keeps_a_live_holders_lease(d) -> None:
    ttl = 1.0
    ours, theirs = FORK.Pipe(duplex=False)
    may_leave = FORK.Event()
    p = FORK.Process(target=hold_for, args=(d, ttl, 3, theirs, may_leave))
    p.start()
    try:
        assert ours.poll(TIMEOUT) and ours.recv() == "held"
        token = _raw().get(d._lock_key)
        assert token is not None and 0 < _raw().pttl(d._lock_key) <= ttl * 1000, "the child's lease"
        while not ours.poll(0):  # until it has held 3 leases: nobody else gets in
            with pytest.raises(shareit.LockTimeoutError), d.lock(timeout=0.05):
                pass
            assert _raw().get(d._lock_key) == token, "its lease lapsed while its holder was alive"
            assert p.is_alive() or ours.poll(0), "the holder died without reporting"
        assert ours.recv() == ("wrote", True), "every write in the block went through"
        may_leave.set()
        assert ours.poll(TIMEOUT) and ours.recv() == ("left", None), "leaving raised nothing"
        p.join(TIMEOUT)
        assert p.exitcode == 0
    finally:
        may_leave.set()
        if p.is_alive():
            p.kill()
            p.join(TIMEOUT)
    assert d["i"] > 1 and not _raw().exists(d._lock_key)


# ---------------------------------------------------------------------- writes outside lock()


def hold_until(d, held, release) -> None:
    with d.lock():
        held.set()
        release.wait(TIMEOUT)
        d["last"] = "holder"


@pytest.mark.timeout(90)
def test_writes_outside_lock_are_unaffected(d) -> None:
    d["a"] = 1
    assert d.incr("n") == 1 and d.incr("f", 0.5) == 0.5
    d.update(b=2)
    del d["b"]
    assert d.transform("a", lambda v: v + 1) == 2
    assert d == {"a": 2, "n": 1, "f": 0.5}
    d.clear()
    assert d == {} and not _raw().exists(d._lock_key)

    short = shareit.open(d.name, backend="redis", url=SERVER["url"], timeout=0.3)
    held, release = FORK.Event(), FORK.Event()
    p = FORK.Process(target=hold_until, args=(d, held, release))
    p.start()
    try:
        assert held.wait(TIMEOUT)
        for write in (lambda: short.__setitem__("x", 1), lambda: short.incr("n"), short.clear):
            with pytest.raises(shareit.LockTimeoutError):  # waits, then gives up: not "lost"
                write()
        assert d == {}, "nothing written while another process held the lock"
        release.set()
        d["last"] = "outside"  # waits for the holder, whose write comes first
        p.join(TIMEOUT)
        assert p.exitcode == 0
    finally:
        release.set()
        if p.is_alive():
            p.kill()
            p.join(TIMEOUT)
        short.close()
    assert d == {"last": "outside"}
