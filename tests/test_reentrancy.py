"""A signal handler that uses a mapping while its own thread is inside a call to it.

Python runs a signal handler in the main thread between two bytecodes of whatever
runs there -- in the middle of a write, or while a call waits for a server's reply.
(The shm backend's flat and stepped writes: ``tests/test_review_fastpath_probe.py``.)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest

import shareit
from helpers import reading, wait_until
from shareit.testing import join_all

FORK = mp.get_context("fork")
DEADLINE = 30.0


def _waiting_caller(name: str, backend: str, conn) -> None:
    d = shareit.open(name, backend=backend, timeout=20.0)
    got: list[object] = []

    def on_usr1(signum, frame) -> None:
        got.append(d.get("other"))  # a read while the outer call waits for its reply
        conn.send("handler done")

    signal.signal(signal.SIGUSR1, on_usr1)
    d.get("k")  # (this thread's connection made: the transform's reply comes on it)
    conn.send(("calling", d._tls.link.conn.fileno()))
    try:
        result = d.transform("k", lambda v: v + 1)  # waits: the parent holds lock()
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    conn.send((got, result, d.snapshot()))
    d.close()


@pytest.mark.parametrize("backend", ["manager", "queue"])
def test_a_handler_call_during_a_waiting_call_gets_its_own_reply(name, backend) -> None:
    """Was: the handler's request went down the connection the interrupted call was
    waiting on, so the handler read that call's reply and the call read the handler's
    (or both waited for the lock the parent holds). Each must get its own answer."""
    d = shareit.open(name, backend=backend, timeout=20.0)
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_waiting_caller, args=(name, backend, child))
    try:
        d.update({"k": 1, "other": "o"})
        with d.lock():
            p.start()
            child.close()
            assert parent.poll(DEADLINE)
            tag, fd = parent.recv()
            assert tag == "calling"
            wait_until(lambda: reading(p.pid, fd), "the child waiting for its reply")
            os.kill(p.pid, signal.SIGUSR1)
            # the handler's read needs no lock: it must be answered while the lock is held
            done = parent.poll(10.0)
        assert done and parent.recv() == "handler done", "the handler's read never returned"
        assert parent.poll(DEADLINE)
        got, result, snap = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        assert got == ["o"], got
        assert result == 2, result
        assert snap == {"k": 2, "other": "o"} and d.snapshot() == snap
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


def _interrupted_caller(name: str, backend: str, conn) -> None:
    d = shareit.open(name, backend=backend, timeout=20.0)

    def on_usr1(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGUSR1, on_usr1)
    d.get("k")  # (this thread's connection made: the transform's reply comes on it)
    conn.send(("calling", d._tls.link.conn.fileno()))
    try:
        d.transform("k", lambda v: v + 1)  # waits: the parent holds lock(); interrupted
        first = "not interrupted"
    except KeyboardInterrupt:
        first = "interrupted"
    conn.send(first)
    assert conn.poll(DEADLINE) and conn.recv() == "released"
    # the interrupted call's reply may still come: the next calls must not read it
    conn.send((d.get("other"), d.get("k"), d.snapshot()))
    d.close()


@pytest.mark.parametrize("backend", ["manager", "queue"])
def test_a_call_cut_short_leaves_no_reply_for_the_next_call(name, backend) -> None:
    """Ctrl-C while a call waits for the server: the next call must get its own reply,
    not the interrupted call's."""
    d = shareit.open(name, backend=backend, timeout=20.0)
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_interrupted_caller, args=(name, backend, child))
    try:
        d.update({"k": 1, "other": "o"})
        with d.lock():
            p.start()
            assert parent.poll(DEADLINE)
            tag, fd = parent.recv()
            assert tag == "calling"
            wait_until(lambda: reading(p.pid, fd), "the child waiting for its reply")
            os.kill(p.pid, signal.SIGUSR1)
            assert parent.poll(DEADLINE) and parent.recv() == "interrupted"
        parent.send("released")
        assert parent.poll(DEADLINE)
        other, k, snap = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        assert (other, k) == ("o", d["k"]) and snap == d.snapshot()
        assert d["k"] in (1, 2)  # (the server may have run the interrupted transform)
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


def _value_handler_during_incr(d, inner: str, catch: bool, conn) -> None:
    """In a forked child (value mappings are shared by inheritance): a signal handler
    writes key "a" while the main thread's ``incr("a")`` is between its read and its
    store (raised from the coercion call that incr makes there)."""
    fired: list[str] = []

    def on_usr1(signum, frame) -> None:
        try:
            if inner == "incr":
                d.incr("a", 100)
            elif inner == "set":
                d["a"] = 500
            else:
                del d["a"]
        except shareit.ReentrantWriteError:
            fired.append("ReentrantWriteError")
            if not catch:
                raise
        else:
            fired.append("wrote")

    signal.signal(signal.SIGUSR1, on_usr1)
    coerce = d._cv

    raised: list[int] = []

    def cv(x):
        if not raised:  # once (the handler's own set coerces too)
            raised.append(1)
            signal.raise_signal(signal.SIGUSR1)
        return coerce(x)

    d._cv = cv
    try:
        outer: object = d.incr("a", 1)
    except shareit.ReentrantWriteError:
        outer = "raised"
    conn.send((fired, outer, d.get("a"), d.incr("b")))  # (and the lock still works)


