"""Review of the reentrancy change (e125922, bfaefa4): attacks on ``WriterLock.busy``
and on the manager's in-flight link.

Every signal here is a real one (``signal.raise_signal`` / ``os.kill``). Where it must
arrive at one exact point, a hook raises it there: the fault hook of the flat writes
(``L.fault``), or a ``sys.settrace`` 'call' event -- which runs the handler right where
a real signal would run it, at the entry (RESUME) of the traced function. Each attack
runs in a forked child (hooks and handlers are process state); every wait has a bound.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time

import pytest

import shareit
from helpers import reading, wait_stopped, wait_until
from shareit.backends.shm import fastpath
from shareit.backends.shm import layout as L
from shareit.backends.shm.journal import Journal
from shareit.errors import LockTimeoutError
from shareit.testing import join_all

FORK = mp.get_context("fork")
DEADLINE = 30.0
FUTEX = {"x86_64": "202", "aarch64": "98"}.get(os.uname().machine, "202")


def _run_child(target, *args) -> object:
    """Run ``target(*args, conn)`` in a forked child; return what it sends."""
    parent, child = FORK.Pipe()
    p = FORK.Process(target=target, args=(*args, child))
    try:
        p.start()
        child.close()
        assert parent.poll(DEADLINE), "child hung"
        got = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        return got
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)


def _trace_calls_to(code, then) -> None:
    """Call ``then()`` at the entry of the next frame running ``code`` (once)."""

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is code:
            sys.settrace(None)
            then()
        return None

    sys.settrace(tracer)


# ------------------------------------------------------------------ finding 1: repair path


def _die_mid_overwrite(name: str) -> None:
    d = shareit.open(name, backend="shm")
    d["k2"] = "a" * 20  # placed by this process: the next write of it is a flat overwrite
    L.FAULT = "mid_entry"
    d["k2"] = "b" * 20
    os._exit(3)  # the fault point was not reached


def _repair_interrupted(name: str, via: str, conn) -> None:
    d = shareit.open(name, backend="shm", timeout=10.0)
    got: list[str] = []

    def on_usr1(signum, frame) -> None:
        try:
            d["h"] = "handler"
        except shareit.ReentrantWriteError:
            got.append("refused")
        else:
            got.append("wrote")

    signal.signal(signal.SIGUSR1, on_usr1)
    # the dead writer's journal is rolled back by whoever takes the lock next: here a
    # real signal arrives at the entry of that rollback (Journal.rollback's RESUME)
    _trace_calls_to(Journal.rollback.__code__, lambda: signal.raise_signal(signal.SIGUSR1))
    try:
        if via == "lock":
            with d.lock():
                pass
        else:
            d.update({"u": 1})
    finally:
        sys.settrace(None)
    conn.send((got, d.snapshot(), d.verify()))
    d.close()


# Was a strict xfail: Table.acquire() (lock(), and wlock(): update/clear/locked reads/
# verify) repaired a dead writer's journal with busy still 0; a signal handler's write there
# passed enter(), began and committed its own journal over the dead writer's, and recover()
# then rolled back the handler's journal instead. Now the repair is busy: the handler's
# write is refused (ReentrantWriteError), the repair completes.
@pytest.mark.parametrize("via", ["lock", "update"])
def test_a_handler_write_during_the_repair_of_a_dead_writer(name, via) -> None:
    d = shareit.open(name, backend="shm")
    try:
        d.update({"keep": [1, 2]})
        p = FORK.Process(target=_die_mid_overwrite, args=(name,))
        p.start()
        p.join(DEADLINE)
        assert p.exitcode == -signal.SIGKILL, p.exitcode  # died mid-write, journal open
        got, snap, problems = _run_child(_repair_interrupted, name, via)
        assert got == ["refused"], got
        want = {"keep": [1, 2], "k2": "a" * 20}  # the dead write rolled back
        if via == "update":
            want["u"] = 1
        if got == ["wrote"]:
            want["h"] = "handler"
        assert (snap, problems) == (want, [])
    finally:
        d.close()


# ------------------------------------------------------------------ finding 2: double ^C


def _double_interrupt(name: str, op: str, conn) -> None:
    d = shareit.open(name, backend="shm", timeout=3.0)
    d["warm"] = 0
    d["s2"] = "x" * 40  # placed by this process: its overwrite is flat

    def on_usr1(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGUSR1, on_usr1)

    def hook(step: str) -> None:
        if step == "mid_entry" or (op == "insert" and step == "after_write"):
            L.FAULT = None
            # the second ^C arrives at the entry of the undo (_abandon's RESUME)
            _trace_calls_to(fastpath._abandon.__code__,
                            lambda: signal.raise_signal(signal.SIGUSR1))
            signal.raise_signal(signal.SIGUSR1)  # the first ^C: mid-write

    L.fault = hook
    L.FAULT = "hooked"
    outer = "returned"
    try:
        if op == "overwrite":
            d["s2"] = "new"
        else:
            d["fresh"] = 7
    except KeyboardInterrupt:
        outer = "interrupted"
    finally:
        sys.settrace(None)
        L.FAULT = None
    busy = d._t.lock.busy
    try:
        d["after"] = 1
        after = "ok"
    except Exception as e:
        after = type(e).__name__
    conn.send((outer, busy, after))
    assert conn.poll(DEADLINE) and conn.recv() == "other tried"
    conn.send("bye")
    os._exit(0)  # (the lock may be held: no close)


# Was a strict xfail: overwrite()/insert() cleared busy and unlocked only inside
# _abandon()'s finally; a second KeyboardInterrupt at _abandon()'s entry skipped both, so
# every later write of this process raised ReentrantWriteError and every other process's
# write timed out. Now the caller releases in its own finally.
@pytest.mark.parametrize("op", ["overwrite", "insert"])
def test_a_second_interrupt_at_the_entry_of_the_undo(name, op) -> None:
    d = shareit.open(name, backend="shm", timeout=2.0)
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_double_interrupt, args=(name, op, child))
    try:
        p.start()
        child.close()
        assert parent.poll(DEADLINE), "child hung"
        outer, busy, after = parent.recv()
        try:
            d["other"] = 1  # another process, while the interrupted one lives on
            other = "ok"
        except Exception as e:
            other = type(e).__name__
        parent.send("other tried")
        assert parent.poll(DEADLINE) and parent.recv() == "bye"
        assert join_all([p], DEADLINE) == [0]
        assert outer == "interrupted"
        assert (busy, after, other) == (0, "ok", "ok")
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


# ------------------------------------------------------------------ finding 3: manager


class _Interrupt(Exception):
    pass


def _locked_caller(name: str, mode: str, conn) -> None:
    d = shareit.open(name, backend="manager", timeout=20.0)

    def on_usr1(signum, frame) -> None:
        raise KeyboardInterrupt if mode == "escapes" else _Interrupt

    signal.signal(signal.SIGUSR1, on_usr1)
    escaped = "nothing"
    try:
        with d.lock():
            conn.send(("locked", d._tls.link.conn.fileno()))
            assert conn.poll(DEADLINE) and conn.recv() == "server stopped"
            try:
                d["a"] = 1  # in flight: the server is stopped; a signal cuts it short
            except _Interrupt:
                conn.send("caught")  # handled: the block goes on, still "inside lock()"
                assert conn.poll(DEADLINE) and conn.recv() == "tried"
                d["b"] = 2
    except BaseException as e:  # (which exception leaves the block)
        escaped = type(e).__name__
    conn.send(("done", escaped))
    d.close()


def _cut_short_in_flight(server: int, parent, pid: int) -> None:
    """The child says it holds lock(); stop the server, let the child's next call wait
    for its reply on the mapping's socket, and interrupt that call with SIGUSR1."""
    assert parent.poll(DEADLINE)
    tag, fd = parent.recv()
    assert tag == "locked"
    os.kill(server, signal.SIGSTOP)
    # (kill() returns before the server has stopped: until it has, it may still answer)
    wait_stopped(server, DEADLINE)
    parent.send("server stopped")
    wait_until(lambda: reading(pid, fd), "the child waiting for its reply")
    os.kill(pid, signal.SIGUSR1)


