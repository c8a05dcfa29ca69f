"""Who uses a named local mapping, and when it goes away.

The rule: **a named mapping lives while any process uses it** (a handle
pickled for another process counts for up to ``timeout`` seconds, until that
process has it) -- or, once
the last one has left, while the process that started several of its users is
alive (a gunicorn or uvicorn master, a pool's parent): workers restarted all
at once (a graceful reload) find their data again. Its record lists its users
as ``[pid, start time]`` pairs, counts how many users each parent started,
and names that *keeper* when the last user leaves. A process becomes a user when
it opens the mapping by name, receives a handle (pickle: a ``Pool`` task, a
``Process`` argument), or is forked from a user; it stops being one when it
closes its last handle or exits. The last user to leave removes the mapping,
unless it is ``persist=True`` (then ``shareit gc --persistent`` or ``shareit
rm NAME`` removes it). A user that died without leaving -- SIGKILL,
``os._exit``, a server that re-raises SIGTERM -- is pruned: a pid that is gone,
or reused by another process (start time), does not count. A manager or queue
server watches the same list and exits once no live user is left.

So no one process, the creator included, takes the data with it while others
still use it (web workers restarted one by one, pools replacing workers), and
the data is never split: a name is taken over only when no live user is left.

Every step that reads and rewrites a list, or decides to create, take over or
remove a mapping, holds the name's lock (``flock`` on ``NAME@lock``), so any
number of concurrent openers end with exactly one live mapping.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TypeAlias, TypedDict

from . import _runtime
from ._records import Proc, Record
from .errors import BackendDiedError, lock_timeout

__all__ = ["name_lock", "live_users", "join", "leave", "leave_all_at_exit"]


class NameLock(TypedDict):
    """What :func:`name_lock` yields: set ``remove`` to remove the lock file on the way out."""

    remove: bool


@contextmanager
def name_lock(name: str, timeout: float, create: bool = True) -> Iterator[NameLock]:
    """Hold the lock of ``name`` (waiting up to ``timeout`` s). The lock file is removed
    on the way out when the name has no record (or the yielded dict's ``"remove"`` was
    set): nothing is left behind by an open that failed or a mapping that is gone. With
    ``create=False`` a missing lock file raises FileNotFoundError instead of being made
    (for a process that may be killed any moment: a server whose mapping is going)."""
    path = _runtime.path(name, "lock")
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while True:
        try:
            if not create:  # (FileNotFoundError: no lock file, so no mapping to guard)
                raise FileExistsError
            fd = _runtime.open_private(path, os.O_RDWR, create=True)
        except FileExistsError:
            try:
                fd = _runtime.open_private(path, os.O_RDWR)
            except FileNotFoundError:
                if not create:
                    raise
                continue  # removed between the two opens: create it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise lock_timeout(f"the name {name!r}", timeout,
                                   "another process is opening or closing that mapping") from None
            time.sleep(pause)  # another process holds it for a few file operations
            pause = min(pause * 2, 0.01)
            continue
        try:  # the holder before us may have removed the file: then it is not the lock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _held.add(fd)
    state: NameLock = {"remove": False}
    try:
        yield state
    finally:
        if state["remove"] or not os.path.lexists(_runtime.meta_path(name)):  # nothing to guard
            try:
                os.unlink(path)  # while still held: a waiter then sees another inode
            except FileNotFoundError:
                pass
        _held.discard(fd)
        os.close(fd)  # (releases the flock)


#: Descriptors of name locks this process holds now. A child forked meanwhile (another
#: thread's fork) closes its copies at once: an inherited copy would keep the flock
#: held for the child's whole life.
_held: set[int] = set()


def me() -> Proc:
    pid = os.getpid()
    return [pid, _runtime.proc_start_time(pid)]


def _parent() -> Proc | None:
    """``[pid, start]`` of this process's parent, unless it is init (or unknown)."""
    ppid = os.getppid()
    start = _runtime.proc_start_time(ppid)
    return None if ppid <= 1 or start is None else [ppid, start]


def my_parents() -> list[Proc]:
    """The ``parents`` of a record this process creates: its parent, with this process as
    the first child it started (``[ppid, start, first child's pid, several]``)."""
    parent = _parent()
    return [] if parent is None else [parent + [os.getpid(), 0]]


def add_me(name: str, record: Record, **more: int) -> None:
    """With the name's lock held: add this process to ``record``'s users, and count it
    among the children of its parent (see :func:`leave`: a supervisor of several users
    keeps the mapping while it lives)."""
    parents = [p for p in record["parents"] if _runtime.pid_alive(p[0], p[1])][-999:]
    parent = _parent()
    if parent is not None:
        for p in parents:
            if p[:2] == parent:
                if p[2] != os.getpid():  # a second, distinct child (re-opening counts once)
                    p[3] = 1
                break
        else:
            parents.append(parent + [os.getpid(), 0])
    _runtime.rewrite(name, users=live_users(record) + [me()], parents=parents, **more)


