"""The backend contract: what every mapping holds, and the hooks a backend provides.

:class:`MappingBase` is the bottom layer of :class:`~shareit.base.SharedMapping`
(``_ops`` -> ``_views`` -> ``_lifecycle`` -> ``base`` build on it). It declares

- the state every mapping holds (name, frozen config, declared keys and value
  type, owner, closed) -- set in ``__init__``, the only place;
- the **abstract hooks**, which a backend must provide: the five methods of
  ``MutableMapping`` (``__getitem__``, ``__setitem__``, ``__delitem__``,
  ``__iter__``, ``__len__``) and ``_create``, ``_attach_record``,
  ``_handle``, ``_from_handle``;
- the **default hooks**, which a backend may replace: ``_cleanup_record``,
  ``_close``, ``_destroy`` and the lock (``_lock_acquire``/``_lock_release``:
  a crash-safe file lock in the runtime dir, with the undo journal that makes
  the generic bulk writes all-or-nothing when a holder dies);
- the input checks every backend applies the same way (``_check_key``,
  ``_coerce``, :meth:`MappingBase.check_config`) and :meth:`MappingBase.lock`.
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
from abc import abstractmethod
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

from . import _codec, _runtime
from ._locks import FileLock
from ._records import Record
from .config import Config
from .errors import BackendDiedError, ClosedError, ConfigError, RecordError, lock_timeout

__all__ = ["MappingBase", "Capabilities", "MISSING", "STRUCTURAL_OPTIONS", "LockContext"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


#: Sentinel for "no default given".
MISSING: Any = _Missing()

#: Options fixed by a mapping's creator; an attacher gets the creator's values.
STRUCTURAL_OPTIONS = ("value_type", "keys", "capacity", "persist")

_ALL_START_METHODS = frozenset({"fork", "spawn", "forkserver"})


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. Tests and error messages read these, never class names."""

    #: ``shareit.open(name)`` in an unrelated process reaches the same data.
    attach_by_name: bool = True
    #: Processes on other machines can share the mapping.
    cross_machine: bool = False
    #: ``keys=`` must be declared up front.
    fixed_keys: bool = False
    #: ``"any"`` (any picklable value) and/or ``"numeric"`` (declared numeric value_type).
    value_kinds: frozenset[str] = frozenset({"any", "numeric"})
    #: Allowed key types (tuples of them allowed if ``tuple`` is listed); None: any hashable.
    key_types: tuple[type, ...] | None = None
    #: Start methods under which child processes can use an inherited handle.
    start_methods: frozenset[str] = _ALL_START_METHODS
    #: The handle pickles at any time (Pool tasks, queues, other interpreters),
    #: not only while a child process is being started.
    pickle_anytime: bool = True
    #: Iteration follows insertion order, like dict.
    ordered: bool = True
    #: A plain read always sees every write that completed before it, in any process.
    fresh_reads: bool = True
    #: Extra notes for ``shareit.backends()``.
    notes: str = ""


class LockContext:
    """What :meth:`MappingBase.lock` returns: a context manager, also usable by hand."""

    __slots__ = ("_mapping", "_timeout")

    def __init__(self, mapping: MappingBase, timeout: float | None):
        self._mapping, self._timeout = mapping, timeout

    def acquire(self) -> None:
        m = self._mapping
        m._check_open()
        timeout = m._config.timeout if self._timeout is None else self._timeout
        if not m._lock_acquire(timeout):
            raise lock_timeout(f"mapping {m._label()}", timeout)

    def release(self) -> None:
        self._mapping._lock_release()

    def __enter__(self) -> Any:
        self.acquire()
        return self._mapping

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._mapping._lock_exit(exc_type is not None)


