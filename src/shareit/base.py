"""``SharedMapping``: the abstract base every backend subclasses.

Only the five methods ``MutableMapping`` needs are abstract. Everything a user
sees beyond them -- ``==``, ``|``, ``|=``, ``reversed``, ``copy()``, ``repr``,
``incr``, ``transform``, ``edit``, ``lock``, ``snapshot``, ``close``,
``destroy``, context-manager use and pickling as a handle -- is written once
here on top of them and of :meth:`lock`. A backend overrides one only to make
it atomic natively or faster (one server round trip instead of several).
"""

from __future__ import annotations

import atexit
import copy as _copy
import operator
import os
import threading
import weakref
from collections.abc import (
    Callable,
    ItemsView,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    ValuesView,
)
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from . import _codec, _lifetime, _records, _runtime
from ._locks import FileLock
from .config import Config
from .errors import (
    ClosedError,
    ConfigError,
    LockTimeoutError,
    NotFoundError,
    RecordError,
)

__all__ = ["SharedMapping", "Capabilities", "MISSING", "STRUCTURAL_OPTIONS"]

_first = operator.itemgetter(0)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self):
        return "MISSING"


#: Sentinel for "no default given".
MISSING: Any = _Missing()

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
    value_kinds: frozenset = frozenset({"any", "numeric"})
    #: Allowed key types (tuples of them allowed if ``tuple`` is listed); None: any hashable.
    key_types: tuple | None = None
    #: Start methods under which child processes can use an inherited handle.
    start_methods: frozenset = _ALL_START_METHODS
    #: The handle pickles at any time (Pool tasks, queues, other interpreters),
    #: not only while a child process is being started.
    pickle_anytime: bool = True
    #: Iteration follows insertion order, like dict.
    ordered: bool = True
    #: A plain read always sees every write that completed before it, in any process.
    fresh_reads: bool = True
    #: Extra notes for ``shareit.backends()``.
    notes: str = ""


class _LockContext:
    __slots__ = ("_mapping", "_timeout")

    def __init__(self, mapping: SharedMapping, timeout: float | None):
        self._mapping, self._timeout = mapping, timeout

    def acquire(self) -> None:
        m = self._mapping
        m._check_open()
        timeout = m._config.timeout if self._timeout is None else self._timeout
        if not m._lock_acquire(timeout):
            raise LockTimeoutError(
                f"could not lock mapping {m._label()} within {timeout:g} s: another process "
                f"holds it. Pass a larger timeout (lock(timeout=...) or the 'timeout' option)"
            )

    def release(self) -> None:
        self._mapping._lock_release()

    def __enter__(self) -> SharedMapping:
        self.acquire()
        return self._mapping

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _KeysView(KeysView):
    """``keys()``; for backends with costly reads, one snapshot feeds the reads that follow.

    ``dict(d)`` and ``{**d}`` call ``keys()`` and then ``d[k]`` for each key in
    order (CPython's generic merge). For a backend that sets ``_prefetch_reads``
    the snapshot taken here serves exactly that sequence of reads (see
    ``SharedMapping._take_prefetched``), so the copy costs one round trip and
    is consistent.
    """

    def __iter__(self):
        m = self._mapping
        if not m._prefetch_reads:
            return iter(m)
        snap = m.snapshot()
        m._prefetch_local().pending = iter(snap.items())
        return iter(list(snap))


class _SnapshotItemsView(ItemsView):
    """``items()`` that costs one ``snapshot()``, not one read per key."""

    def __iter__(self):
        return iter(self._mapping.snapshot().items())


class _SnapshotValuesView(ValuesView):
    def __iter__(self):
        return iter(self._mapping.snapshot().values())


