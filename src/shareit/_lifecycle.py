"""A handle's life: publishing a record, joining the users, pickling, close and destroy.

Who may keep a named mapping alive, and when it goes, is :mod:`shareit._lifetime`'s
rule; how a handle is first obtained is the open strategy's
(:mod:`shareit._opening`). This layer connects a handle to both: it counts its
process among the users of its named mapping while it is open (also when it is
dropped unclosed), pickles as a handle (``_handle``/``_from_handle``), and
runs ``close()``/``destroy()`` through the backend's ``_close``/``_destroy``.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Mapping
from multiprocessing.context import get_spawning_popen
from typing import Any

from . import _lifetime, _records, _runtime
from ._contract import STRUCTURAL_OPTIONS, MappingBase
from ._views import DictBehaviour
from .errors import ConfigError

__all__ = ["Lifecycle", "attach_handle", "remove_for", "backend_class"]


class Lifecycle(DictBehaviour):
    """Records, users, pickling, ``close``, ``destroy`` and ``with`` use."""

    def _joined_as(self, created: float, registered: bool = False,
                   received: bool = False) -> None:
        """This handle counts this process among the users of its (named) mapping, until
        it is closed -- or dropped unclosed (a Pool worker's task handle, say)."""
        name = self._named()
        _lifetime.join(name, created, self._config.timeout, registered=registered,
                       received=received)
        self._created, self._joined = created, True
        self._unjoin = weakref.finalize(self, _lifetime.dropped, name, created)

    def _named(self) -> str:
        if self._name is None:
            raise TypeError("an anonymous mapping has no record and no users")
        return self._name

    def _publish(self, **backend_fields: Any) -> None:
        """Write this (owned, named) mapping's record so others can attach by name."""
        structural = {k: self._config[k] for k in STRUCTURAL_OPTIONS}
        owner = _runtime.owner_fields()
        _runtime.publish(
            self._named(),
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

    # ------------------------------------------------------------ pickling

    def __reduce__(self) -> tuple[Any, ...]:
        self._check_open()
        if not self.capabilities.pickle_anytime and get_spawning_popen() is None:
            raise ConfigError(
                f"a {self.backend} mapping is shared by inheritance only (its memory cannot "
                f"travel through pickle): pass it when a process starts -- Process(target=f, "
                f"args=(d,)) or Pool(initializer=init, initargs=(d,)) with init storing it in a "
                f"global -- not as a Pool task argument, through a queue, or to another "
                f"interpreter. Or use backend='shm', which attaches by name"
            )
        joined = self._name if self._joined else None
        if joined is not None:  # the receiver is no user yet: keep it alive until it is
            _lifetime.in_transit(joined, self._created, self._config.timeout)
        return (attach_handle, (type(self), self._handle(), joined, self._created))

    def __copy__(self) -> Any:
        raise TypeError("use d.copy() for a detached dict, or pickle d to share the handle")

    # ------------------------------------------------------------ close and destroy

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
                name = self._named()
                _lifetime.leave(name, self._created, self._config.timeout,
                                lambda record: remove_for(name, record))
            _lifetime.leave_pending(remove_for)
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
                name = self._named()
                _lifetime.forget(name, self._created)
                with _lifetime.name_lock(name, self._config.timeout):
                    self._destroy()  # (the lock file goes with the record: not another's)
            else:
                self._destroy()
        finally:
            self._closed = True

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach_handle(cls: type[Lifecycle], handle: Any, name: str | None,
                  created: float) -> Lifecycle:
    """Unpickle a handle: attach, and count this process among the mapping's users."""
    obj: Lifecycle = cls._from_handle(handle)
    if name is not None:
        try:
            obj._joined_as(created, received=True)
        except BaseException:
            obj._closed = True
            obj._close()
            raise
    return obj


def remove_for(name: str, record: Mapping[str, Any]) -> None:
    """Remove what the mapping of ``record`` holds (its last user is leaving)."""
    cls = backend_class(record["backend"])
    (MappingBase if cls is None else cls)._cleanup_record(name, record)


def backend_class(backend: str) -> type[MappingBase] | None:
    """The class that made a record (its cleanup knows what it left), if it loads."""
    from . import registry

    try:
        return registry.load(backend)
    except Exception:
        return None


def _leave_all_at_exit() -> None:
    _lifetime.leave_pending(remove_for)
    _lifetime.leave_all_at_exit(remove_for)


atexit.register(_leave_all_at_exit)
_lifetime.at_exit_fn = _leave_all_at_exit