def live_users(record: Record) -> list[Proc]:
    """The users of ``record`` that are still alive (pid and start time match)."""
    return [u for u in record["users"] if _runtime.pid_alive(u[0], u[1])]


# --- this process's uses -------------------------------------------------------------

#: Which mapping of a name: (name, its record's creation time).
Use: TypeAlias = tuple[str, float]

#: (name, created) -> how many handles of this process use it.
_uses: dict[Use, int] = {}
_uses_lock = threading.Lock()
#: (name, created) -> the mapping's timeout: how long exit and fork may wait for its lock.
_timeouts: dict[Use, float] = {}
#: Every (name, created) this process ever used: at exit, one whose users have all died
#: since (forked workers end with os._exit, a pool terminates its workers) is removed.
_touched: set[Use] = set()


def _add_me(name: str, created: float, timeout: float, received: bool = False,
            register: bool = True) -> None:
    """With no lock held: add this process to the users of ``name`` (as created then);
    ``received``: by unpickling a handle, which is no longer in transit."""
    with name_lock(name, timeout):
        record = _runtime.read_meta(name)
        if record is None or record["created"] != created:
            raise BackendDiedError(
                f"mapping {name!r} was removed (its last user left, or destroy() was called); "
                f"open it again by name"
            )
        if register:
            add_me(name, record, **(_arrived(record) if received else {}))
        elif received:
            _runtime.rewrite(name, **_arrived(record))


def join(name: str, created: float, timeout: float, registered: bool = False,
         received: bool = False) -> None:
    """This process uses ``name`` once more. ``registered``: the caller already put this
    process in the record's list (while holding the lock); ``received``: by unpickling a
    handle (see :func:`in_transit`)."""
    key = (name, created)
    with _uses_lock:
        n = _uses.get(key, 0)
        _uses[key] = n + 1
        _timeouts[key] = timeout
        _touched.add(key)
    _exit_hook()
    if (n == 0 and not registered) or received:
        try:
            _add_me(name, created, timeout, received, register=n == 0 and not registered)
        except BaseException:
            with _uses_lock:
                _uses[key] -= 1
            raise


#: (name, created) whose last use in this process was a handle dropped without close():
#: left at the next open or close (a finalizer must not take locks), or at exit.
_pending: list[Use] = []


def dropped(name: str, created: float) -> None:
    """A handle was garbage-collected unclosed: one use less, without any I/O here."""
    key = (name, created)
    with _uses_lock:
        n = _uses.get(key, 0)
        if n > 1:
            _uses[key] = n - 1
        elif n == 1:
            _pending.append(key)


def leave_pending(remove: Callable[[str, Record], None]) -> None:
    """Leave the mappings whose last handle here was dropped unclosed."""
    if _pending and _dir_gone():
        _pending.clear()
    while _pending:
        name, created = _pending.pop()
        if _uses.get((name, created)) == 1:
            try:
                leave(name, created, _timeouts.get((name, created), 5.0), partial(remove, name))
            except Exception:  # it will be pruned as a user once this process exits
                pass


def _supervisor(record: Record) -> Proc | None:
    """This process's parent, if it is alive and started at least two distinct users of
    the mapping -- a web server's or a pool's supervisor -- else None."""
    parent = _parent()
    if parent is None:
        return None
    for p in record["parents"]:
        if p[:2] == parent and p[3] and _runtime.pid_alive(parent[0], parent[1]):
            return parent
    return None


def in_transit(name: str, created: float, timeout: float) -> None:
    """A handle of ``name`` is being pickled for another process, which becomes a user only
    once it has unpickled it: count it in the record, so that the mapping survives until
    then even if every user closes meanwhile (``start(); close()``). The receiver counts
    it off (:func:`join` with ``received``); one never received stops counting after
    ``timeout`` seconds."""
    with name_lock(name, timeout):
        record = _runtime.read_meta_quiet(name)
        if record is None or record["created"] != created:
            return  # gone: the receiver will say so
        n = record["transit_n"] if record["transit"] > time.time() else 0
        _runtime.rewrite(name, transit=time.time() + timeout, transit_n=n + 1, transit_by=me())


def _receivers_may_come(record: Record) -> bool:
    """A handle is in transit (see :func:`in_transit`) to a process that may still take it:
    one sent by another process, or by this one while it has a live child (a handle sent
    by this process goes to a child it started; a child killed before it unpickled it,
    such as a pool worker terminated while booting, never will)."""
    if not _runtime.in_transit(record):
        return False
    return record["transit_by"] != me() or _has_live_children()


def _has_live_children() -> bool:
    me_ = str(os.getpid()).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[1] != me_ or fields[0] in (b"Z", b"X"):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if not any(helper in cmd for helper in _HELPERS):
            return True
    return False


