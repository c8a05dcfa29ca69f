"""Where named shared objects live, who may use them, and cleanup at exit.

Trust model: a mapping's files are this user's alone. Everything lives in a
per-user directory, ``<base>/shareit-<euid>/`` (mode 0700, like tmux's socket
directory), where ``<base>`` is ``$SHAREIT_RUNTIME_DIR``, else ``/dev/shm``,
else the temp dir. Before use the directory is checked with ``lstat``: a real
directory (not a symlink), owned by the effective uid, no group or other
access; the base must not let others swap it (owned by us or root, and sticky
if others can write to it). Every file in it is opened with ``O_NOFOLLOW``
(and ``O_EXCL`` when created) and ``fstat``-checked the same way. Anything
that fails raises :class:`~shareit.errors.PermissionDeniedError`, naming the
path and its owner: another user's object is never used.

Names and files: a mapping's files are ``NAME@KIND`` (``@meta`` its record,
``@ctl``, ``@gN``, ``@seq``, ``@lock``, ``@sock`` a server's socket); ``@`` never occurs
in a name, so no name's files can equal or prefix another's. Anonymous objects use stems that
start with ``+``, which no name does.

Each named mapping has one record, ``NAME@meta`` (JSON, see
:mod:`shareit._records`), holding its backend, owner pid and start time,
creation time, ``persist`` and what the backend needs to attach (an address,
an auth key) -- never a path. Creating it with ``O_EXCL`` is what makes
"create or attach" race-free.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import NoReturn, TypedDict

from . import _records
from ._records import Proc, Record
from .errors import ConfigError, PermissionDeniedError, RecordError

LAYOUT_VERSION = _records.VERSION
SEP = "@"  # between a stem and a file kind; never in a name
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,119}")
_ANON_RE = re.compile(r"\+anon-[0-9]{1,10}-[0-9a-f]{8,32}")


def base_dir() -> str:
    """``$SHAREIT_RUNTIME_DIR`` (absolute: a relative one is a ConfigError), else the default."""
    d = os.environ.get("SHAREIT_RUNTIME_DIR")
    if d:
        return _absolute_base(d)
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _absolute_base(d: str) -> str:
    if d[0] != "/":
        raise ConfigError(
            f"SHAREIT_RUNTIME_DIR must be an absolute path, not {d!r}: a relative one would "
            f"name another directory after a chdir (and in the servers, which run from /). "
            f"Use e.g. SHAREIT_RUNTIME_DIR={os.path.abspath(d)!r}"
        )
    return d


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _refuse(path: str, why: str) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"refusing to use {path}: {why}. shareit only uses files and directories that "
        f"belong to you (uid {os.geteuid()}) with no group or other access; remove it if it "
        f"is not yours, or set SHAREIT_RUNTIME_DIR to a directory of your own"
    )


def check_private(path: str, st: os.stat_result, kind: str) -> None:
    """Raise unless ``st`` (of ``path``) is a ``kind`` ("dir"/"file") owned by us, 0?00."""
    is_kind = stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)
    if not is_kind:
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular " + kind
        raise _refuse(path, f"it is {what}")
    if st.st_uid != os.geteuid():
        raise _refuse(path, f"it belongs to {_owner_name(st.st_uid)}")
    if st.st_mode & 0o077:
        raise _refuse(path, f"its mode {stat.S_IMODE(st.st_mode):04o} gives group/others access")


def _check_base(base: str) -> None:
    """Raise unless nobody but us (or root) can replace ``base`` or any directory above it.

    Every later use looks paths up by name again, so each component must be one that
    another user cannot rename, swap or re-point: owned by us or root, and writable by
    group or others only when sticky (like /dev/shm and /tmp). A symlink is followed
    only if it, too, is ours or root's; then the same holds for its target's path.
    """
    real = os.path.realpath(base)
    parts = [base] if base != real else []
    head = real
    while True:
        parts.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for p in parts:
        _check_component(base, p, os.lstat(p))


def _check_component(base: str, p: str, st: os.stat_result) -> None:
    """Raise unless ``p`` (``base`` or above it; ``st`` its lstat) is one that only we or
    root can replace what is in: owned by us or root, writable by others only if sticky."""
    me = os.geteuid()
    if st.st_uid not in (0, me):
        raise _refuse(base, f"{p} belongs to {_owner_name(st.st_uid)}, who could replace "
                            f"what is in it")
    if stat.S_ISLNK(st.st_mode):
        return
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise _refuse(base, f"others could replace what is in {p} (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}, not sticky)")


#: (absolute base, euid) whose ancestors :func:`_check_base` passed. Only their owners --
#: this user or root, as checked -- can change the ancestors since; the base itself is
#: checked again at every call (one ``stat``: it may have been made writable by others).
#: (base, euid) -> (st_dev, st_ino) of the base whose ancestors were walked.
_bases_checked: dict[tuple[str, int], tuple[int, int]] = {}


def runtime_dir() -> str:
    """This user's private directory of shared objects, created and verified (see module doc).

    The directory and its base are checked at every call (one ``lstat``, one ``stat``);
    the walk up the base's ancestors once per process and (absolute) base.
    """
    euid = os.geteuid()
    env = os.environ.get("SHAREIT_RUNTIME_DIR")
    st: os.stat_result | None = None
    if env:
        base = _absolute_base(env)
    else:  # base_dir()'s default, with the one stat that also checks it below
        try:
            st = os.stat("/dev/shm")
        except OSError:
            pass
        base = "/dev/shm" if st is not None and stat.S_ISDIR(st.st_mode) else base_dir()
    d = os.path.join(base, f"shareit-{euid}")
    seen = _bases_checked.get((base, euid))
    if seen is not None:
        try:
            st = os.lstat(base)  # the very entry the walk checked, not swapped since
            if (st.st_dev, st.st_ino) == seen:
                _check_component(base, base, os.stat(base) if stat.S_ISLNK(st.st_mode) else st)
                check_private(d, os.lstat(d), "dir")
                return d
            del _bases_checked[(base, euid)]  # replaced since: walked again below
        except FileNotFoundError:
            pass
        except PermissionDeniedError:
            _bases_checked.pop((base, euid), None)
            raise
    if not os.path.lexists(base):
        os.makedirs(base, 0o700, exist_ok=True)
    _check_base(base)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    check_private(d, os.lstat(d), "dir")
    lst = os.lstat(base)
    _bases_checked[(base, euid)] = (lst.st_dev, lst.st_ino)
    return d


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid mapping name {name!r:.80}: use 1-120 characters of letters, digits, "
            f"'_', '.' and '-', not starting with '.' or '-'"
        )
    return name


def anon_stem() -> str:
    """A fresh stem for an anonymous object's files (no name can equal it)."""
    return f"+anon-{os.getpid()}-{secrets.token_hex(6)}"


