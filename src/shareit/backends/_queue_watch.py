"""One thread per process that notices a replica's push connection hang up.

The hub died, or dropped a replica that stopped reading: the watcher tells the
replica (``hung_up()``), so that reads need no time check of their own to notice.
It polls for ``POLLRDHUP`` only, never reads, and exits when no replica is left to
watch (so no shareit thread outlives the last replica: ``fork()`` after ``close()``
finds a single-threaded process).
"""

from __future__ import annotations

import os
import select
import threading
import time
import weakref
from typing import Protocol


class Watched(Protocol):
    def hung_up(self) -> None:
        """Called in the watcher thread once the watched connection has hung up."""


class _Watcher:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refs: dict[int, weakref.ref[Watched]] = {}
        self.poller = select.poll()
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.poller.register(self.wake_r, select.POLLIN)
        self.done = False
        self.thread = threading.Thread(target=self.run, name="shareit-queue-watcher", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass

    def run(self) -> None:
        while True:
            for fd, _events in self.poller.poll():
                if fd == self.wake_r:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                with self.lock:
                    ref = self.refs.pop(fd, None)
                    if ref is not None:
                        self.poller.unregister(fd)
                m = ref() if ref is not None else None
                if m is not None:
                    m.hung_up()
            with self.lock:
                if self.done:
                    os.close(self.wake_r)
                    os.close(self.wake_w)
                    return


_the_watcher: _Watcher | None = None
_watcher_lock = threading.Lock()


def watch(fd: int, m: Watched) -> None:
    """Call ``m.hung_up()`` once ``fd`` hangs up (``m`` is held weakly)."""
    global _the_watcher
    with _watcher_lock:
        w = _the_watcher
        if w is None:
            w = _the_watcher = _Watcher()
        with w.lock:
            w.refs[fd] = weakref.ref(m)
            w.poller.register(fd, select.POLLRDHUP)
        w.wake()


def unwatch(fd: int) -> None:
    """Stop watching ``fd``; the last one stops the thread."""
    global _the_watcher
    with _watcher_lock:
        w = _the_watcher
        if w is None:
            return
        with w.lock:
            if w.refs.pop(fd, None) is not None:
                w.poller.unregister(fd)
            last = not w.refs
            if last:
                w.done = True
        w.wake()
        if last:
            _the_watcher = None
            if w.thread is not threading.current_thread():
                w.thread.join(5.0)
                _wait_os_thread_gone(w.thread.native_id, 1.0)


def _wait_os_thread_gone(tid: int | None, limit: float) -> None:
    """``join()`` returns a moment before the OS thread is gone, and Python 3.12+ counts OS
    threads when it warns that a process forks while multi-threaded: a ``fork()`` right
    after ``close()`` must find this one gone."""
    if tid is None:
        return
    deadline = time.monotonic() + limit
    while os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
        time.sleep(0.0001)  # the kernel finishing an exiting thread: microseconds


def _after_fork_in_child() -> None:
    global _the_watcher, _watcher_lock
    _the_watcher, _watcher_lock = None, threading.Lock()  # its thread is not in the child


os.register_at_fork(after_in_child=_after_fork_in_child)
