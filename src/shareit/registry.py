"""Backend names -> ``"module:Class"`` strings, imported on first use.

Built-in backends are listed here; third-party packages add theirs through
the ``shareit.backends`` entry-point group (``name = "pkg.module:Class"``) or
:func:`register`. Nothing is imported until a backend is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import did_you_mean
from .errors import BackendUnavailableError, UnknownBackendError

if TYPE_CHECKING:  # pragma: no cover
    from .base import SharedMapping

__all__ = ["register", "names", "load"]

_BUILTIN: dict[str, str] = {
    "manager": "shareit.backends.manager:ManagerMapping",
    "shm": "shareit.backends.shm:ShmMapping",
    "value": "shareit.backends.value:ValueMapping",
    "queue": "shareit.backends.queue:QueueMapping",
    "redis": "shareit.backends.redis:RedisMapping",
}
#: What to install when a backend's import fails for want of a dependency.
_INSTALL_HINTS: dict[str, str] = {
    "redis": "pip install 'shareit[redis]'",
}
_registry: dict[str, str] = dict(_BUILTIN)
_entry_points_loaded = False
#: Classes :func:`shareit.base.check_backend` found complete (checked once each).
_checked: set[type] = set()


def register(name: str, target: str, *, replace: bool = False) -> None:
    """Register backend ``name`` as ``"module:Class"`` (or ``"module.Class"``)."""
    if name in _registry and not replace and _registry[name] != target:
        raise ValueError(f"backend {name!r} is already registered as {_registry[name]!r}")
    _registry[name] = target


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="shareit.backends"):
        _registry.setdefault(ep.name, ep.value)


def names() -> list[str]:
    """Sorted names of every registered backend (built-in and entry points)."""
    _load_entry_points()
    return sorted(_registry)


def load(name: str) -> type[SharedMapping]:
    """The backend class registered as ``name``, imported now."""
    _load_entry_points()
    try:
        target = _registry[name]
    except KeyError:
        raise UnknownBackendError(
            f"no backend named {name!r}.{did_you_mean(name, _registry)} "
            f"Valid backends: {', '.join(sorted(_registry))}"
        ) from None
    module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = _INSTALL_HINTS.get(name, f"install the package that provides {module_name!r}")
        raise BackendUnavailableError(
            f"backend {name!r} cannot be imported ({exc}); {hint}"
        ) from exc
    cls = getattr(module, attr, None)
    from .base import SharedMapping, check_backend

    if not (isinstance(cls, type) and issubclass(cls, SharedMapping)):
        raise BackendUnavailableError(
            f"backend {name!r} ({target}) is not a shareit.base.SharedMapping subclass"
        )
    problems = [] if cls in _checked else check_backend(cls)
    if problems:
        raise BackendUnavailableError(
            f"backend {name!r} ({target}) breaks the backend contract: {'; '.join(problems)}. "
            f"See shareit.base (Writing a backend) and shareit.testing.reference"
        )
    _checked.add(cls)
    return cls
