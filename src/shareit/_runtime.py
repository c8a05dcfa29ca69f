"""Where named shared objects are recorded, who owns them, and cleanup at exit.

Each named mapping has one record file, ``<dir>/shareit-<name>.meta`` (JSON,
mode 0600), holding its backend, owner pid and start time, creation time,
``persist`` and what the backend needs to attach (an address, a segment name).
``<dir>`` is ``$SHAREIT_RUNTIME_DIR``, else ``/dev/shm``, else the temp dir.
Creating the record with ``O_EXCL`` is what makes "create or attach" race-free.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import tempfile
import threading
import time
from typing import Any, Callable

from .errors import ConfigError

PREFIX = "shareit-"
LAYOUT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,119}$")


def runtime_dir() -> str:
    d = os.environ.get("SHAREIT_RUNTIME_DIR")
    if d:
        return d
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"invalid mapping name {name!r}: use 1-120 characters of letters, digits, "
            f"'_', '.' and '-', not starting with '.' or '-'"
        )
    return name


def meta_path(name: str) -> str:
    return os.path.join(runtime_dir(), f"{PREFIX}{name}.meta")


def proc_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot); guards against pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2 :].split()[19])


def pid_alive(pid: int, start: int | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start is not None:
        now = proc_start_time(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
        try:  # a zombie is dead for our purposes
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
            if data[data.rindex(b")") + 2 :].split()[0] == b"Z":
                return False
        except OSError:
            pass
    return True


def owner_fields() -> dict[str, Any]:
    pid = os.getpid()
    return {"owner_pid": pid, "owner_start": proc_start_time(pid), "created": time.time()}


def read_meta(name: str) -> dict | None:
    """The record of ``name``, or None when there is none (or it is still being written)."""
    try:
        with open(meta_path(name), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def _write_atomic(path: str, record: dict) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def claim(name: str) -> bool:
    """Create ``name``'s record exclusively (empty, meaning 'being created'); False if it exists."""
    try:
        fd = os.open(meta_path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def publish(name: str, record: dict) -> None:
    """Fill in the record of a name this process has claimed."""
    _write_atomic(meta_path(name), {"layout": LAYOUT_VERSION, **record})


def remove_meta(name: str, expect: dict | None = None) -> None:
    """Remove ``name``'s record; with ``expect``, only if it is still that record."""
    if expect is not None:
        current = read_meta(name)
        if current is None or current.get("created") != expect.get("created") or current.get(
            "owner_pid"
        ) != expect.get("owner_pid"):
            return
    try:
        os.unlink(meta_path(name))
    except FileNotFoundError:
        pass


def record_is_stale(record: dict | None, path: str) -> bool:
    """A record whose owner is dead and that is not persistent, or an empty one left by a crash."""
    if record is None:
        try:  # empty: a creator died before publishing, or is publishing right now
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return False
        return age > 5.0
    if record.get("persist"):
        return False
    return not pid_alive(record["owner_pid"], record.get("owner_start"))


def list_records() -> list[tuple[str, dict | None]]:
    out = []
    d = runtime_dir()
    try:
        entries = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for entry in entries:
        if entry.startswith(PREFIX) and entry.endswith(".meta"):
            name = entry[len(PREFIX) : -len(".meta")]
            out.append((name, read_meta(name)))
    return out


# --- fork -------------------------------------------------------------------------------

#: Bumped in every forked child: per-process state (connections, lock descriptors,
#: replicas) remembers the generation it was made in and is rebuilt when it differs.
#: Cheaper on hot paths than calling os.getpid(), which is a system call.
fork_generation = 0


def _after_fork_in_child() -> None:
    global fork_generation
    fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


# --- cleanup of what this process owns, at exit -------------------------------------

_cleanups: dict[int, tuple[int, Callable[[], None]]] = {}
_cleanup_lock = threading.Lock()


def at_exit(key: int, fn: Callable[[], None]) -> None:
    """Run ``fn`` at interpreter exit of *this* process (never in a forked child)."""
    with _cleanup_lock:
        _cleanups[key] = (os.getpid(), fn)


def cancel_at_exit(key: int) -> None:
    with _cleanup_lock:
        _cleanups.pop(key, None)


@atexit.register
def _run_cleanups() -> None:
    pid = os.getpid()
    with _cleanup_lock:
        todo = [fn for owner, fn in _cleanups.values() if owner == pid]
        _cleanups.clear()
    for fn in todo:
        try:
            fn()
        except Exception:  # pragma: no cover - best effort at exit
            pass