class MappingBase(MutableMapping[Any, Any]):
    """State, identity, hooks, input checks and the lock (see the module docstring)."""

    #: The registry name of the backend.
    backend: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: Backend-specific options: name -> (validator, default, description).
    options: ClassVar[dict[str, tuple[Any, Any, str]]] = {}
    #: The backend's own fields in its record: name -> accepted JSON types. Checked
    #: before use; a record's other fields are dropped (records are data, never paths).
    record_fields: ClassVar[dict[str, tuple[type, ...]]] = {}

    def __init__(self, name: str | None, config: Config, *, stem: str | None = None):
        self._name = name
        self._config = config
        #: The stem of this mapping's files in the runtime dir (the name, or an anonymous
        #: stem); only the default lock needs it.
        self._stem = stem if stem is not None else name
        self._closed = False
        self._owner = 0  # the pid of the process that created it, in that process only
        self._joined = False  # counted among the users of its named mapping (see _lifetime)
        self._created = 0.0  # its record's creation time: which mapping of that name it is
        vt = config.value_type
        self._vt = _codec.VALUE_TYPES[vt] if vt else None
        self._declared = frozenset(config.keys) if config.keys else None
        self._filelock: FileLock | None = None
        #: The identity in the default lock's file, as first seen by this handle.
        self._lock_token: bytes | None = None

    # ------------------------------------------------------------ abstract hooks

    @classmethod
    @abstractmethod
    def _create(cls, name: str | None, config: Config) -> Any:
        """Create the shared object and return a handle on it.

        ``name`` is already claimed by the open strategy (or None: anonymous). A
        named mapping publishes its record here (``self._publish(**fields)``) when
        its backend uses runtime-dir records. If it fails, nothing may be left.
        """

    @classmethod
    @abstractmethod
    def _attach_record(cls, name: str, config: Config, record: Mapping[str, Any]) -> Any:
        """Attach to the live object that ``record`` (checked, options merged) describes.

        A backend that cannot attach by name raises here the error that names the
        way that works (its open strategy calls it when the name is taken).
        """

    @abstractmethod
    def _handle(self) -> Any:
        """What a receiving process needs to re-attach: picklable, never the data."""

    @classmethod
    @abstractmethod
    def _from_handle(cls, handle: Any) -> Any:
        """A new handle from what :meth:`_handle` returned, in the receiving process."""

    # ------------------------------------------------------------ default hooks

    @classmethod
    def _cleanup_record(cls, name: str, record: Mapping[str, Any]) -> None:
        """Remove what a named mapping holds beside its record, once no user is left
        (its last user left, or its owner died). Default: the default lock's files (its
        lock file and the journals of every identity, see :func:`_remove_lock_files`)."""
        _remove_lock_files(name)

    def _close(self) -> None:
        """Release this process's resources (connections, mappings, descriptors)."""
        if self._filelock is not None:
            self._filelock.close()

    def _destroy(self) -> None:
        """Remove the shared object for everyone, then :meth:`_close`.

        A named one's files go only while its record is still this handle's mapping
        (or there is none): through a handle of a mapping destroyed and created again
        since, the new one is left alone. (``destroy()`` holds the name's lock.)"""
        mine, record = self._still_mine()
        if mine:
            if self._stem is not None:
                _remove_lock_files(self._stem)  # (journals of every identity)
            if self._name is not None:
                _runtime.remove_meta(self._name, expect=record)
        self._close()

    def _still_mine(self) -> tuple[bool, Record | None]:
        """Whether the files of this handle's name are still its mapping's, and the record
        found: an anonymous stem is its own; a name is, while its record is the one this
        handle joined -- or while it has none (held under the name's lock: then nothing
        else of that name lives, and what is left are leftovers)."""
        if self._name is None:
            return True, None
        record = _runtime.read_meta_quiet(self._name)
        if record is None:
            return True, None
        return record["created"] == self._created, record

    def _lock_path(self) -> str:
        if self._stem is None:
            raise TypeError(
                f"backend {self.backend!r} uses the default lock for an anonymous mapping: pass "
                f"stem=_runtime.anon_stem() to SharedMapping.__init__, or override _lock_acquire"
            )
        return _runtime.path(self._stem, _LOCK_KIND)

    def _lock_stem(self) -> str:
        return self._lock_path().rpartition(_runtime.SEP)[0]

    def _create_lock(self) -> None:
        """Make the default lock's file: a backend that keeps the default lock calls this
        in ``_create``, before the mapping can be reached. A handle never creates it, so
        one used after ``destroy()`` raises BackendDiedError and leaves nothing behind.

        Leftovers of the stem (a lock file, or journals of any identity, of a killed creator
        or writer of an earlier mapping of this name) are removed first; the new lock file
        holds a random identity, which names the undo journal (see :meth:`_journal_path`)."""
        _remove_lock_files(self._lock_stem())
        fd = _runtime.open_private(self._lock_path(), os.O_RDWR, create=True)
        try:
            os.write(fd, secrets.token_bytes(_TOKEN_SIZE))
        finally:
            os.close(fd)

    def _lock_acquire(self, timeout: float) -> bool:
        """Take the mapping's lock (reentrant per thread) within ``timeout`` seconds.

        The default: ``flock`` on ``STEM@mutex`` (made by :meth:`_create_lock`),
        released by the kernel when its holder dies; the first taker after a holder
        died in a generic bulk write rolls that write back (:meth:`_rollback_journal`).
        """
        if self._filelock is None:
            self._filelock = FileLock(self._lock_path(), create=False)
        lock = self._filelock
        outermost = not lock.held()
        try:
            if not lock.acquire(timeout):
                return False
        except FileNotFoundError:
            raise self._lock_gone() from None
        if outermost:
            try:
                self._check_lock_file(lock)
                self._rollback_journal()
            except BaseException:
                lock.release()
                raise
        return True

    def _lock_gone(self) -> BackendDiedError:
        return BackendDiedError(
            f"mapping {self._label()} was destroyed (its lock file is gone or belongs to "
            f"another mapping of that name now); open it again"
        )

    def _check_lock_file(self, lock: FileLock) -> None:
        """With ``lock`` just taken: its descriptor must be the file at its path now, holding
        the identity this handle first saw. Only ``_create_lock`` makes that file, so one
        gone or replaced means this handle's mapping was destroyed (and perhaps the name
        created again): BackendDiedError. (Whatever it says, this handle only ever touches
        the journal of the identity it first saw: see :meth:`_journal_path`.)"""
        fd = lock.fileno()
        st = os.fstat(fd)
        try:
            now = os.lstat(lock.path)
        except FileNotFoundError:
            raise self._lock_gone() from None
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise self._lock_gone()
        token = os.pread(fd, _TOKEN_SIZE, 0)
        if self._lock_token is None:
            self._lock_token = token
        elif token != self._lock_token:  # (cannot differ on the same file; belt and braces)
            raise self._lock_gone()

    def _lock_release(self) -> None:
        if self._filelock is None:
            raise RuntimeError("release of a lock this thread does not hold")
        self._filelock.release()

    # ------------------------------------------------------------ the undo journal


    def _lock_exit(self, by_exception: bool) -> None:
        """Leave a ``with d.lock():`` block (``by_exception``: an exception is leaving it).
        Default: :meth:`_lock_release`. A backend that can find its lock lost overrides
        this so that the exception already leaving the block goes on, not its own."""
        self._lock_release()
    def _journal_path(self) -> str:
        """This handle's mapping's undo journal: ``STEM@journal-HEX``, HEX the hex of the
        identity in its lock file as this handle first saw it (the lock taken once).

        The journal's *name* is bound to the mapping, not only to the name: a writer of a
        mapping destroyed since (and the name created again) can only ever write, replace
        or unlink its own identity's journal, never the new mapping's -- however late it
        resumes after its last lock-file check. HEX is made here from the token's bytes
        (``bytes.hex``): only [0-9a-f], never text read from a file."""
        if self._lock_token is None:
            raise RuntimeError("the undo journal of a handle that never took its lock")
        return _runtime.path(self._lock_stem(), _JOURNAL_KIND + self._lock_token.hex())

    def _write_journal(self, undo: list[tuple[Any, Any]], kind: str = "update") -> None:
        """Before a generic bulk write (lock held): what to restore if this process dies.

        ``undo`` holds (key, old value or MISSING) in write order; ``kind`` is "update"
        (restore those keys) or "clear" (``undo`` is the whole mapping: restore it, in
        order). It goes to this identity's journal (:meth:`_journal_path`), written to a
        temp file and moved in place; it carries the identity too. A holder whose lock
        file was replaced since (its mapping destroyed, the name perhaps created again)
        writes none: BackendDiedError, checked just before the move -- and should it be
        destroyed right after that check, the move can only reach its own identity's
        journal (whose temp file went with the destroy: BackendDiedError too)."""
        path = self._journal_path()
        tmp = path + ".tmp"
        _unlink_quiet(tmp)  # left by a holder killed while writing it
        entries = [(k, v is not MISSING, None if v is MISSING else v) for k, v in undo]
        data = pickle.dumps((self._lock_token, kind, entries), _codec.PROTOCOL)
        fd = _runtime.open_private(tmp, os.O_WRONLY, create=True)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if self._filelock is not None:
                self._check_lock_file(self._filelock)  # (fails early: no journal, no write)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:  # only a destroy of the name removes our temp file
                raise self._lock_gone() from None
        except BaseException:
            _unlink_quiet(tmp)
            raise

    def _end_journal(self) -> None:
        """The bulk write is done (or undone): its journal goes. Only this identity's: a
        handle of a mapping destroyed since never removes the new mapping's journal."""
        _unlink_quiet(self._journal_path())

    def _rollback_journal(self) -> None:
        """Just after taking the default lock: undo a bulk write its dead holder left in the
        journal of this mapping's identity (journals of other identities are never read:
        they go with the name's next destroy or create, :func:`_remove_lock_files`)."""
        path = self._journal_path()
        try:
            fd = _runtime.open_private(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as f:
            blob = f.read()
        try:
            token, kind, entries = pickle.loads(blob)  # (our own private file, written above)
            if not (type(token) is bytes and token == self._lock_token
                    and kind in ("update", "clear") and type(entries) is list
                    and all(type(e) is tuple and len(e) == 3 for e in entries)):
                raise ValueError("not a journal")
        except Exception:
            raise RecordError(
                f"the undo journal {path} of mapping {self._label()} is malformed: it is not "
                f"one shareit wrote; remove it (or destroy the mapping)"
            ) from None
        self._replay_undo(kind, entries)  # idempotent: a rollback cut short reruns
        _unlink_quiet(path)

    def _replay_undo(self, kind: str, entries: list[tuple[Any, bool, Any]]) -> None:
        """Restore what a journal of ``kind`` holds (see :meth:`_write_journal`)."""
        if kind == "clear":  # the whole mapping, in its order: empty it, then refill it
            for key in list(self):
                self.pop(key, None)
            for key, present, value in entries:
                if present:
                    self[key] = value
            return
        for key, present, value in reversed(entries):
            if present:
                self[key] = value
            else:
                self.pop(key, None)

    # ------------------------------------------------------------ identity

    @property
    def name(self) -> str | None:
        """The mapping's name, or None for an anonymous one."""
        return self._name

    @property
    def config(self) -> Config:
        """The resolved, frozen options."""
        return self._config

    @property
    def closed(self) -> bool:
        return self._closed

    def _label(self) -> str:
        return repr(self._name) if self._name else f"<anonymous {self.backend}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(
                f"mapping {self._label()} is closed in this process; "
                + (
                    f"open it again with shareit.open({self._name!r})"
                    if self._name
                    else "an anonymous mapping cannot be reopened after close()"
                )
            )

    # ------------------------------------------------------------ input checks

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Reject a configuration this backend cannot honour (override to add rules)."""
        caps = cls.capabilities
        if caps.fixed_keys and not config.keys:
            raise ConfigError(
                f"backend {cls.backend!r} needs its keys declared up front, e.g. "
                f"shareit.open(name, backend={cls.backend!r}, keys=['ok', 'error'])"
            )
        if config.keys and caps.key_types is not None:
            for k in config.keys:
                cls._check_key_type(k)

    @classmethod
    def _check_key_type(cls, key: Any) -> None:
        allowed = cls.capabilities.key_types
        if allowed is None:
            return
        if isinstance(key, tuple) and tuple in allowed:
            for part in key:
                cls._check_key_type(part)
            return
        if type(key) not in allowed:
            names = ", ".join(t.__name__ for t in allowed if t is not tuple)
            tail = " and tuples of these" if tuple in allowed else ""
            raise TypeError(
                f"backend {cls.backend!r} takes keys of type {names}{tail}; "
                f"got {type(key).__name__} {key!r:.60}"
            )

    def _check_key(self, key: Any) -> Any:
        """Validate ``key`` (hashable, allowed type, declared) and return it."""
        try:
            hash(key)
        except TypeError:
            raise unhashable(key) from None
        if self.capabilities.key_types is not None:
            self._check_key_type(key)
        if self._declared is not None and key not in self._declared:
            raise self._undeclared(key)
        return key

    def _undeclared(self, key: Any) -> KeyError:
        return KeyError(
            f"{key!r} is not one of the declared keys of mapping {self._label()}: "
            f"{sorted(self._declared or (), key=repr)}"
        )

    def _coerce(self, value: Any) -> Any:
        """Apply the declared ``value_type`` (TypeError/ValueError when it does not fit)."""
        return value if self._vt is None else self._vt.coerce(value)

    # ------------------------------------------------------------ the lock

    def lock(self, timeout: float | None = None) -> LockContext:
        """One critical section across all processes: ``with d.lock(): ...``.

        Reentrant within a thread. While a process holds it, writes by every
        other process (``d[k] = v``, ``incr``, ``update``, ...) wait; plain
        reads do not on the built-in backends (a backend that keeps the generic
        bulk writes makes its reads take it too). If the holder dies, the lock
        is released. Raises :class:`~shareit.LockTimeoutError` after
        ``timeout`` seconds (default: the ``timeout`` option).
        """
        return LockContext(self, timeout)


#: The default lock's file: ``STEM@mutex``, holding the mapping's random identity.
_LOCK_KIND = "mutex"
#: Bytes of random identity in a default lock's file.
_TOKEN_SIZE = 16
#: Its undo journals: ``STEM@journal-HEX`` (and ``.tmp`` while written), HEX the identity.
_JOURNAL_KIND = "journal-"
_JOURNAL_RE = re.compile(r"journal-(?:[0-9a-f]{2})*(?:\.tmp)?")


def _remove_lock_files(stem: str) -> None:
    """Remove the default lock's files of ``stem``: its lock file and the undo journals of
    every identity, with their temp files (a killed writer's, a stale writer's).

    Only names of exactly that form, in our private runtime dir (checked by
    ``runtime_dir``; no one else can add to it); ``unlink`` never follows a symlink and
    reads nothing, and no part of a name found here is used but to remove that entry."""
    _unlink_quiet(_runtime.path(stem, _LOCK_KIND))
    d = _runtime.runtime_dir()
    head = stem + _runtime.SEP  # (SEP is in no stem: only this stem's files start so)
    for entry in os.listdir(d):
        if entry.startswith(head) and _JOURNAL_RE.fullmatch(entry, len(head)):
            _unlink_quiet(os.path.join(d, entry))


def unhashable(key: Any) -> TypeError:
    """The error for an unhashable key, as a dict words it."""
    return TypeError(f"unhashable key type: {type(key).__name__!r}")


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
