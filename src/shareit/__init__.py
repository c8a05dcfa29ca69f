"""shareit: one dict-like object shared by several processes, shared the way you configure.

>>> import shareit
>>> d = shareit.open(backend="manager")
>>> d["a"] = 1
>>> d.incr("a")
2
>>> d.close()

``import shareit`` imports no backend and no optional dependency: backends are
imported when first opened.
"""

from .api import backends, destroy, open
from .base import MISSING, Capabilities, SharedMapping
from .config import Config
from .errors import (
    BackendDiedError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    ClosedError,
    ConfigError,
    LockLostError,
    LockTimeoutError,
    NotFoundError,
    PermissionDeniedError,
    RecordError,
    ReentrantWriteError,
    ShareitError,
    UnknownBackendError,
)
from .registry import register

__version__ = "0.1.0"

__all__ = [
    "open",
    "destroy",
    "backends",
    "register",
    "SharedMapping",
    "Capabilities",
    "Config",
    "MISSING",
    "ShareitError",
    "ConfigError",
    "UnknownBackendError",
    "BackendUnavailableError",
    "BackendDiedError",
    "BackendTimeoutError",
    "LockTimeoutError",
    "LockLostError",
    "ReentrantWriteError",
    "CapacityError",
    "ClosedError",
    "NotFoundError",
    "PermissionDeniedError",
    "RecordError",
]
