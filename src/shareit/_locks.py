"""Crash-safe locks.

The stdlib's ``multiprocessing`` locks stay locked forever when their holder
is SIGKILLed (FACTS.md). ``flock`` is released by the kernel when the last
descriptor of its holder goes away, so a dead holder never blocks the rest.
``flock`` excludes separately opened descriptors even within one process, so
:class:`FileLock` adds a thread lock for the threads of one process and
reopens the file after ``fork``: a forked child closes the descriptors it
inherited at once (an inherited one shares the parent's open file description,
so it would keep the parent's lock held after the parent died, for as long as
the child lives). The ``flock`` fallback of a robust mutex (:class:`FlockMutex`)
does the same.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # (ctypes is imported when a robust mutex is first used)
    import ctypes

    from _typeshed import WriteableBuffer


def _open_lockfile(path: str, create: bool) -> int:
    """A lock file of ours: never through a symlink, owner and mode checked."""
    from ._runtime import open_private

    if create:
        try:
            return open_private(path, os.O_RDWR, create=True)
        except FileExistsError:
            pass
    return open_private(path, os.O_RDWR)


class FileLock:
    """A reentrant (per thread) lock across processes on ``path``, released if its holder dies."""

    def __init__(self, path: str, *, create: bool = True):
        self.path = path
        self._create = create
        self._fd = -1
        self._pid = -1
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        #: In a forked child: (thread, depth) of the parent's hold at the fork, which
        #: that thread's copy in the child still releases (without touching the lock).
        self._inherited: tuple[int, int] | None = None
        _file_locks.add(self)

    def _forked(self) -> None:
        """In a forked child, before anything else runs: let go of the parent's lock."""
        if self._fd >= 0:
            os.close(self._fd)  # this process's copy only: the parent keeps its lock
        self._fd, self._pid = -1, -1
        if self._owner is not None:
            self._inherited = (self._owner, self._depth)
        self._mutex = threading.Lock()
        self._owner, self._depth = None, 0

    def fileno(self) -> int:
        """This process's descriptor of the lock file (opened on first use)."""
        return self._fileno()

    def _fileno(self) -> int:
        if self._pid != os.getpid():  # first use, or a forked child: never share the parent's lock
            self._fd = _open_lockfile(self.path, self._create)
            self._pid = os.getpid()
        return self._fd

    def acquire(self, timeout: float | None = None) -> bool:
        me = threading.get_ident()
        if self._owner == me and self._pid == os.getpid():
            self._depth += 1
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._mutex.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            fd = self._fileno()
            delay = 0.0001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        self._mutex.release()
                        return False
                    time.sleep(delay)  # the holder is another process; back off up to 5 ms
                    delay = min(delay * 2, 0.005)
        except BaseException:
            self._mutex.release()
            raise
        self._owner, self._depth = me, 1
        return True

    def release(self) -> None:
        if self._owner != threading.get_ident():
            held = self._inherited
            if held is not None and held[0] == threading.get_ident():  # held when we forked
                self._inherited = (held[0], held[1] - 1) if held[1] > 1 else None
                return
            raise RuntimeError("release of a lock this thread does not hold")
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._mutex.release()

    def held(self) -> bool:
        """Whether this thread of this process holds it (the lock is reentrant per thread)."""
        return self._owner == threading.get_ident() and self._pid == os.getpid()

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = -1, -1


# --------------------------------------------------------------------------- robust mutex

OWNER_DIED = "owner-died"


class Mutex(Protocol):
    """What a :class:`RobustMutex` and a :class:`FlockMutex` both offer."""

    def trylock(self) -> int:
        """0 (held now), 16 (EBUSY) or 130 (EOWNERDEAD: held now, repair first)."""
        ...

    def unlock(self) -> int: ...

    def acquire(self, timeout: float) -> bool | str: ...

    def release(self) -> None: ...

    def make_consistent(self) -> None: ...