#: Children that never take a handle: multiprocessing's helpers, our own servers.
_HELPERS = (b"resource_tracker", b"forkserver", b"shareit.backends._manager_server")


def _arrived(record: Record) -> dict[str, int]:
    """The transit fields of ``record`` with one handle fewer on its way."""
    return {"transit_n": max(0, record["transit_n"] - 1)}


def forget(name: str, created: float) -> None:
    """This process no longer uses ``name`` at all (it is being destroyed)."""
    with _uses_lock:
        _uses.pop((name, created), None)


def is_user(name: str, created: float) -> bool:
    return _uses.get((name, created), 0) > 0


def leave(name: str, created: float, timeout: float, remove: Callable[[Record], None]) -> None:
    """This process uses ``name`` once less; when no longer at all, it leaves the list, and
    if no live user is left (and it is not persistent) ``remove(record)`` removes it."""
    key = (name, created)
    with _uses_lock:
        n = _uses.get(key, 0) - 1
        if n > 0:
            _uses[key] = n
            return
        _uses.pop(key, None)
    if n < 0:
        return
    with name_lock(name, timeout) as lock:
        if is_user(name, created):
            return  # another thread of this process opened it again meanwhile: still a user
        record = _runtime.read_meta_quiet(name)
        if record is None or record["created"] != created:
            return  # already removed (destroy(), or taken over after we were counted dead)
        users = [u for u in live_users(record) if u[0] != os.getpid()]
        if users or record["persist"] or _receivers_may_come(record):
            _runtime.rewrite(name, users=users)  # (in transit: its receiver will leave it)
            return
        keeper = _supervisor(record)
        if keeper is not None:  # workers restarted all at once come back to it
            _runtime.rewrite(name, users=[], keeper=keeper)
            return
        remove(record)
        _runtime.remove_meta(name)
        lock["remove"] = True


def _after_fork_in_child() -> None:
    """A forked child of a user is a user too: it holds copies of the parent's handles."""
    global _uses_lock, _hooked
    _uses_lock = threading.Lock()
    _hooked = False  # multiprocessing's finalizers are per process
    for fd in list(_held):  # another thread of the parent held these when it forked
        os.close(fd)
    _held.clear()
    for name, created in list(_uses):
        try:
            _add_me(name, created, _timeouts.get((name, created), 5.0))
        except Exception:  # removed meanwhile: its handles will say so when used
            _uses.pop((name, created), None)
    if _uses:
        _exit_hook()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _dir_gone() -> bool:
    """Whether this user's runtime dir no longer exists (then it must not be recreated)."""
    return not os.path.isdir(os.path.join(_runtime.base_dir(), f"shareit-{os.geteuid()}"))


def leave_all_at_exit(remove_for: Callable[[str, Record], None]) -> None:
    """At exit: leave every mapping this process still uses; remove those it used whose
    users have all died meanwhile. Each wait is bounded by its mapping's timeout."""
    if _dir_gone():
        _uses.clear()  # the runtime dir itself is gone: nothing to leave, nothing to recreate
        _touched.clear()
        return
    for name, created in list(_uses):
        _uses[(name, created)] = 1
        try:
            leave(name, created, _timeouts.get((name, created), 5.0), partial(remove_for, name))
        except Exception:  # best effort at exit; the others prune us
            pass
    for name, created in list(_touched):
        try:
            with name_lock(name, min(_timeouts.get((name, created), 5.0), 1.0)) as lock:
                record = _runtime.read_meta_quiet(name)
                # (handles this process sent are received by now: multiprocessing joins
                # its non-daemon children at exit, and daemon ones are gone)
                if record is not None and record["created"] == created and not _runtime.in_use(
                        record, exiting=me()):
                    remove_for(name, record)
                    _runtime.remove_meta(name)
                    lock["remove"] = True
        except Exception:
            pass
    _touched.clear()


#: The function that runs at exit (set by shareit.base: it knows the backends).
at_exit_fn: Callable[[], None] | None = None
_hooked = False


def _exit_hook() -> None:
    """Run :data:`at_exit_fn` when this process ends, also in a ``multiprocessing`` child
    (a forked one ends with ``os._exit``: ``atexit`` would not run, its finalizers do)."""
    global _hooked
    if _hooked or at_exit_fn is None:
        return
    _hooked = True
    from multiprocessing import util

    util.Finalize(None, at_exit_fn, exitpriority=0)
    # A multiprocessing child clears the finalizers it inherited, then runs these:
    util.register_after_fork(_hooks, _rehook)


class _Hooks:
    """A weak-referenceable anchor for ``multiprocessing.util.register_after_fork``."""


_hooks = _Hooks()


def _rehook(_: object) -> None:
    global _hooked
    _hooked = False
    if _uses:
        _exit_hook()