def check_stem(stem: object) -> str:
    """A stem from a handle: a valid name or an anonymous stem, never a path."""
    if isinstance(stem, str) and (_NAME_RE.fullmatch(stem) or _ANON_RE.fullmatch(stem)):
        return stem
    raise ConfigError(f"invalid shared object stem {stem!r:.80} in a handle")


def path(stem: str, kind: str) -> str:
    """The file of kind ``kind`` (``meta``, ``ctl``, ``g3``, ...) of ``stem``."""
    return os.path.join(runtime_dir(), f"{stem}{SEP}{kind}")


def meta_path(name: str) -> str:
    return path(name, "meta")


def socket_path(stem: str) -> str:
    """Where the server of ``stem`` listens: ``STEM@sock`` in the private runtime dir (so no
    other user can connect, flood or take its address), or, for a name too long for a
    Unix socket address, ``#HASH@sock`` ('#' is in no name: it cannot be another's)."""
    p = path(stem, "sock")
    if len(os.fsencode(p)) <= 100:
        return p
    return path("#" + hashlib.sha256(stem.encode()).hexdigest()[:24], "sock")


# --- files ------------------------------------------------------------------------


def open_private(p: str, flags: int, *, create: bool = False) -> int:
    """``os.open`` a file of ours: never through a symlink, exclusive when creating, and
    verified to be a regular file owned by us with no group/other access."""
    # O_NONBLOCK: opening a FIFO planted in place of a file must not wait for a writer;
    # it is refused by the check below, and the flag is cleared for a regular file.
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(p, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last component is a symlink
            raise _refuse(p, "it is a symlink") from None
        raise
    try:
        check_private(p, os.fstat(fd), "file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


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


def is_own_process(pid: int, start: int | None, cmd_marker: bytes) -> bool:
    """Whether ``pid`` is proven to be this user's process started at ``start`` whose
    command line holds ``cmd_marker``: the only kind of pid from a record we signal."""
    if start is None or proc_start_time(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    uids = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith(b"Uid:")), [])
    me = str(os.geteuid()).encode()
    return bool(uids) and all(u == me for u in uids) and cmd_marker in cmdline.split(b"\0")


class OwnerFields(TypedDict):
    """The fields of a record that say which process created it, and when."""

    owner_pid: int
    owner_start: int | None
    created: float


def owner_fields() -> OwnerFields:
    pid = os.getpid()
    return {"owner_pid": pid, "owner_start": proc_start_time(pid), "created": time.time()}


def _read_raw(name: str) -> bytes | None:
    try:
        fd = open_private(meta_path(name), os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(1 << 20)


def read_meta(name: str) -> Record | None:
    """The validated record of ``name``, or None when there is none (or it is still being
    written). A record that is not valid JSON of the schema raises RecordError."""
    data = _read_raw(name)
    if not data:
        return None
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise RecordError(f"the record {meta_path(name)} is not JSON") from None
    try:
        return _records.validate(obj)
    except RecordError as exc:
        raise RecordError(f"the record {meta_path(name)} is malformed: {exc}") from None


def _no_constant(word: str) -> NoReturn:
    raise ValueError(f"{word} is not JSON")


def read_meta_quiet(name: str) -> Record | None:
    """:func:`read_meta`, with a malformed record treated as no record (for comparisons)."""
    try:
        return read_meta(name)
    except RecordError:
        return None


def _write_atomic(p: str, record: Mapping[str, object]) -> None:
    tmp = f"{p}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        os.unlink(tmp)  # left by a process of ours that was killed mid-write (our own dir)
    except FileNotFoundError:
        pass
    fd = open_private(tmp, os.O_WRONLY, create=True)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, p)


def rewrite(name: str, **fields: object) -> None:
    """Rewrite some fields (users, parents, keeper) of ``name``'s record; the caller holds
    the name's lock."""
    data = _read_raw(name)
    obj = json.loads(data or b"null", parse_constant=_no_constant)
    _records.validate(obj)  # (raises RecordError: never rewrite what we cannot read)
    obj.update(fields)
    _records.validate(obj)
    _write_atomic(meta_path(name), obj)


def claim(name: str) -> bool:
    """Create ``name``'s record exclusively (empty, meaning 'being created'); False if it exists."""
    try:
        fd = open_private(meta_path(name), os.O_WRONLY, create=True)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def publish(name: str, record: Mapping[str, object]) -> None:
    """Fill in the record of a name this process has claimed."""
    _write_atomic(meta_path(name), {"version": LAYOUT_VERSION, **record})


def remove_meta(name: str, expect: Record | None = None) -> None:
    """Remove ``name``'s record; with ``expect``, only if it is still that record."""
    if expect is not None:
        current = read_meta_quiet(name)
        if (current is None or current["created"] != expect["created"]
                or current["owner_pid"] != expect["owner_pid"]):
            return
    p = meta_path(name)
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
    head = os.path.basename(p) + ".tmp-"
    for f in os.listdir(os.path.dirname(p)):  # a rewrite cut short by a killed process
        if f.startswith(head):
            try:
                os.unlink(os.path.join(os.path.dirname(p), f))
            except FileNotFoundError:
                pass


def record_is_stale(record: Record | None, p: str) -> bool:
    """A record whose owner is dead and that is not persistent, or an empty one left by a crash."""
    if record is None:
        try:  # empty: a creator died before publishing, or is publishing right now
            age = time.time() - os.lstat(p).st_mtime
        except FileNotFoundError:
            return False
        return age > 5.0
    return not in_use(record)


def in_transit(record: Record) -> bool:
    """Whether a handle of ``record``'s mapping is on its way to a process not yet a user."""
    return record["transit_n"] > 0 and record["transit"] > time.time()


def in_use(record: Record, exiting: Proc | None = None) -> bool:
    """Persistent, or a user is alive, or a handle is in transit, or the keeper is alive
    (see ``shareit._lifetime``)."""
    if record["persist"] or any(pid_alive(pid, start) for pid, start in record["users"]):
        return True
    if in_transit(record) and record["transit_by"] != exiting:
        return True  # a handle on its way to another process (not from one that is exiting)
    keeper = record["keeper"]  # (the exiting process keeps nothing any more)
    return keeper is not None and keeper != exiting and pid_alive(keeper[0], keeper[1])


def list_names() -> list[str]:
    """Names of every record in this user's runtime dir (sorted)."""
    suffix = SEP + "meta"
    out = []
    for entry in sorted(os.listdir(runtime_dir())):
        if entry.endswith(suffix):
            name = entry[: -len(suffix)]
            if _NAME_RE.fullmatch(name):
                out.append(name)
    return out


def list_records() -> list[tuple[str, Record | RecordError | None]]:
    """(name, record) for every record: None while being created, the RecordError if malformed."""
    out: list[tuple[str, Record | RecordError | None]] = []
    for name in list_names():
        try:
            out.append((name, read_meta(name)))
        except RecordError as exc:
            out.append((name, exc))
        except PermissionDeniedError as exc:
            out.append((name, RecordError(str(exc))))
    return out


def files_of(stem: str) -> list[str]:
    """Every file of ``stem`` in the runtime dir (its record, segments, sockets, locks)."""
    d = runtime_dir()
    head = stem + SEP
    return [os.path.join(d, f) for f in os.listdir(d) if f.startswith(head)]


def foreign_dirs() -> int:
    """How many other users have a shareit runtime dir beside ours (counted, never read)."""
    base, mine = base_dir(), f"shareit-{os.geteuid()}"
    try:
        entries = os.listdir(base)
    except OSError:
        return 0
    return sum(1 for e in entries if e.startswith("shareit-") and e[8:].isdigit() and e != mine)


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