class RobustMutex:
    """A process-shared, robust, recursive pthread mutex living in shared memory.

    Futex-based: cheap when contended, unlike ``flock``. When its holder dies,
    the next ``acquire`` gets it with :data:`OWNER_DIED` (POSIX ``EOWNERDEAD``),
    must repair what the dead holder was changing, and the mutex is then marked
    consistent. Recursive, so ``lock()`` can wrap ``incr`` in the same thread.
    Linux/glibc or musl; :func:`robust_mutex_available` says whether it works here.
    """

    SIZE = 64  # >= sizeof(pthread_mutex_t) on every Linux ABI

    def __init__(self, buffer: WriteableBuffer, offset: int = 0):
        import ctypes
        from functools import partial

        lib = _pthread()
        # the temporary c_char is dropped at once: no buffer export is kept, so the
        # owner can still close an mmap (it must outlive every use of the mutex)
        self._ptr = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(buffer, offset)))
        self._timedlock = lib.pthread_mutex_timedlock
        self._unlock = lib.pthread_mutex_unlock
        self._consistent = lib.pthread_mutex_consistent
        #: ``trylock()`` -> 0 (held), 16 (EBUSY) or 130 (EOWNERDEAD: held, must repair).
        #: These two are the hot path: neither ever blocks, so they are called holding the
        #: GIL (PyDLL), without errno saving or argument conversion (the pointer is already
        #: a c_void_p; both return an int).
        fast = _pthread_fast()
        self.trylock: Callable[[], int] = partial(fast.pthread_mutex_trylock, self._ptr)
        self.unlock: Callable[[], int] = partial(fast.pthread_mutex_unlock, self._ptr)

    @staticmethod
    def init(buffer: WriteableBuffer, offset: int = 0) -> None:
        import ctypes

        lib = _pthread()
        attr = ctypes.create_string_buffer(64)
        ptr = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(buffer, offset)))
        for fn, arg in ((lib.pthread_mutexattr_init, None),
                        (lib.pthread_mutexattr_setpshared, 1),       # PTHREAD_PROCESS_SHARED
                        (lib.pthread_mutexattr_setrobust, 1),        # PTHREAD_MUTEX_ROBUST
                        (lib.pthread_mutexattr_settype, 1)):         # PTHREAD_MUTEX_RECURSIVE
            rc = fn(attr) if arg is None else fn(attr, arg)
            if rc:
                raise OSError(rc, f"{fn.__name__} failed")
        rc = lib.pthread_mutex_init(ptr, attr)
        lib.pthread_mutexattr_destroy(attr)
        if rc:
            raise OSError(rc, "pthread_mutex_init failed")

    def acquire(self, timeout: float) -> bool | str:
        """True, :data:`OWNER_DIED` (held now; repair, then it is consistent), or False on
        timeout."""
        rc = self.trylock()
        if rc == 16:  # EBUSY: wait, with a deadline
            import ctypes

            ts = _timespec(time.time() + timeout)
            rc = self._timedlock(self._ptr, ctypes.byref(ts))
        if rc == 0:
            return True
        if rc == 130:  # EOWNERDEAD
            self._consistent(self._ptr)
            return OWNER_DIED
        if rc == 110:  # ETIMEDOUT
            return False
        raise OSError(rc, f"pthread mutex lock failed ({os.strerror(rc)})")

    def release(self) -> None:
        rc = self.unlock()
        if rc:
            raise OSError(rc, f"pthread mutex unlock failed ({os.strerror(rc)})")

    def make_consistent(self) -> None:
        """After ``trylock()`` returned 130 (EOWNERDEAD)."""
        self._consistent(self._ptr)


class FlockMutex:
    """The same interface over ``flock`` (for systems without robust mutexes).

    Recursive per thread like the robust mutex: a thread lock orders the
    threads of one process, ``flock`` the processes. A forked child must
    build its own (an inherited descriptor would share the parent's lock).
    """

    def __init__(self, path: str):
        self._fd = _open_lockfile(path, False)
        self._rlock = threading.RLock()
        self._depth = 0
        _flock_mutexes.add(self)

    def _forked(self) -> None:
        """In a forked child: close the inherited descriptor (see :class:`FileLock`). The
        child must build its own mutex; this one is unusable there."""
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def trylock(self) -> int:
        if not self._rlock.acquire(False):
            return 16
        if self._depth == 0:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._rlock.release()
                return 16
        self._depth += 1
        return 0

    def unlock(self) -> int:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._rlock.release()
        return 0

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if not self._rlock.acquire(True, timeout):
            return False
        self._rlock.release()
        delay = 2e-6
        while self.trylock():
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)  # the holder is another process; back off up to 2 ms
            delay = min(delay * 2, 2e-3)
        return True

    def release(self) -> None:
        self.unlock()

    def make_consistent(self) -> None:
        pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


#: Every lock whose descriptor a forked child must close at once (see the module doc).
_file_locks: weakref.WeakSet[FileLock] = weakref.WeakSet()
_flock_mutexes: weakref.WeakSet[FlockMutex] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_file_locks):
        lock._forked()
    for mutex in list(_flock_mutexes):
        mutex._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


_lib: ctypes.CDLL | None = None


def _pthread() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        import ctypes
        import ctypes.util

        lib = ctypes.CDLL(ctypes.util.find_library("pthread") or None, use_errno=True)
        for name in ("pthread_mutex_trylock", "pthread_mutex_unlock", "pthread_mutex_consistent",
                     "pthread_mutex_timedlock", "pthread_mutex_init"):
            getattr(lib, name).argtypes = [ctypes.c_void_p] * (2 if name in (
                "pthread_mutex_timedlock", "pthread_mutex_init") else 1)
            getattr(lib, name).restype = ctypes.c_int
        _lib = lib
    return _lib


_fast_lib: ctypes.PyDLL | None = None


def _pthread_fast() -> ctypes.PyDLL:
    global _fast_lib
    if _fast_lib is None:
        import ctypes
        import ctypes.util

        _fast_lib = ctypes.PyDLL(ctypes.util.find_library("pthread") or None)
    return _fast_lib


def _timespec(t: float) -> ctypes.Structure:
    """A ``struct timespec`` holding the ``time.time()`` instant ``t``."""
    import ctypes

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    return Timespec(int(t), int((t % 1) * 1e9))


def robust_mutex_available() -> bool:
    try:
        lib = _pthread()
        return all(hasattr(lib, n)
                   for n in ("pthread_mutexattr_setrobust", "pthread_mutex_consistent"))
    except OSError:
        return False