@pytest.mark.parametrize("catch", [True, False], ids=["handler_catches", "handler_raises"])
@pytest.mark.parametrize("inner", ["incr", "set", "del"])
def test_value_a_handler_write_inside_incr_of_the_same_key(inner, catch) -> None:
    """Was: the per-key mutex is recursive, so the handler's write of the key landed
    between incr's read and its store, and incr then stored its stale sum over it: the
    handler's write was lost though it returned. Now it raises ReentrantWriteError,
    having changed nothing; caught, the incr lands; not caught, the incr raises it."""
    d = shareit.open(backend="value", keys=["a", "b"])
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_value_handler_during_incr, args=(d, inner, catch, child))
    try:
        d["a"] = 10
        p.start()
        assert parent.poll(DEADLINE), "child hung"
        fired, outer, a, b = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        assert fired == ["ReentrantWriteError"], fired
        if catch:
            assert (outer, a) == (11, 11)
        else:
            assert (outer, a) == ("raised", 10)
        assert b == 1 and d.snapshot() == {"a": a, "b": 1}
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


def _handler_takes_lock(name: str, conn) -> None:
    from shareit.backends.shm import layout as L

    d = shareit.open(name, backend="shm")
    d["warm"] = 0
    fired: list[str] = []

    def on_usr1(signum, frame) -> None:
        try:
            with d.lock():
                fired.append("locked")
        except shareit.ReentrantWriteError:
            fired.append("ReentrantWriteError")

    signal.signal(signal.SIGUSR1, on_usr1)

    def hook(step: str) -> None:
        if step == "mid_entry" and not fired:
            signal.raise_signal(signal.SIGUSR1)

    L.fault = hook
    L.FAULT = "hooked"
    d["main"] = 1  # a new key: the flat insert, interrupted mid-entry
    L.FAULT = None
    with d.lock():  # and the lock is free again
        d["after"] = 2
    conn.send((fired, d.snapshot(), d.verify(), d._t.lock.busy, d._t.lock.depth))
    d.close()


def test_shm_a_handler_taking_lock_inside_a_write(name) -> None:
    """``lock()`` taken by a signal handler while its thread is inside a write would hold
    the lock over the half-done write (the mutex is recursive): ReentrantWriteError."""
    d = shareit.open(name, backend="shm")
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_handler_takes_lock, args=(name, child))
    try:
        p.start()
        assert parent.poll(DEADLINE), "child hung"
        fired, snap, problems, busy, depth = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        assert fired == ["ReentrantWriteError"]
        assert (snap, problems, busy, depth) == ({"warm": 0, "main": 1, "after": 2}, [], 0, 0)
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


def _value_handler_during_bulk(d, inner: str, conn) -> None:
    """In a forked child: a signal handler writes while the main thread is inside an
    ``update`` (raised at its "mid_update" step), or updates while it is inside an
    ``incr`` (raised from the coercion call incr makes between its read and store)."""
    from shareit.backends import value as V

    fired: list[str] = []

    def on_usr1(signum, frame) -> None:
        try:
            if inner == "set":
                d["a"] = 99
            else:
                d.update({"a": 99, "b": 98})
        except shareit.ReentrantWriteError:
            fired.append("ReentrantWriteError")
        else:
            fired.append("wrote")

    signal.signal(signal.SIGUSR1, on_usr1)
    if inner == "set":
        def hook(step: str) -> None:
            if step == "mid_update" and not fired:
                signal.raise_signal(signal.SIGUSR1)

        V.fault = hook
        V.FAULT = "hooked"
        d.update({"a": 1, "b": 2})
        V.FAULT = None
    else:
        coerce = d._cv
        raised: list[int] = []

        def cv(x):
            if not raised:
                raised.append(1)
                signal.raise_signal(signal.SIGUSR1)
            return coerce(x)

        d._cv = cv
        d.incr("a", 1)
    conn.send((fired, d.snapshot()))


@pytest.mark.parametrize("inner", ["set", "update"])
def test_value_a_handler_write_inside_a_bulk_write_or_incr(inner) -> None:
    """Was: every mutex is recursive, so a handler's write inside an ``update`` took the
    whole lock again, saw a bulk write in flight and undid it as a dead writer's (the
    update then half landed); a handler's ``update`` inside an ``incr`` wrote the key the
    incr then overwrote with its stale sum. Now: ReentrantWriteError, nothing changed."""
    d = shareit.open(backend="value", keys=["a", "b"])
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_value_handler_during_bulk, args=(d, inner, child))
    try:
        d.update({"a": 10, "b": 20})
        p.start()
        assert parent.poll(DEADLINE), "child hung"
        fired, snap = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        assert fired == ["ReentrantWriteError"], fired
        want = {"a": 1, "b": 2} if inner == "set" else {"a": 11, "b": 20}
        assert snap == want and d.snapshot() == want
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()
