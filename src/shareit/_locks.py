"""Crash-safe locks.

The stdlib's ``multiprocessing`` locks stay locked forever when their holder
is SIGKILLed (FACTS.md). ``flock`` is released by the kernel when the last
descriptor of its holder goes away, so a dead holder never blocks the rest.
``flock`` excludes separately opened descriptors even within one process, so
:class:`FileLock` adds a thread lock for the threads of one process and
reopens the file after ``fork`` (an inherited descriptor would share the
parent's lock).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time

from .errors import LockTimeoutError


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

    def _fileno(self) -> int:
        if self._pid != os.getpid():  # first use, or a forked child: never share the parent's lock
            flags = os.O_RDWR | (os.O_CREAT if self._create else 0) | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
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
            raise RuntimeError("release of a lock this thread does not hold")
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._mutex.release()

    def held(self) -> bool:
        return self._owner == threading.get_ident() and self._pid == os.getpid()

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = -1, -1


def acquire_or_raise(lock: FileLock, timeout: float, what: str) -> None:
    if not lock.acquire(timeout):
        raise LockTimeoutError(
            f"could not lock {what} within {timeout:g} s; another process holds it. "
            f"Pass a larger timeout= (option or lock(timeout=...)) if this is expected"
        )
