"""The ``reference`` backend: a dict in one file, every operation under the mapping's lock.

The template for third-party backends. It is the smallest backend that keeps
the whole contract, and it keeps it with the base class's defaults: the
crash-safe file lock, the generic ``incr``, ``transform``, ``edit``,
``snapshot``, ``update`` (``_update_items``), ``clear``, ``pop``, pickling
as a handle and the lifetime of named mappings. CI runs the full conformance
suite on it (``tests/test_reference.py``), so the path a backend author takes
is tested. It is slow (each call reads the whole file) and is registered for
tests only: importing :mod:`shareit.testing` registers it (as the suite's child
processes do), plain ``import shareit`` does not.

Features
--------
- The data is one file in this user's runtime dir, ``STEM@data``: a pickled
  ``dict`` of key -> pickled value, and the mapping's identity (a random
  token), so a handle never reads a later mapping of the same name.
- Every operation, reads included, holds the mapping's lock (the default
  ``flock`` on ``STEM@mutex``; a dead holder's is released by the kernel). A
  write replaces the file with ``os.replace``: a writer killed at any
  instant leaves the old file or the new one, never a torn one. Because reads
  take the lock too, the generic bulk writes (one key at a time, with the
  default lock's undo journal, ``STEM@journal-HEX``: HEX is the identity in
  the lock file, so a handle of a mapping destroyed since never touches a
  later mapping's journal) are seen whole or not at all.
- Any hashable, picklable key; any picklable value, stored by value.
- Attach by name (runtime-dir records), pickle anytime, every start method.

Writing your own
----------------
Copy this module and replace the storage: ``_load``/``_store`` here, and the
five methods. Set ``backend`` and ``capabilities`` truthfully (the suite reads
them to decide what to test). Provide ``_create`` (make the shared object;
publish the record of a named one with ``self._publish()``), ``_attach_record``,
``_handle``/``_from_handle``, and ``_cleanup_record``/``_destroy`` for the files
or server state you add (in ``_destroy``, only while ``self._still_mine()`` says the
name is still this handle's mapping: a late ``destroy()`` through a handle of a
mapping destroyed and created again since must spare the new one). Then make
your reads lock-free, and replace ``snapshot``, ``_update_items`` and ``clear``
with one atomic step each, when you need the speed. Register it through the
``shareit.backends`` entry-point group, and run ``shareit.testing.SharedMappingSuite`` on it.

Configuration
-------------
``shareit.open("hits", backend="reference")`` once registered; no options of
its own.
"""

from __future__ import annotations

import os
import pickle
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

from .. import _codec, _runtime
from ..base import Capabilities, SharedMapping
from ..config import Config
from ..errors import BackendDiedError, NotFoundError

__all__ = ["ReferenceMapping"]

#: The files of one mapping beside its record: the data, the data being written.
_FILES = ("data", "data.tmp")


