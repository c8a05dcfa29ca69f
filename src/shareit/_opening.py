"""Open strategies: how ``shareit.open`` creates a mapping or reaches an existing one.

A backend names its strategy in ``SharedMapping.opener``; no backend overrides
``_open``. Every strategy creates an anonymous mapping the same way
(``_create(None, config)``, and the creator owns it). For a name:

- :class:`RuntimeRecords` (the default; shm, manager, queue, the reference
  backend): the name's record in this user's runtime dir, under the name's
  lock. A record with a live user is attached to (``_attach_record``) and this
  process joins its users; one whose users are all dead is cleaned up and the
  name taken over; else the mapping is created (``_create``, which publishes
  the record). So any number of concurrent openers end with one mapping.
- :class:`InheritOnly` (value): the name is reserved by a record while its
  creator lives, but never attached to: the backend's ``_attach_record`` says
  why and what works instead.
- A backend whose records live elsewhere brings its own (redis keeps its
  record in the server: ``RedisMeta`` in :mod:`shareit.backends.redis`).

:func:`attach_checked` is the one check of a found record against the
caller's configuration, for every strategy.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from . import _lifetime, _records, _runtime
from ._lifecycle import backend_class, remove_for
from .config import Config
from .errors import ConfigError, NotFoundError, RecordError

if TYPE_CHECKING:  # pragma: no cover
    from .base import SharedMapping

__all__ = ["Opener", "RuntimeRecords", "InheritOnly", "attach_checked"]


class Opener(ABC):
    """An open strategy (see the module docstring)."""

    #: ``open(name)`` in another process reaches the same mapping; must equal the
    #: backend's ``capabilities.attach_by_name`` (:func:`shareit.base.check_backend`).
    attaches: ClassVar[bool] = True

    def open(self, cls: type[SharedMapping], name: str | None, config: Config,
             create: bool) -> SharedMapping:
        if name is None:
            if not create:
                raise ConfigError(
                    "create=False needs a name: an anonymous mapping can only be created"
                )
            obj: SharedMapping = cls._create(None, config)
            obj._become_owner()
            return obj
        return self.open_named(cls, name, config, create)

    @abstractmethod
    def open_named(self, cls: type[SharedMapping], name: str, config: Config,
                   create: bool) -> SharedMapping:
        """Attach to the live mapping of ``name``, or create it when ``create``."""


class RuntimeRecords(Opener):
    """Named mappings through their records in this user's runtime dir."""

    def open_named(self, cls: type[SharedMapping], name: str, config: Config,
                   create: bool) -> SharedMapping:
        _lifetime.leave_pending(remove_for)
        path = _runtime.meta_path(name)
        with _lifetime.name_lock(name, config.timeout):
            try:
                record = _runtime.read_meta(name)
            except RecordError as exc:
                raise RecordError(f"{exc}; remove it with `shareit gc`") from None
            if record is not None and not _runtime.record_is_stale(record, path):
                obj = attach_checked(cls, name, config, record)
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
                (backend_class(record["backend"]) or cls)._cleanup_record(name, record)
                _runtime.remove_meta(name)
            elif os.path.lexists(path):  # empty: its creator died before publishing it
                _runtime.remove_meta(name)
            if not create:
                raise NotFoundError(
                    f"no shared mapping named {name!r} exists; create it with "
                    f"shareit.open({name!r}) (create=True, the default)"
                )
            obj = cls._create(name, config)  # publishes the record, this process its user
            assert isinstance(obj, cls)
            obj._owner = os.getpid()
            obj._joined_as(obj._created, registered=True)
            return obj


class InheritOnly(Opener):
    """A name reserved by its creator's record, never attached to: shared by inheritance."""

    attaches = False

    def open_named(self, cls: type[SharedMapping], name: str, config: Config,
                   create: bool) -> SharedMapping:
        if not create:
            raise ConfigError(
                f"the {cls.backend} backend cannot attach by name (create=False): share a "
                f"{cls.backend} mapping by inheritance -- fork, Process(args=(d,)) or "
                f"Pool(initializer=f, initargs=(d,))"
            )
        record = _runtime.read_meta(name)
        if record is not None and not _runtime.record_is_stale(record, _runtime.meta_path(name)):
            return attach_checked(cls, name, config, record)  # the backend says why not
        _runtime.remove_meta(name, expect=record)
        if not _runtime.claim(name):
            raise ConfigError(
                f"another process is creating a mapping named {name!r} right now; "
                f"{cls.backend} mappings cannot be attached by name: pick another name"
            )
        try:
            obj = cls._create(name, config)
        except BaseException:
            _runtime.remove_meta(name)
            raise
        assert isinstance(obj, cls)
        obj._become_owner()
        return obj


def attach_checked(cls: type[SharedMapping], name: str, config: Config,
                   record: Mapping[str, Any]) -> SharedMapping:
    """``cls._attach_record`` for a found record: same backend, no conflicting option.

    The creator's structural options apply; one the caller set explicitly to
    another value is a ConfigError. The record's backend fields are checked
    against ``cls.record_fields`` and only those are passed on.
    """
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
    obj: SharedMapping = cls._attach_record(name, merged, {**record, **fields})
    return obj


#: The default strategy's one instance (strategies hold no state).
RUNTIME_RECORDS = RuntimeRecords()
INHERIT_ONLY = InheritOnly()