class SharedMapping(MutableMapping):
    """A dict-like mapping shared by several processes.

    Create or attach with :func:`shareit.open`. Values are stored by value:
    reading returns a copy, so change nested values with :meth:`edit` or
    :meth:`transform`. ``incr``, ``transform``, ``edit`` and ``lock`` are
    atomic across all processes; ``update``, ``clear`` and ``snapshot`` are
    each one atomic step.
    """

    #: The registry name of the backend.
    backend: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: Backend-specific options: name -> (validator, default, description).
    options: ClassVar[dict] = {}
    #: Reads cost a round trip: ``dict(d)`` then reads one snapshot (see ``_KeysView``).
    _prefetch_reads: ClassVar[bool] = False
    #: The backend's own fields in its record: name -> accepted JSON types. Checked
    #: before use; a record's other fields are dropped (records are data, never paths).
    record_fields: ClassVar[dict[str, tuple]] = {}

    def __init__(self, name: str | None, config: Config):
        self._name = name
        self._config = config
        self._closed = False
        self._owner = 0  # the pid of the process that created it, in that process only
        self._joined = False  # counted among the users of its named mapping (see _lifetime)
        self._created = 0.0  # its record's creation time: which mapping of that name it is
        vt = config.value_type
        self._vt = _codec.VALUE_TYPES[vt] if vt else None
        self._declared = frozenset(config.keys) if config.keys else None
        self._filelock: FileLock | None = None

    # ---------------------------------------------------------------- construction

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
    def _create(cls, name: str | None, config: Config) -> SharedMapping:
        """Create the shared object (``name`` already claimed, or None for anonymous)."""
        raise NotImplementedError

    @classmethod
    def _attach_record(cls, name: str, config: Config, record: dict) -> SharedMapping:
        """Attach to the live object that ``record`` (from the runtime dir) describes."""
        raise NotImplementedError(f"backend {cls.backend!r} cannot attach by name")

    @classmethod
    def _cleanup_record(cls, name: str, record: dict) -> None:
        """Remove what a dead owner left behind (segments, sockets). Default: nothing."""

    @classmethod
    def _open(cls, name: str | None, config: Config, create: bool = True) -> SharedMapping:
        if name is None:
            if not create:
                raise ConfigError("create=False needs a name: an anonymous mapping can only be created")
            obj = cls._create(None, config)
            obj._become_owner()
            return obj
        if not cls.capabilities.attach_by_name:
            obj = cls._create(name, config)
            obj._become_owner()
            return obj
        return cls._open_named(name, config, create)

    @classmethod
    def _open_named(cls, name: str, config: Config, create: bool) -> SharedMapping:
        """Attach to the live mapping of ``name``, or create it (see :mod:`shareit._lifetime`).

        Under the name's lock: a record with a live user (or ``persist``) is attached
        to and this process joins its users; a record whose users are all dead is
        cleaned up and the name taken over; so concurrent openers end with one mapping.
        """
        _lifetime.leave_pending(_remove_for)
        path = _runtime.meta_path(name)
        with _lifetime.name_lock(name, config.timeout):
            try:
                record = _runtime.read_meta(name)
            except RecordError as exc:
                raise RecordError(f"{exc}; remove it with `shareit gc`") from None
            if record is not None and not _runtime.record_is_stale(record, path):
                obj = cls._attach_checked(name, config, record)
                created = record["created"]
                try:
                    if not _lifetime.is_user(name, created):
                        _lifetime.add_me(name, record)
                except BaseException:
                    obj._close()
                    raise
                obj._joined_as(created, registered=True)
                return obj
            if record is not None:  # every user is gone: nobody can reach it any more
                _backend_class(record["backend"], cls)._cleanup_record(name, record)
                _runtime.remove_meta(name)
            elif os.path.lexists(path):  # empty: a creator died before publishing (we hold the lock)
                _runtime.remove_meta(name)
            if not create:
                raise NotFoundError(
                    f"no shared mapping named {name!r} exists; create it with "
                    f"shareit.open({name!r}) (create=True, the default)"
                )
            obj = cls._create(name, config)  # publishes the record, this process its user
            obj._owner = os.getpid()
            obj._joined_as(obj._created, registered=True)
            return obj

    def _joined_as(self, created: float, registered: bool = False,
                   received: bool = False) -> None:
        """This handle counts this process among the users of its (named) mapping, until
        it is closed -- or dropped unclosed (a Pool worker's task handle, say)."""
        _lifetime.join(self._name, created, self._config.timeout, registered=registered,
                       received=received)
        self._created, self._joined = created, True
        self._unjoin = weakref.finalize(self, _lifetime.dropped, self._name, created)

    @classmethod
    def _attach_checked(cls, name: str, config: Config, record: dict) -> SharedMapping:
        if record.get("backend") != cls.backend:
            raise ConfigError(
                f"mapping {name!r} exists with backend {record.get('backend')!r}, not "
                f"{cls.backend!r}; open it with backend={record.get('backend')!r} or pick another name"
            )
        fields = _records.backend_fields(record, cls.record_fields)
        stored = record["options"]
        changes = {}
        for key, value in stored.items():
            if config.sources.get(key, "default") != "default" and config[key] != value:
                raise ConfigError(
                    f"mapping {name!r} exists with {key}={value!r}, but {key}={config[key]!r} "
                    f"was asked for ({config.sources[key]}); its creator's {key} applies"
                )
            changes[key] = value
        merged = Config({**config.as_dict(), **changes}, config.sources)
        return cls._attach_record(name, merged, {**record, **fields})

    def _publish(self, **backend_fields: Any) -> None:
        """Write this (owned, named) mapping's record so others can attach by name."""
        structural = {k: self._config[k] for k in STRUCTURAL_OPTIONS}
        owner = _runtime.owner_fields()
        _runtime.publish(
            self._name,
            {
                "backend": self.backend,
                "persist": self._config.persist,
                **owner,
                "options": _records.options_to_json(structural),
                "users": [_lifetime.me()],
                "parents": _lifetime.my_parents(),
                **backend_fields,
            },
        )
        self._created = owner["created"]

    def _become_owner(self) -> None:
        self._owner = os.getpid()
        if not self._config.persist:
            _runtime.at_exit(id(self), self._destroy_at_exit)

    def _destroy_at_exit(self) -> None:
        if not self._closed:
            try:
                self._destroy()
            finally:
                self._closed = True

    # ----------------------------------------------------------------- pickling

    def _handle(self) -> Any:
        """What a receiving process needs to re-attach (picklable); backends override."""
        raise TypeError(f"a {self.backend!r} mapping cannot be pickled")

    @classmethod
    def _from_handle(cls, handle: Any) -> SharedMapping:
        raise NotImplementedError

    def __reduce__(self):
        self._check_open()
        joined = self._name if self._joined else None
        if joined is not None:  # the receiver is no user yet: keep it alive until it is
            _lifetime.in_transit(joined, self._created, self._config.timeout)
        return (_attach_handle, (type(self), self._handle(), joined, self._created))

    def __copy__(self):
        raise TypeError("use d.copy() for a detached dict, or pickle d to share the handle")

    # ----------------------------------------------------------------- identity

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

    # ----------------------------------------------------------------- validation

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
            raise TypeError(f"unhashable key type: {type(key).__name__!r}") from None
        if self.capabilities.key_types is not None:
            self._check_key_type(key)
        if self._declared is not None and key not in self._declared:
            raise KeyError(
                f"{key!r} is not one of the declared keys of mapping {self._label()}: "
                f"{sorted(self._declared, key=repr)}"
            )
        return key

    def _coerce(self, value: Any) -> Any:
        """Apply the declared ``value_type`` (TypeError/ValueError when it does not fit)."""
        return value if self._vt is None else self._vt.coerce(value)

    def _validated_items(self, other: Any, kwargs: Mapping) -> list[tuple[Any, Any]]:
        if isinstance(other, SharedMapping):
            pairs = list(other.snapshot().items())
        elif isinstance(other, Mapping):
            pairs = list(other.items())
        elif hasattr(other, "keys"):
            pairs = [(k, other[k]) for k in other.keys()]
        else:
            pairs = []
            for i, item in enumerate(other):
                try:  # dict's errors: TypeError if not a sequence, ValueError if not a pair
                    seq = tuple(item)
                except TypeError:
                    raise TypeError(
                        f"cannot convert update() element #{i} to a sequence: {item!r:.60}"
                    ) from None
                if len(seq) != 2:
                    raise ValueError(
                        f"update() element #{i} has length {len(seq)}; 2 is required"
                    )
                pairs.append(seq)
        pairs.extend(kwargs.items())
        keys_ok = False  # whether every key is known valid without a per-key check
        if self._declared is None:
            allowed = self.capabilities.key_types
            if allowed is None:
                keys_ok = isinstance(other, Mapping)  # its keys hash (pairs may not)
            else:
                kinds = set(map(type, map(_first, pairs)))  # (each allowed type but tuple hashes)
                keys_ok = tuple not in kinds and kinds.issubset(allowed)
        if not keys_ok:
            return [(self._check_key(k), self._coerce(v)) for k, v in pairs]
        if self._vt is None:
            return pairs
        coerce = self._vt.coerce
        return [(k, coerce(v)) for k, v in pairs]

    # ----------------------------------------------------------------- dict(d) in one round trip

    def _prefetch_local(self) -> threading.local:
        local = self.__dict__.get("_prefetch_tls")
        if local is None:
            local = self._prefetch_tls = threading.local()
        return local

    def _take_prefetched(self, key: Any) -> Any:
        """The value ``keys()`` fetched for ``key``, if it is the next read of that
        sequence in this thread; else :data:`MISSING` (and the sequence is over)."""
        local = self.__dict__.get("_prefetch_tls")
        pending = getattr(local, "pending", None)
        if pending is None:
            return MISSING
        local.pending = None
        k, v = next(pending, (MISSING, None))
        if k is key or k == key:
            local.pending = pending
            return v
        return MISSING

    def _end_prefetch(self) -> None:
        """Any other call ends a ``dict(d)`` read sequence: no later read sees the old snapshot."""
        local = self.__dict__.get("_prefetch_tls")
        if local is not None:
            local.pending = None

    # ----------------------------------------------------------------- locking

    def lock(self, timeout: float | None = None) -> _LockContext:
        """One critical section across all processes: ``with d.lock(): ...``.

        Reentrant within a thread. While a process holds it, writes by every
        other process (``d[k] = v``, ``incr``, ``update``, ...) wait; plain
        reads do not. If the holder dies, the lock is released. Raises
        :class:`LockTimeoutError` after ``timeout`` seconds (default: the
        ``timeout`` option).
        """
        return _LockContext(self, timeout)

    def _lock_path(self) -> str:
        if self._name is None:
            raise NotImplementedError(f"backend {self.backend!r} must implement locking")
        return _runtime.path(self._name, "lock")

    def _lock_acquire(self, timeout: float) -> bool:
        if self._filelock is None:
            self._filelock = FileLock(self._lock_path())
        return self._filelock.acquire(timeout)

    def _lock_release(self) -> None:
        assert self._filelock is not None
        self._filelock.release()

    # ----------------------------------------------------------------- atomic operations

    def incr(self, key: Any, delta: Any = 1, default: Any = 0) -> Any:
        """Atomically add ``delta`` to ``d[key]`` (``default`` if absent); return the new value."""
        key = self._check_key(key)
        _check_number("delta", delta)
        with self.lock():
            current = self.get(key, MISSING)
            new = self._coerce(_add(key, default if current is MISSING else current, delta))
            self[key] = new
        return new

    def transform(self, key: Any, fn: Callable[[Any], Any], default: Any = MISSING) -> Any:
        """Atomically replace ``d[key]`` by ``fn(d[key])`` and return the new value.

        ``fn`` gets ``default`` when the key is absent (``KeyError`` if no default).
        If ``fn`` raises, nothing changes. ``fn`` runs in the calling process
        while the mapping's lock is held: keep it short.
        """
        key = self._check_key(key)
        with self.lock():
            current = self._current(key, default)
            new = self._coerce(fn(current))
            self[key] = new
        return new

    @contextmanager
    def edit(self, key: Any, default: Any = MISSING) -> Iterator[Any]:
        """Edit a nested value in place and write it back atomically on exit.

        ``with d.edit("cfg", default={}) as cfg: cfg["x"] = 1``. The lock is
        held for the whole block; if the block raises, nothing is written.
        """
        key = self._check_key(key)
        with self.lock():
            value = self._current(key, default)
            yield value
            self[key] = value

    def _current(self, key: Any, default: Any) -> Any:
        try:
            return self[key]
        except KeyError:
            if default is MISSING:
                raise
            return _copy.deepcopy(default)

    # ----------------------------------------------------------------- bulk operations

    def snapshot(self) -> dict:
        """One consistent, detached plain-``dict`` copy of the whole mapping."""
        self._check_open()
        with self.lock():
            return {k: self[k] for k in list(self)}

    def copy(self) -> dict:
        """A detached plain ``dict`` (the same as :meth:`snapshot`)."""
        return self.snapshot()

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Set many keys in one atomic step; if any key or value is invalid, nothing changes."""
        self._check_open()
        self._update_items(self._validated_items(other, kwargs))

    def _update_items(self, items: list[tuple[Any, Any]]) -> None:
        """Store already validated pairs all-or-nothing. Backends override with one round trip."""
        with self.lock():
            undo = [(k, self.get(k, MISSING)) for k, _ in items]
            try:
                for k, v in items:
                    self[k] = v
            except BaseException:
                for k, old in reversed(undo):
                    if old is MISSING:
                        self.pop(k, None)
                    else:
                        self[k] = old
                raise

    def clear(self) -> None:
        """Remove every key in one atomic step."""
        with self.lock():
            for k in list(self):
                del self[k]

    def pop(self, key: Any, default: Any = MISSING) -> Any:
        with self.lock():
            try:
                value = self[key]
            except KeyError:
                if default is MISSING:
                    raise
                return default
            del self[key]
            return value

    def popitem(self) -> tuple[Any, Any]:
        with self.lock():
            keys = list(self)
            if not keys:
                raise KeyError("popitem(): mapping is empty")
            key = keys[-1]
            return key, self.pop(key)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        with self.lock():
            try:
                return self[key]
            except KeyError:
                self[key] = default
                return self._coerce(default)

    # ----------------------------------------------------------------- dict behaviour

    def keys(self) -> KeysView:
        return _KeysView(self)

    def items(self) -> ItemsView:
        return _SnapshotItemsView(self)

    def values(self) -> ValuesView:
        return _SnapshotValuesView(self)

    def __contains__(self, key: Any) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, SharedMapping):
            return self.snapshot() == other.snapshot()
        if isinstance(other, Mapping):
            return self.snapshot() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Any) -> dict:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.snapshot() | _as_dict(other)

    def __ror__(self, other: Any) -> dict:
        if not isinstance(other, Mapping):
            return NotImplemented
        return _as_dict(other) | self.snapshot()

    def __ior__(self, other: Any) -> SharedMapping:
        self.update(other)
        return self

    def __reversed__(self) -> Iterator[Any]:
        return reversed(list(self))

    def __repr__(self) -> str:
        head = f"{type(self).__name__}(backend={self.backend!r}, name={self._name!r}"
        if self._closed:
            return head + ", closed)"
        try:
            snap = self.snapshot()
        except Exception as exc:  # repr must never raise
            return head + f", <unreadable: {type(exc).__name__}>)"
        preview = ", ".join(f"{k!r}: {v!r:.40}" for k, v in list(snap.items())[:8])
        more = f", ... ({len(snap)} keys)" if len(snap) > 8 else ""
        return head + f", {{{preview}{more}}})"

    # ----------------------------------------------------------------- lifetime

    def close(self) -> None:
        """This process lets go of the mapping.

        A named local mapping is removed when its last user lets go (see "Lifetime"
        in the README), unless ``persist=True``; an anonymous one when its creator
        closes it. A forked child's ``close()`` only detaches the child.
        """
        if self._closed:
            return
        _runtime.cancel_at_exit(id(self))
        if not self._joined and self._owner == os.getpid() and not self._config.persist:
            self.destroy()  # anonymous, or a backend that cannot attach by name
            return
        try:
            if self._joined:
                self._joined = False
                self._unjoin.detach()
                _lifetime.leave(self._name, self._created, self._config.timeout,
                                lambda record: _remove_for(self._name, record))
            _lifetime.leave_pending(_remove_for)
        finally:
            self._closed = True
            self._close()

    def destroy(self) -> None:
        """Remove the shared object for every process; this handle is closed."""
        self._check_open()
        _runtime.cancel_at_exit(id(self))
        try:
            if self._joined:
                self._joined = False
                self._unjoin.detach()
                _lifetime.forget(self._name, self._created)
                with _lifetime.name_lock(self._name, self._config.timeout) as lock:
                    self._destroy()
                    lock["remove"] = True
            else:
                self._destroy()
        finally:
            self._closed = True

    def _close(self) -> None:
        """Release this process's resources (connections, mappings). Override."""
        if self._filelock is not None:
            self._filelock.close()

    def _destroy(self) -> None:
        """Remove the shared object for everyone, then :meth:`_close`. Override."""
        if self._name is not None:
            _runtime.remove_meta(self._name)
        self._close()

    def __enter__(self) -> SharedMapping:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