class ReferenceMapping(SharedMapping):
    """A dict in one file, every operation under the mapping's lock: the template backend."""

    backend = "reference"
    capabilities = Capabilities(
        attach_by_name=True,
        ordered=True,
        notes="reference backend for tests: one file, every call under the lock",
    )

    def __init__(self, name: str | None, config: Config, stem: str, ident: str):
        super().__init__(name, config, stem=stem)
        self._path = _runtime.path(stem, "data")
        self._ident = ident  # which mapping of this stem this handle is on

    # ------------------------------------------------------------ storage

    def _load(self) -> dict[Any, bytes]:
        """The whole mapping (the lock is held): key -> pickled value."""
        try:
            fd = _runtime.open_private(self._path, os.O_RDONLY)
        except FileNotFoundError:
            raise self._died() from None
        with os.fdopen(fd, "rb") as f:
            ident, data = pickle.loads(f.read())  # (our own private file)
        if ident != self._ident:  # destroyed, and the name created again since
            raise self._died()
        out: dict[Any, bytes] = data
        return out

    def _store(self, data: dict[Any, bytes]) -> None:
        """Replace the whole mapping in one step (the lock is held)."""
        blob = pickle.dumps((self._ident, data), _codec.PROTOCOL)  # fails before any change
        _write_replace(self._path, blob)

    def _died(self) -> BackendDiedError:
        return BackendDiedError(
            f"reference mapping {self._label()} was destroyed by another process; open it again"
        )

    # ------------------------------------------------------------ the five

    def __getitem__(self, key: Any) -> Any:
        key = self._check_key(key)
        with self.lock():
            data = self._load()
        try:
            return _codec.loads(data[key])
        except KeyError:
            raise KeyError(key) from None

    def __setitem__(self, key: Any, value: Any) -> None:
        key = self._check_key(key)
        stored = _codec.dumps(self._coerce(value))
        _codec.dumps(key)  # an unpicklable key: TypeError before anything changes
        with self.lock():
            data = self._load()
            data[key] = stored
            self._store(data)

    def __delitem__(self, key: Any) -> None:
        key = self._check_key(key)
        with self.lock():
            data = self._load()
            if key not in data:
                raise KeyError(key)
            del data[key]
            self._store(data)

    def __iter__(self) -> Iterator[Any]:
        with self.lock():
            return iter(list(self._load()))

    def __len__(self) -> int:
        with self.lock():
            return len(self._load())

    # ------------------------------------------------------------ create, attach, handles

    @classmethod
    def _create(cls, name: str | None, config: Config) -> ReferenceMapping:
        stem = name if name is not None else _runtime.anon_stem()
        for kind in _FILES:  # left by a dead owner of the name (_create_lock: the lock's)
            _unlink_quiet(_runtime.path(stem, kind))
        self = cls(name, config, stem, secrets.token_hex(8))
        try:
            self._create_lock()
            self._store({})
            if name is not None:
                self._publish()  # others can attach from now on
        except BaseException:
            self._destroy()  # nothing is left of a failed create
            raise
        return self

    @classmethod
    def _attach_record(cls, name: str, config: Config,
                       record: Mapping[str, Any]) -> ReferenceMapping:
        return cls._attach(name, config, name)  # the path follows from the name, never a record

    @classmethod
    def _attach(cls, name: str | None, config: Config, stem: str) -> ReferenceMapping:
        """A handle on the mapping whose data file is ``STEM@data`` now."""
        try:
            fd = _runtime.open_private(_runtime.path(stem, "data"), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFoundError(f"reference mapping {name or stem!r} no longer exists") from None
        with os.fdopen(fd, "rb") as f:
            ident = pickle.loads(f.read())[0]
        return cls(name, config, stem, ident)

    def _handle(self) -> tuple[str | None, Config, str, str]:
        assert self._stem is not None
        return (self._name, self._config, self._stem, self._ident)

    @classmethod
    def _from_handle(cls, handle: tuple[str | None, Config, str, str]) -> ReferenceMapping:
        name, config, stem, ident = handle
        _runtime.check_stem(stem)  # a stem from a handle is never a path
        return cls(name, config, stem, ident)

    # ------------------------------------------------------------ removal

    @classmethod
    def _cleanup_record(cls, name: str, record: Mapping[str, Any]) -> None:
        for kind in _FILES:
            _unlink_quiet(_runtime.path(name, kind))
        super()._cleanup_record(name, record)  # the default lock's files

    def _destroy(self) -> None:
        if self._data_is_mine() and self._still_mine()[0]:
            for p in (self._path, self._path + ".tmp"):  # (_FILES)
                _unlink_quiet(p)
        super()._destroy()  # the lock's files and the record (if still ours), then _close()

    def _data_is_mine(self) -> bool:
        """Whether ``STEM@data`` is missing, unreadable or this handle's mapping's -- not that
        of a mapping created under this name since (whose files a late destroy() spares)."""
        try:
            fd = _runtime.open_private(self._path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        with os.fdopen(fd, "rb") as f:
            try:
                ident = pickle.loads(f.read())[0]  # (our own private file)
            except Exception:
                return True
        return bool(ident == self._ident)


def _write_replace(path: str, blob: bytes) -> None:
    tmp = path + ".tmp"
    _unlink_quiet(tmp)  # left by a writer killed mid-write (we hold the lock)
    fd = _runtime.open_private(tmp, os.O_WRONLY, create=True)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