def test_manager_a_call_cut_short_inside_lock_is_never_silently_unlocked(name) -> None:
    """Was a strict xfail: a call cut short closes its connection (never to read its
    reply as the next call's), and the server releases the lock() that connection held;
    the block went on unprotected, and its release raised RuntimeError. Now every later
    call of the block raises LockLostError (nothing written), and so would leaving it."""
    d = shareit.open(name, backend="manager", timeout=20.0)
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_locked_caller, args=(name, "caught", child))
    server = d.info()["pid"]
    try:
        p.start()
        child.close()
        _cut_short_in_flight(server, parent, p.pid)
        assert parent.poll(DEADLINE) and parent.recv() == "caught"
        os.kill(server, signal.SIGCONT)
        try:  # the child is still inside its lock() block: this must time out
            with d.lock(timeout=1.0):
                taken = True
        except LockTimeoutError:
            taken = False
        parent.send("tried")
        assert parent.poll(DEADLINE)
        _done, escaped = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        assert taken  # (the server released it with the connection)
        assert escaped == "LockLostError" and "b" not in d
    finally:
        os.kill(server, signal.SIGCONT)  # (harmless if it runs)
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


def test_manager_ctrl_c_inside_lock_leaves_as_keyboardinterrupt(name) -> None:
    """Was a strict xfail: the block's release, after the lost connection, raised
    RuntimeError from the server in place of the KeyboardInterrupt the user pressed."""
    d = shareit.open(name, backend="manager", timeout=20.0)
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_locked_caller, args=(name, "escapes", child))
    server = d.info()["pid"]
    try:
        p.start()
        child.close()
        _cut_short_in_flight(server, parent, p.pid)
        os.kill(server, signal.SIGCONT)
        assert parent.poll(DEADLINE)
        _done, escaped = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        assert escaped == "KeyboardInterrupt"
    finally:
        os.kill(server, signal.SIGCONT)  # (harmless if it runs)
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


