"""Review of 46a5687 (shm flat writes inside this thread's lock()), d3927e0/11315ae
(value ``_bulk``/``_busy``) and 0aa6c65 (manager: a call cut short inside lock()).

Every signal is a real one (``signal.raise_signal`` / ``os.kill``). Where it must arrive
at one exact point a hook raises it there: for the manager, the reply's ``decode`` (the
call's request was sent and its connection is mid-call: exactly a ^C while waiting for
the server); for the value backend, a method the write calls while its flag is set.
Every wait has a bound; nothing sleeps to synchronise.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading

import pytest

import shareit
from helpers import proc_state, wait_until
from shareit.backends import manager as manager_mod
from shareit.errors import LockLostError
from shareit.testing import join_all

FORK = mp.get_context("fork")
DEADLINE = 30.0
FUTEX = {"x86_64": "202", "aarch64": "98"}.get(os.uname().machine, "202")


# ---------------------------------------------------------------------- manager


class _Cut:
    """Wraps the manager's reply ``decode``: when armed, the next reply's decode raises
    a real SIGINT (default handler: KeyboardInterrupt) -- the call is cut short. Only in
    the main thread (a signal runs its handler there; the queue backend decodes in others)."""

    def __init__(self) -> None:
        self.armed = False
        self.fired = 0
        self._orig = manager_mod.decode

    def __call__(self, data):
        if self.armed and threading.current_thread() is threading.main_thread():
            self.armed = False
            self.fired += 1
            signal.raise_signal(signal.SIGINT)
        return self._orig(data)


@pytest.fixture
def cut(monkeypatch):
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    c = _Cut()
    monkeypatch.setattr(manager_mod, "decode", c)
    try:
        yield c
    finally:
        signal.signal(signal.SIGINT, old)


# Was a strict xfail (fixed): _call records tls.lost = link.locks when *any* call is cut
# short, the release call included: link.locks is only decremented after release returns,
# so a ^C during the block's own release leaves tls.lost set after the block is over --
# every later call of that thread on that handle raises LockLostError, for good
@pytest.mark.parametrize("backend", ["manager", "queue"])
@pytest.mark.parametrize("levels", [1, 2])
def test_manager_release_cut_short_leaves_the_handle_usable(name, cut, levels, backend) -> None:
    d = shareit.open(name, backend=backend, timeout=10.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            with d.lock():
                if levels == 2:
                    with d.lock():
                        d["a"] = 1
                        cut.armed = True  # the inner release is cut short
                else:
                    d["a"] = 1
                    cut.armed = True  # the release is cut short
        assert cut.fired == 1
        # the connection went, and with it the server's lock: another handle takes it
        other = shareit.open(name, backend=backend, timeout=10.0)
        try:
            with other.lock(timeout=5.0):
                pass
        finally:
            other.close()
        d["b"] = 2  # a later, unrelated call of this thread
        with d.lock(timeout=5.0):
            d["c"] = 3
        assert d.snapshot() == {"a": 1, "b": 2, "c": 3}
    finally:
        d.close()


def test_manager_call_cut_short_inside_lock_then_release_by_exception(name, cut) -> None:
    """Held: a call cut short inside lock() (^C propagating) releases nothing twice and
    leaves no tls.lost behind: the handle works after the block."""
    d = shareit.open(name, backend="manager", timeout=10.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            with d.lock():
                with d.lock():
                    cut.armed = True
                    d["a"] = 1
        assert cut.fired == 1
        d["b"] = 2
        with d.lock(timeout=5.0):
            d["c"] = 3
        assert d.snapshot() == {"a": 1, "b": 2, "c": 3}
    finally:
        d.close()


def test_manager_lost_lock_stays_in_its_thread_and_handle(name, cut) -> None:
    """Held: tls.lost of one thread's block is not seen by another thread, nor by another
    handle of the same mapping in the same thread."""
    d = shareit.open(name, backend="manager", timeout=10.0)
    other = shareit.open(name, backend="manager", timeout=10.0)
    seen: list[object] = []
    inside = threading.Event()
    done = threading.Event()

    def elsewhere() -> None:
        inside.wait(DEADLINE)
        try:
            d["t"] = 1
            seen.append("ok")
        except BaseException as exc:
            seen.append(type(exc).__name__)
        done.set()

    t = threading.Thread(target=elsewhere)
    t.start()
    try:
        with pytest.raises(LockLostError):
            with d.lock():
                cut.armed = True
                try:
                    d["x"]
                except KeyboardInterrupt:
                    pass
                other["o"] = 1  # another handle: its own connection, no lost lock
                inside.set()
                assert done.wait(DEADLINE)
                d["y"] = 1  # this block's lock is gone: must raise
        assert seen == ["ok"]
        assert "y" not in d and d["o"] == 1 and d["t"] == 1
    finally:
        inside.set()
        t.join(DEADLINE)
        other.close()
        d.close()


# Was a strict xfail (fixed): transform's lock is taken by lock_get, which link.locks does
# not count: a call cut short inside fn closes the connection (the server releases the
# lock) without tls.lost; transform's except then sends 'release' on a fresh connection
# and the server's RuntimeError replaces the user's KeyboardInterrupt
def test_manager_transform_fn_cut_short_leaves_as_keyboardinterrupt(name, cut) -> None:
    d = shareit.open(name, backend="manager", timeout=10.0)
    try:
        d["k"] = 0

        def fn(v):
            cut.armed = True
            return v + d["k"]  # cut short: KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            d.transform("k", fn)
        assert d["k"] == 0
    finally:
        d.close()


# Was a strict xfail (fixed): edit's lock is taken by lock_get (link.locks stays 0): a
# call cut short inside the edit body closes the connection -- the server releases the
# lock -- but records no tls.lost; the body goes on and the edit's exit sends set_release
# on a fresh connection, whose op_set_release _put()s before checking the holder: the
# write lands while another thread holds lock() (then RuntimeError, not LockLostError)
@pytest.mark.parametrize("backend", ["manager", "queue"])
def test_manager_edit_body_cut_short_never_writes_unlocked(name, cut, backend) -> None:
    d = shareit.open(name, backend=backend, timeout=10.0)
    holding = threading.Event()
    edited = threading.Event()
    inside_other: list[object] = []

    def holder() -> None:
        with d.lock(timeout=10.0):
            holding.set()
            edited.wait(DEADLINE)
            inside_other.append(d["k"])

    t = threading.Thread(target=holder)
    escaped = None
    try:
        d["k"] = [0]
        try:
            with d.edit("k") as v:
                cut.armed = True
                try:
                    d["other"] = 1  # (a write: it goes to the server on every backend)
                except KeyboardInterrupt:
                    pass  # e.g. a ^C the body handles
                assert cut.fired == 1
                t.start()  # another thread now takes the lock the server freed
                assert holding.wait(DEADLINE)
                v.append(1)
        except Exception as exc:
            escaped = type(exc).__name__
        edited.set()
        t.join(DEADLINE)
        # the other thread's lock() block must not see a write made during it
        assert inside_other == [[0]]
        assert escaped == "LockLostError"
    finally:
        edited.set()
        holding.set()
        if t.is_alive():
            t.join(DEADLINE)
        d.close()


# Was a strict xfail (fixed): _lock_release decides 'leaving by an exception' from
# sys.exc_info(), which is also set by any except clause the with statement sits in: a
# block that lost its lock and is left normally inside an except clause releases silently
# (no LockLostError)
def test_manager_lost_lock_reported_inside_an_except_clause(name, cut) -> None:
    d = shareit.open(name, backend="manager", timeout=10.0)
    try:
        d["a"] = 0
        try:
            raise ValueError("handled elsewhere")
        except ValueError:
            with pytest.raises(LockLostError):
                with d.lock():
                    cut.armed = True
                    try:
                        d["a"] = 1  # cut short: maybe written, maybe not
                    except KeyboardInterrupt:
                        pass
        d["b"] = 1
    finally:
        d.close()


def test_manager_hand_acquire_release_counts(name, cut) -> None:
    """Held: lock().acquire()/release() by hand keep link.locks in step (a later call cut
    short outside any lock records nothing)."""
    d = shareit.open(name, backend="manager", timeout=10.0)
    try:
        lk = d.lock()
        lk.acquire()
        d["a"] = 1
        lk.release()
        cut.armed = True
        with pytest.raises(KeyboardInterrupt):
            d["a"]
        d["b"] = 2  # no LockLostError: no lock() was held when the call was cut short
        assert d.snapshot() == {"a": 1, "b": 2}
    finally:
        d.close()


# ---------------------------------------------------------------------- value


_ORIG: dict[str, object] = {}  # hooked attributes of the handle, for the forked child


def _value_child(d, what: str, conn) -> None:
    for attr, orig in _ORIG.items():  # undo the parent's blocking hooks
        setattr(d, attr, orig)
    assert conn.poll(DEADLINE)
    conn.recv()
    try:
        if what == "update":
            d.update({"b": 5})
        else:
            d["a"] = 5
        conn.send(("ok", d.snapshot()))
    except BaseException as exc:
        conn.send((type(exc).__name__, None))


# Was a strict xfail (fixed): _bulk/_busy are plain attributes of the handle: a fork (the
# way value mappings reach children) while another thread is inside update() or incr()
# copies them set, and in the child no one ever clears them -- every update/lock()/clear
# (and every write of that key) there raises ReentrantWriteError for good
@pytest.mark.parametrize("during", ["update", "incr"])
def test_value_fork_while_another_thread_is_in_a_bulk_write_or_incr(during) -> None:
    d = shareit.open(backend="value", keys=["a", "b"])
    entered = threading.Event()
    go = threading.Event()
    parent, child = FORK.Pipe()
    p = None

    def blocking(attr, orig):
        _ORIG[attr] = orig

        def f(*a):
            entered.set()
            go.wait(DEADLINE)
            return orig(*a)
        return f

    _ORIG.clear()
    try:
        d.update({"a": 1, "b": 2})
        if during == "update":
            d._begin_bulk = blocking("_begin_bulk", d._begin_bulk)
            t = threading.Thread(target=d.update, args=({"a": 10},))
        else:
            d._cv = blocking("_cv", d._cv)
            t = threading.Thread(target=d.incr, args=("a", 1))
        t.start()
        assert entered.wait(DEADLINE)
        p = FORK.Process(target=_value_child, args=(d, during if during == "update" else "set",
                                                    child))
        p.start()
        child.close()
        go.set()
        t.join(DEADLINE)
        assert not t.is_alive()
        parent.send("go")
        assert parent.poll(DEADLINE), "child hung"
        result, _snap = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        assert result == "ok"
    finally:
        go.set()
        if p is not None and p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


def test_value_bulk_flag_cleared_after_an_exception_in_update() -> None:
    """Held: an update that fails mid-way (a value the type refuses) leaves _bulk clear:
    later writes and lock() work."""
    d = shareit.open(backend="value", keys=["a", "b"])
    try:
        d.update({"a": 1, "b": 2})
        with pytest.raises((TypeError, ValueError, OverflowError)):
            d.update({"a": 3, "b": "not a number"})
        assert d._bulk == 0 and 1 not in d._busy
        with d.lock(timeout=5.0):
            d.update({"a": 7})
        d.incr("b", 1)
        assert d["a"] == 7
    finally:
        d.close()


def test_value_another_thread_waits_for_a_bulk_write_not_reentrant() -> None:
    """Held: another thread's write while this thread is inside update() waits and lands
    (it never sees this thread's _bulk and raises ReentrantWriteError)."""
    d = shareit.open(backend="value", keys=["a", "b"])
    entered = threading.Event()
    go = threading.Event()
    results: list[object] = []
    orig = d._begin_bulk

    def slow() -> None:
        entered.set()
        go.wait(DEADLINE)
        orig()

    def other(op: str) -> None:
        try:
            if op == "update":
                d.update({"b": 9})
            elif op == "lock":
                with d.lock(timeout=20.0):
                    d["b"] = 9
            else:
                d["b"] = 9
            results.append("ok")
        except BaseException as exc:
            results.append(type(exc).__name__)

    try:
        d._begin_bulk = slow
        a = threading.Thread(target=d.update, args=({"a": 10},))
        a.start()
        assert entered.wait(DEADLINE)
        del d._begin_bulk
        threads = [threading.Thread(target=other, args=(op,)) for op in ("update", "lock", "set")]
        for t in threads:
            t.start()
        go.set()
        for t in [a, *threads]:
            t.join(DEADLINE)
        assert results == ["ok"] * 3
        assert d.snapshot() == {"a": 10, "b": 9}
    finally:
        go.set()
        d.close()


# ---------------------------------------------------------------------- shm


def _shm_fork_child(name: str, via: str, inherited, conn) -> None:
    d = inherited if via == "inherited" else shareit.open(name, backend="shm", timeout=20.0)
    conn.send(("pid", os.getpid()))
    d["a"] = "child"  # overwrite of a key the parent placed
    d["new"] = 1  # an insert
    conn.send(("done", None))


def _waiting(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] == FUTEX
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("via", ["inherited", "by_name"])
def test_shm_fork_inside_lock_child_waits(name, via) -> None:
    """Held: a child forked while the parent holds lock() (and has written flat inside
    it) waits for the parent's release before its flat writes land -- through the handle
    it inherited (its lock depth and slots the parent's) or one it opens by name."""
    d = shareit.open(name, backend="shm", timeout=20.0)
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_shm_fork_child, args=(name, via, d, child))
    try:
        d["a"] = "x"
        with d.lock():
            d["a"] = "parent"  # flat, under this thread's lock()
            p.start()
            child.close()
            assert parent.poll(DEADLINE)
            _tag, pid = parent.recv()
            wait_until(lambda: _waiting(pid) or proc_state(pid) in (b"Z", b"X"),
                       "the child waiting for the lock")
            assert not parent.poll(0)
            assert d["a"] == "parent" and "new" not in d
        assert parent.poll(DEADLINE)
        assert parent.recv()[0] == "done"
        assert join_all([p], DEADLINE) == [0]
        assert d.snapshot() == {"a": "child", "new": 1} and d.verify() == []
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