#: Options fixed by a mapping's creator; an attacher gets the creator's values.
STRUCTURAL_OPTIONS = ("value_type", "keys", "capacity", "persist")


def _attach_handle(cls: type, handle: Any, name: str | None, created: float) -> SharedMapping:
    """Unpickle a handle: attach, and count this process among the mapping's users."""
    obj = cls._from_handle(handle)
    if name is not None:
        try:
            obj._joined_as(created, received=True)
        except BaseException:
            obj._closed = True
            obj._close()
            raise
    return obj


def _remove_for(name: str, record: dict) -> None:
    """Remove what the mapping of ``record`` holds (its last user is leaving)."""
    _backend_class(record["backend"], SharedMapping)._cleanup_record(name, record)


def _leave_all_at_exit() -> None:
    _lifetime.leave_pending(_remove_for)
    _lifetime.leave_all_at_exit(_remove_for)


atexit.register(_leave_all_at_exit)
_lifetime.at_exit_fn = _leave_all_at_exit


def _backend_class(backend: str, fallback: type) -> Any:
    """The class that made a record (its cleanup knows what it left), else ``fallback``."""
    from . import registry

    try:
        return registry.load(backend)
    except Exception:
        return fallback


def _as_dict(m: Mapping) -> dict:
    return m.snapshot() if isinstance(m, SharedMapping) else dict(m.items())


def _check_number(what: str, x: Any) -> None:
    if isinstance(x, bool) or not hasattr(x, "__add__") or isinstance(x, (str, bytes, list, tuple)):
        raise TypeError(f"incr() {what} must be a number, got {type(x).__name__} {x!r:.40}")


def _add(key: Any, current: Any, delta: Any) -> Any:
    """``current + delta`` for incr, with a message that names the key when it is not a number."""
    if isinstance(current, (bool, str, bytes, list, tuple, dict)) or current is None:
        raise TypeError(
            f"incr() needs a number at key {key!r:.60}, found {type(current).__name__}; "
            f"use transform() for other kinds of value"
        )
    try:
        return current + delta
    except TypeError:
        raise TypeError(
            f"incr() cannot add {type(delta).__name__} to the {type(current).__name__} at "
            f"key {key!r:.60}; use transform() for other kinds of value"
        ) from None

