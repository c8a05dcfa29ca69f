"""The ``shm`` table's writer lock, as one process holds it.

The lock itself lives in the control segment: a robust, process-shared,
recursive pthread mutex at byte ``MUTEX_OFFSET`` (futex-based; when its holder
dies the next locker gets ``EOWNERDEAD`` and the table repairs), or, where
robust mutexes are missing, ``flock`` on the control file (one descriptor per
process and file, shared by every handle; see :mod:`.segments`).

:class:`WriterLock` is this process's side of it: the mutex object (set up on
first use, and again in a forked child, whose flock descriptor must be its
own), the recursion depth, and the non-blocking ``trylock``/``unlock`` pair
the hot paths call directly.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from ... import _runtime
from ..._locks import RobustMutex
from . import layout as L
from .segments import Maps, ctrl_path, flock_drop, flock_get

EBUSY, EOWNERDEAD = errno.EBUSY, errno.EOWNERDEAD  # what trylock() returns besides 0


class WriterLock:
    """This process's handle on a table's writer lock (see the module docstring)."""

    __slots__ = ("seg", "cmm", "c", "maps", "mutex", "trylock", "unlock", "depth", "busy",
                 "forkgen", "pid")

    def __init__(self, seg: str, cmm: Any, c: Any, maps: Maps):
        self.seg, self.cmm, self.c, self.maps = seg, cmm, c, maps
        self.mutex: Any = None
        self.trylock: Any = None  # () -> 0 (held), EBUSY, or EOWNERDEAD (held; repair)
        self.unlock: Any = None
        self.depth = 0  # only the holding thread changes it
        #: 1 while a write of the holding thread runs (from its lock to its unlock): a write
        #: begun then -- by a signal handler of that thread: the mutex is recursive -- would
        #: act on what the outer write has half done, and raises ReentrantWriteError instead.
        self.busy = 0
        self.forkgen = -1
        self.pid = 0  # this process's, once set up (the control segment names the last writer)

    def close(self) -> None:
        self.mutex = self.trylock = self.unlock = self.cmm = self.c = None

    def ready(self) -> bool:
        """Whether this process has set the lock up (it has not if it forked since)."""
        return self.forkgen == _runtime.fork_generation

    def setup(self) -> None:
        """First use, or a forked child: the robust mutex is shared memory and works as is,
        but the depth count is the parent's, and a flock descriptor must be our own.
        ``FileNotFoundError``: the control file is gone (destroyed)."""
        if self.c[L.C_LOCKKIND] == L.LOCK_ROBUST:
            self.mutex = RobustMutex(self.cmm, L.MUTEX_OFFSET)
        else:
            if self.maps.flock is not None:  # the one of before a fork (the parent's: kept)
                flock_drop(self.maps.flock)
                self.maps.flock = None
            self.mutex, self.maps.flock = flock_get(ctrl_path(self.seg))
        self.trylock, self.unlock = self.mutex.trylock, self.mutex.unlock
        self.depth = self.busy = 0
        self.pid = os.getpid()
        self.forkgen = _runtime.fork_generation

    def acquire(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s; True if now held (by one more level)."""
        if not self.mutex.acquire(timeout):
            return False
        self.depth += 1
        return True

    def release(self) -> None:
        self.depth -= 1
        self.mutex.release()

    def contended(self, rc: int, timeout: float) -> bool | None:
        """``trylock()`` returned ``rc``, not 0: wait for the lock. True: held now; False:
        not held, and the caller takes the general path, which repairs after a dead
        holder; None: not held within ``timeout``."""
        m = self.mutex
        if rc == EOWNERDEAD:  # the last holder died
            m.make_consistent()
            m.unlock()
            return False
        got = m.acquire(timeout)
        if got is True:
            return True
        if got:  # held now, after a dead holder: unlock, and the general path repairs
            m.unlock()
            return False
        return None