# ------------------------------------------------------------------ attacks that held


def _syscall_of(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            return f.read().split(" ", 1)[0]
    except OSError:
        return ""


def _other_thread_during_busy(name: str, conn) -> None:
    """busy is per process: thread B writes while the main thread is busy (its handler
    runs mid-write, waiting for B to block). B must wait for the lock, not raise."""
    d = shareit.open(name, backend="shm", timeout=20.0)
    d["warm"] = 0
    d["s2"] = "x" * 40
    go = threading.Event()
    b_result: list[str] = []
    tid: list[int] = []

    def writer_b() -> None:
        tid.append(threading.get_native_id())
        assert go.wait(DEADLINE)
        try:
            d["b"] = 1
            d.incr("n")
            b_result.append("ok")
        except Exception as e:
            b_result.append(type(e).__name__)

    tb = threading.Thread(target=writer_b)
    tb.start()
    waited: list[bool] = []

    def on_usr1(signum, frame) -> None:
        busy = d._t.lock.busy
        go.set()
        deadline = time.monotonic() + DEADLINE
        while _syscall_of(tid[0]) != FUTEX and tb.is_alive():  # B blocked on the mutex
            if time.monotonic() > deadline:
                break
            time.sleep(0.002)
        waited.append(bool(busy) and tb.is_alive())

    signal.signal(signal.SIGUSR1, on_usr1)

    def hook(step: str) -> None:
        if step == "mid_entry":
            L.FAULT = None
            signal.raise_signal(signal.SIGUSR1)

    L.fault = hook
    L.FAULT = "hooked"
    d["s2"] = "new"
    L.FAULT = None
    tb.join(DEADLINE)
    conn.send((waited, b_result, d.snapshot(), d._t.lock.busy, d.verify()))
    d.close()


def test_another_thread_writing_while_this_one_is_busy_waits_and_lands(name) -> None:
    waited, b_result, snap, busy, problems = _run_child(_other_thread_during_busy, name)
    assert waited == [True] and b_result == ["ok"]
    assert snap == {"warm": 0, "s2": "new", "b": 1, "n": 1}
    assert (busy, problems) == (0, [])


def _callbacks_write(name: str, conn) -> None:
    d = shareit.open(name, backend="shm", timeout=5.0)
    d.update({"k": 1, "cfg": {}})
    res: list[object] = []
    res.append(d.transform("k", lambda v: (d.__setitem__("side", v), d.incr("c"), v + 1)[2]))
    with d.edit("cfg") as cfg:
        d["in_edit"] = [1]
        del d["side"]
        d.update({"u": 2})
        cfg["x"] = d["in_edit"]
    got: list[str] = []

    def on_usr1(signum, frame) -> None:  # between two writes of lock(): not reentrant
        try:
            d["h"] = "handler"
            got.append("wrote")
        except shareit.ReentrantWriteError:
            got.append("refused")

    signal.signal(signal.SIGUSR1, on_usr1)
    with d.lock():
        d["a"] = 1
        signal.raise_signal(signal.SIGUSR1)
        d["b"] = 2
    res.append(got)
    conn.send((res, d.snapshot(), d._t.lock.busy, d._t.lock.depth, d.verify()))
    d.close()


def test_transform_edit_and_lock_blocks_may_write_to_the_same_mapping(name) -> None:
    res, snap, busy, depth, problems = _run_child(_callbacks_write, name)
    assert res == [2, ["wrote"]]
    assert snap == {"k": 2, "c": 1, "cfg": {"x": [1]}, "in_edit": [1], "u": 2,
                    "a": 1, "b": 2, "h": "handler"}
    assert (busy, depth, problems) == (0, 0, [])


def _fork_in_handler(name: str, conn) -> None:
    """A handler forks mid-write (busy 1, mutex held): the child's writes must work once
    the parent's write is done, and the parent's write must land."""
    d = shareit.open(name, backend="shm", timeout=20.0)
    d["warm"] = 0
    d["s2"] = "x" * 40
    kids: list[int] = []

    def on_usr1(signum, frame) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                d["s2"] = "child"  # (a key in the parent's slots; the mutex the parent's)
                d["from_child"] = 1
                code = 0 if d._t.lock.busy == 0 else 2
            finally:
                os._exit(code)
        kids.append(pid)

    signal.signal(signal.SIGUSR1, on_usr1)

    def hook(step: str) -> None:
        if step == "mid_entry":
            L.FAULT = None
            signal.raise_signal(signal.SIGUSR1)

    L.fault = hook
    L.FAULT = "hooked"
    d["s2"] = "new"
    L.FAULT = None
    deadline = time.monotonic() + DEADLINE
    status = None
    while status is None and time.monotonic() < deadline:
        pid, st = os.waitpid(kids[0], os.WNOHANG)
        if pid:
            status = os.waitstatus_to_exitcode(st)
        else:
            time.sleep(0.005)
    conn.send((status, d.snapshot(), d.verify()))
    d.close()


def test_a_fork_while_busy(name) -> None:
    status, snap, problems = _run_child(_fork_in_handler, name)
    assert status == 0
    assert snap == {"warm": 0, "s2": "child", "from_child": 1} and problems == []


def _copies_in_handler(name: str, op: str, conn) -> None:
    """A handler reads whole copies mid-write (tseq odd, its own journal open, busy 1):
    each must come back -- the state before the write -- not spin on a writer that can
    only go on once the handler returns."""
    d = shareit.open(name, backend="shm", timeout=5.0)
    d.update({"warm": 0, "keep": [1, 2]})
    d["s2"] = "x" * 40
    seen: list[object] = []

    def on_usr1(signum, frame) -> None:
        seen.append((d.snapshot(), len(d), sorted(d), dict(d.items()), "s2" in d))

    signal.signal(signal.SIGUSR1, on_usr1)
    point = {"overwrite": "mid_entry", "insert": "after_write"}[op]

    def hook(step: str) -> None:
        if step == point:
            L.FAULT = None
            signal.raise_signal(signal.SIGUSR1)

    L.fault = hook
    L.FAULT = "hooked"
    if op == "overwrite":
        d["s2"] = "new"
    else:
        d["fresh"] = 7
    L.FAULT = None
    conn.send((seen, d.snapshot(), d.verify()))
    d.close()


@pytest.mark.parametrize("op", ["overwrite", "insert"])
def test_whole_copies_read_by_a_handler_mid_write(name, op) -> None:
    seen, snap, problems = _run_child(_copies_in_handler, name, op)
    before = {"warm": 0, "keep": [1, 2], "s2": "x" * 40}
    assert seen == [(before, 3, sorted(before), before, True)]
    after = dict(before, **({"s2": "new"} if op == "overwrite" else {"fresh": 7}))
    assert snap == after and problems == []


def _rcvtimeo(d) -> bytes:
    import socket

    sock = socket.socket(fileno=d._tls.link.conn.fileno())
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
    finally:
        sock.detach()


def _long_lock_with_handler_call(name: str, conn) -> None:
    d = shareit.open(name, backend="manager", timeout=2.0)
    before = _rcvtimeo(d) if d.get("other") == "o" else b""
    got: list[object] = []

    def on_usr1(signum, frame) -> None:
        in_flight = getattr(d._tls, "link", None) is None  # (the outer call's slot: empty)
        got.append((in_flight, d.get("other")))  # a fresh link, while the widened call waits

    signal.signal(signal.SIGUSR1, on_usr1)
    conn.send(("calling", d._tls.link.conn.fileno()))
    with d.lock(timeout=25.0):  # longer than the client's bound: _call_waiting widens it
        link = d._tls.link
        during = _rcvtimeo(d)
        d["k"] = 2
    conn.send((got, before, during, _rcvtimeo(d), d._tls.link is link, d["k"]))
    d.close()


def test_manager_a_handler_call_inside_a_widened_wait_keeps_the_bounds(name) -> None:
    """_call_waiting widens the link's socket bounds for a long lock(timeout=...) and
    restores them after; a handler's call meanwhile (on its own link) must not leave the
    thread's link widened, nor swap the link that now owns the lock."""
    d = shareit.open(name, backend="manager", timeout=20.0)
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_long_lock_with_handler_call, args=(name, child))
    try:
        d["other"] = "o"
        with d.lock():
            p.start()
            child.close()
            assert parent.poll(DEADLINE)
            tag, fd = parent.recv()
            assert tag == "calling"
            wait_until(lambda: reading(p.pid, fd), "the child waiting for its reply")
            os.kill(p.pid, signal.SIGUSR1)  # (it cuts the read short: the handler runs now)
        assert parent.poll(DEADLINE)
        got, before, during, after, same, k = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        assert got == [(True, "o")] and same and k == 2
        assert during == after == before, (before, during, after)
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()
