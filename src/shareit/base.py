"""``SharedMapping``: the abstract base every backend subclasses.

It is assembled in layers, each in a module named after its job:

=====================  ==================================================================
``_contract``          state, the abstract and default hooks, input checks, the lock
``_ops``               ``incr``, ``transform``, ``edit``, ``update``, ``clear``, ``pop``...
``_views``             views, ``dict(d)`` in one round trip, ``==``, ``|``, ``repr``
``_lifecycle``         records, users, pickling as a handle, ``close``, ``destroy``
``_opening``           open strategies: runtime-dir records, inherit-only (redis: its own)
=====================  ==================================================================

Writing a backend
-----------------
Subclass :class:`SharedMapping`, set ``backend`` and ``capabilities``, and
provide every abstract hook: the five methods ``MutableMapping`` needs
(``__getitem__``, ``__setitem__``, ``__delitem__``, ``__iter__``,
``__len__``), ``_create``, ``_attach_record``, ``_handle`` and
``_from_handle``. Everything else -- ``incr``, ``transform``, ``edit``,
``lock``, ``snapshot``, ``update``, ``clear``, ``==``, ``|``, pickling,
lifetime -- works on top of them. Override one only to make it atomic
natively or faster; a backend with lock-free reads overrides ``snapshot``,
``_update_items`` and ``clear``. :func:`check_backend` (run by
:func:`shareit.registry.load`) refuses a class that breaks these rules.
``shareit.testing.reference`` is a complete, small backend to copy, and
``shareit.testing.SharedMappingSuite`` the test suite to run on yours.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

from ._contract import MISSING, STRUCTURAL_OPTIONS, Capabilities, LockContext, MappingBase
from ._lifecycle import Lifecycle
from ._opening import RUNTIME_RECORDS, Opener
from ._ops import add, check_number
from .config import Config

__all__ = ["SharedMapping", "Capabilities", "MISSING", "STRUCTURAL_OPTIONS", "check_backend"]

# Names backends imported from here before the split; they stay importable.
_LockContext = LockContext
_add = add
_check_number = check_number


class SharedMapping(Lifecycle):
    """A dict-like mapping shared by several processes.

    Create or attach with :func:`shareit.open`. Values are stored by value:
    reading returns a copy, so change nested values with :meth:`edit` or
    :meth:`transform`. ``incr``, ``transform``, ``edit`` and ``lock`` are
    atomic across all processes; ``update``, ``clear`` and ``snapshot`` are
    each one atomic step.
    """

    #: How :func:`shareit.open` creates or reaches a mapping of this backend.
    opener: ClassVar[Opener] = RUNTIME_RECORDS

    @classmethod
    def _open(cls, name: str | None, config: Config, create: bool = True) -> SharedMapping:
        """Create or attach (``shareit.open`` after resolving ``config``): the strategy's job."""
        return cls.opener.open(cls, name, config, create)


#: Hooks that the generic bulk writes need the default lock for (its undo journal).
_BULK = ("_update_items", "clear")
_LOCK = ("_lock_acquire", "_lock_release")


def check_backend(cls: type[MappingBase]) -> list[str]:
    """What keeps ``cls`` from being a complete backend (empty when nothing does).

    Every abstract hook is provided; ``backend`` is set; the open strategy agrees
    with ``capabilities.attach_by_name``; a backend that replaces the lock
    replaces the generic bulk writes too (they rely on the default lock's journal).
    """
    problems = []
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        problems.append(f"it does not implement {', '.join(missing)}")
    if not cls.backend:
        problems.append("its 'backend' class attribute (the registry name) is empty")
    opener = getattr(cls, "opener", None)
    if not isinstance(opener, Opener):
        problems.append("its 'opener' is not an open strategy (shareit._opening.Opener)")
    elif opener.attaches != cls.capabilities.attach_by_name:
        problems.append(f"its opener {type(opener).__name__} disagrees with "
                        f"capabilities.attach_by_name={cls.capabilities.attach_by_name}")
    if any(_overrides(cls, h) for h in _LOCK) and not all(_overrides(cls, h) for h in _BULK):
        problems.append("it replaces the lock but not _update_items and clear (the generic "
                        "ones need the default lock's undo journal)")
    return problems


def _overrides(cls: type, attr: str) -> bool:
    mine = inspect.getattr_static(cls, attr, None)
    return mine is not None and mine is not inspect.getattr_static(SharedMapping, attr, None)
