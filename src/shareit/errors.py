"""The exception tree.

Every error also inherits the built-in exception a caller would naturally
catch, so ``except ValueError`` or ``except ConnectionError`` keeps working
for code that has never heard of shareit.
"""

from __future__ import annotations

__all__ = [
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


class ShareitError(Exception):
    """Base class of every error shareit raises on purpose."""


class ConfigError(ShareitError, ValueError):
    """An option, option value or configuration file is invalid."""


class UnknownBackendError(ConfigError, LookupError):
    """The backend name is not registered; the message lists valid names."""


class BackendUnavailableError(ShareitError, ImportError):
    """An optional dependency or a server is missing; says what to install or start."""


class BackendDiedError(ShareitError, ConnectionError):
    """The backend vanished while in use (server killed, segment destroyed)."""


class BackendTimeoutError(BackendDiedError, TimeoutError):
    """The backend did not answer within ``timeout`` seconds (hung or stopped)."""


class LockTimeoutError(ShareitError, TimeoutError):
    """The mapping's lock could not be acquired within the timeout."""


class LockLostError(ShareitError, RuntimeError):
    """The ``lock()`` this process held expired and passed to another process; nothing was written.

    Raised by every write inside the ``with`` block once the lock's lease has
    lapsed (its holder was stopped, frozen or cut off for longer than the
    lease); such a write changes nothing. A block that lost it and ends with
    no write having raised it raises it on leaving: what it read may have changed.
    """


class ReentrantWriteError(ShareitError, RuntimeError):
    """A write began while this thread's own write to the same mapping was still in
    progress -- from a signal handler (or a callback) that ran in the middle of it.
    The inner write changes nothing; caught, the interrupted write goes on and lands.
    Let the handler record what it wants written and write it after the outer write
    returns (a flag, a queue), or write to another mapping.
    """


class CapacityError(ShareitError):
    """A fixed-size store is full, or the file system holding it has no room left."""


class ClosedError(ShareitError, ValueError):
    """The mapping was used after ``close()`` or ``destroy()``."""


class NotFoundError(ShareitError, FileNotFoundError):
    """``open(name, create=False)`` found no live mapping of that name."""


class PermissionDeniedError(ShareitError, PermissionError):
    """A file or directory shareit would use is not safely this user's own.

    Raised instead of using it when it belongs to another user, is reachable by
    group or others, or is a symlink: data there could have been planted by
    someone else, and another user's mapping is never attached to.
    """


class RecordError(ShareitError, ValueError):
    """A mapping's record (runtime-dir file or redis ``:meta`` hash) is not valid shareit data."""


def lock_timeout(what: str, timeout: float,
                 why: str = "another process holds it") -> LockTimeoutError:
    """The one way a lock wait that ran out is reported: what, how long, why, and the way out.

    ``what`` names the thing ("mapping 'hits'", "key 'a' of value mapping 'x'");
    ``why`` says what kept it ("another process holds lock()", "writers kept changing it").
    """
    return LockTimeoutError(
        f"could not lock {what} within {timeout:g} s: {why}. "
        f"Pass a larger timeout (the 'timeout' option, or lock(timeout=...)) if that is expected"
    )


def reentrant_write(label: str) -> ReentrantWriteError:
    """The error of a write begun inside this thread's own write to ``label``."""
    return ReentrantWriteError(
        f"a write to {label} began while this thread's own write to it was still in "
        f"progress (a signal handler or a callback writing from inside it): nothing was "
        f"written. Record what to write and write it after the outer write returns"
    )
