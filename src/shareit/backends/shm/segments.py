"""The ``shm`` backend's segment files: allocated in full, mapped without a descriptor,
and released by the handles that mapped them (by ``close()`` or when dropped).

A Pool worker receives a handle with every task and drops it: a handle that
held descriptors exhausted the process's 1,024 within a thousand tasks, and
one that was never unmapped pinned deleted generations in memory. So a
mapping keeps no descriptor (``map_fd``), and what a handle maps is released
by a ``weakref`` finalizer when the handle is garbage collected. A segment is
reserved with ``posix_fallocate`` before anything is written through its
mapping: a sparse file on a full tmpfs kills the writer with SIGBUS on the
first page it touches; a failed allocation is a clean ``CapacityError``.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
import weakref
from typing import Any

from ... import _runtime
from ..._locks import FlockMutex
from ...errors import CapacityError


def ctrl_path(stem: str) -> str:
    return _runtime.path(stem, "ctl")


def data_path(stem: str, gen: int) -> str:
    return _runtime.path(stem, f"g{gen}")


def data_segments(stem: str) -> list[str]:
    """Paths of every generation segment of ``stem`` there is."""
    head = f"{stem}{_runtime.SEP}g"
    return [p for p in _runtime.files_of(stem)
            if os.path.basename(p).startswith(head) and os.path.basename(p)[len(head):].isdigit()]


def all_paths(stem: str) -> list[str]:
    return [ctrl_path(stem), *data_segments(stem)]


def unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def no_room(path: str, need: int, free: int | None = None) -> CapacityError:
    directory = os.path.dirname(path)
    if free is None:
        free = _free_bytes(directory)
    return CapacityError(
        f"the shareit runtime dir {directory} is full: {os.path.basename(path)} needs "
        f"{need:,} bytes and {free:,} are free; nothing was changed. Free space there, ask "
        f"for a smaller capacity, or set SHAREIT_RUNTIME_DIR to a directory with more room"
    )


def create_file(path: str, size: int) -> Any:
    """Create a segment exclusively (mode 0600, never through a symlink), allocate all of
    it, and map it; :class:`CapacityError` (nothing left behind) when there is no room."""
    free = _free_bytes(os.path.dirname(path))
    if size > free:  # checked first: no 54 TB sparse file for capacity=10**12
        raise no_room(path, size, free)
    fd = _runtime.open_private(path, os.O_RDWR, create=True)
    try:
        os.ftruncate(fd, size)
        _allocate(fd, path, size)
        return map_fd(fd, size)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)  # the mapping stays valid without it


def _allocate(fd: int, path: str, size: int) -> None:
    """Reserve every block now: a write through the mapping can then never hit SIGBUS."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # (not Linux: the free-space check above is all there is)
        return
    try:
        fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise no_room(path, size) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


def open_file(path: str) -> Any:
    """Map an existing segment, verified to be ours (see ``_runtime.open_private``)."""
    fd = _runtime.open_private(path, os.O_RDWR)
    try:
        return map_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def map_fd(fd: int, size: int) -> Any:
    """A shared read-write mapping of ``fd`` that keeps no descriptor: a writable buffer
    (``len``, slicing, the buffer protocol). ``mmap.mmap`` keeps a ``dup`` of the
    descriptor for its lifetime unless ``trackfd=False`` (3.13+); before that, libc's
    ``mmap`` through ctypes, unmapped when the last view of it is gone (so never under
    a live view: a numpy array or memoryview over it keeps it mapped)."""
    if sys.version_info >= (3, 13):
        return mmap.mmap(fd, size, trackfd=False)
    import ctypes

    libc = _libc()
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    buf = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(buf, libc.munmap, addr, size).atexit = False
    return buf


_libc_handle: Any = None


def _libc() -> Any:
    global _libc_handle
    if _libc_handle is None:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_long]
        lib.mmap.restype = ctypes.c_void_p
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.munmap.restype = ctypes.c_int
        _libc_handle = lib
    return _libc_handle


def bytes_view(buf: Any) -> memoryview:
    """A byte-format memoryview of a mapping (ctypes arrays export format ``<c``)."""
    return memoryview(buf).cast("B")


def unmap(buf: Any) -> None:
    """Let go of a mapping: unmapped now if nothing else views it, else with the last view."""
    try:
        buf.close()  # (an mmap; a ctypes mapping has no close: its finalizer unmaps)
    except (AttributeError, BufferError):
        pass


def release_quietly(*views: memoryview) -> None:
    for view in views:
        try:
            view.release()
        except BufferError:  # exported further (a numpy array over it): dies with it
            pass


# --------------------------------------------------------------------------- what a handle holds


class Maps:
    """What one handle has mapped: released by ``close()``, or by a finalizer when the
    handle is garbage collected without it (a Pool worker drops the handles it gets)."""

    __slots__ = ("cmm", "cmv", "c", "g", "flock")

    def __init__(self, cmm: Any, cmv: memoryview, c: memoryview):
        self.cmm: Any = cmm
        self.cmv, self.c = cmv, c
        self.g: Any = None  # the mapped Generation
        self.flock: tuple[int, int] | None = None  # (see flock_get)


def release(maps: Maps) -> None:
    """Unmap a handle's segments (the finalizer: it must not refer to the handle)."""
    if maps.g is not None:
        maps.g.close()
        maps.g = None
    release_quietly(maps.c, maps.cmv)
    if maps.flock is not None:
        flock_drop(maps.flock)
        maps.flock = None
    unmap(maps.cmm)  # (the robust mutex holds no buffer export)
    maps.cmm = None


# The flock fallback needs a descriptor to lock: one per process and control file, shared
# by every handle of it (key: device, inode), counted, closed with the last handle.
_flocks: dict[tuple[int, int], list[Any]] = {}  # key -> [FlockMutex, handles, fork generation]
_flocks_lock = threading.Lock()


def flock_get(path: str) -> tuple[Any, tuple[int, int]]:
    mutex = FlockMutex(path)
    st = os.fstat(mutex._fd)
    key = (st.st_dev, st.st_ino)
    with _flocks_lock:
        have = _flocks.get(key)
        if have is not None and have[2] == _runtime.fork_generation:
            mutex.close()  # this process has one on this very file: share it
            have[1] += 1
            return have[0], key
        _flocks[key] = [mutex, 1, _runtime.fork_generation]  # (a parent's: never closed here)
    return mutex, key


def flock_drop(key: tuple[int, int]) -> None:
    with _flocks_lock:
        have = _flocks.get(key)
        if have is None or have[2] != _runtime.fork_generation:
            return
        have[1] -= 1
        if have[1] == 0:
            del _flocks[key]
            have[0].close()