def _shm_killed_in_lock(name: str, conn) -> None:
    d = shareit.open(name, backend="shm", timeout=20.0)
    with d.lock():
        d["a"] = "dead"  # flat overwrite
        d["fresh"] = 2  # flat insert
        conn.send("written")
        conn.recv()  # SIGKILLed here


def test_shm_sigkill_inside_lock_after_flat_writes(name) -> None:
    """Held: a process SIGKILLed inside lock() after flat writes: the next writer takes
    the lock (owner died), the table verifies, and the committed flat writes stay."""
    d = shareit.open(name, backend="shm", timeout=20.0)
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_shm_killed_in_lock, args=(name, child))
    try:
        d["a"] = "x"
        p.start()
        child.close()
        assert parent.poll(DEADLINE)
        assert parent.recv() == "written"
        os.kill(p.pid, signal.SIGKILL)
        p.join(DEADLINE)
        d["b"] = 1
        with d.lock(timeout=10.0):
            d["c"] = 3
        assert d.verify() == []
        assert d.snapshot() == {"a": "dead", "fresh": 2, "b": 1, "c": 3}
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


def test_shm_other_thread_waits_while_lock_block_grows(name) -> None:
    """Held: inside this thread's lock(), writes that need growth (many new keys, big
    values) go on while another thread's flat writes wait; nothing interleaves."""
    d = shareit.open(name, backend="shm", timeout=20.0)
    started = threading.Event()
    out: list[object] = []

    def other() -> None:
        started.set()
        d["probe"] = "other"
        out.append(len(d))

    t = threading.Thread(target=other)
    try:
        d["probe"] = "x"
        with d.lock():
            t.start()
            assert started.wait(DEADLINE)
            wait_until(lambda: _waiting_thread(t), "the other thread waiting")
            for i in range(400):
                d[f"k{i}"] = "v" * (i % 50)
            d["big"] = b"z" * 200_000
            assert d["probe"] == "x"
            for i in range(0, 400, 2):
                del d[f"k{i}"]
        t.join(DEADLINE)
        assert out == [1 + 200 + 1] and d["probe"] == "other" and d.verify() == []
    finally:
        if t.is_alive():
            t.join(DEADLINE)
        d.close()


def _waiting_thread(t: threading.Thread) -> bool:
    try:
        with open(f"/proc/self/task/{t.native_id}/syscall") as f:
            return f.read().split()[0] == FUTEX
    except (OSError, IndexError):
        return False
