"""The ``manager`` backend: a server process holds the data.

Features
--------
- Any picklable value, any hashable key whose type the server can import
  (built-in types always).
- Every call is one round trip; ``incr``, ``update``, ``clear``, ``pop``,
  ``setdefault``, ``snapshot``/``dict(d)``/``items()`` and iteration each cost
  one, not one per key. ``transform``/``edit`` cost two (lock+read, then
  write+unlock), because the user's function runs in the caller, not in the
  server (the server cannot import functions defined in the caller's
  ``__main__``).
- A lock holder that dies releases ``lock()`` at once: the lock is held by the
  server thread of the holder's connection, which ends when the holder does.
- A killed server raises :class:`~shareit.BackendDiedError` on every later
  call; a stopped one :class:`~shareit.BackendTimeoutError` after ``timeout``.
- The server of a named mapping runs while any process uses the mapping (its
  creator included or not; see ``shareit._lifetime``); an anonymous mapping's
  server exits with its creator.
- A named mapping can be attached by name from any process of the same user:
  the server listens on ``NAME@sock`` in the user's private runtime dir (mode
  0700: no other user can connect to it), and the auth key is in its record,
  ``NAME@meta`` (mode 0600).

Configuration
-------------
``shareit.open("jobs", backend="manager", timeout=5)``; in ``shareit.toml``::

    [mappings.jobs]
    backend = "manager"

or ``SHAREIT_BACKEND=manager`` in the environment.

Why not ``multiprocessing.Manager`` itself: its proxies have no timeout (a
stopped server hangs every caller), iterate one round trip per key, cannot
release a lock whose holder died, and leave the server running as an orphan
when the owner is killed. The server here keeps Manager's transport
(``multiprocessing.connection`` with its HMAC challenge) and fixes those.
"""

from __future__ import annotations

import copy
import operator
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, ClassVar

from .. import _codec, _records, _runtime
from ..base import MISSING, Capabilities, SharedMapping, _check_number
from ..config import Config
from ..errors import (
    BackendDiedError,
    BackendTimeoutError,
    LockLostError,
    PermissionDeniedError,
    RecordError,
    lock_timeout,
)
from . import _rpc
from ._rpc import SERVER_MARK, Link, decode, encode, set_timeouts

_pack, _unpack = _codec.pack, _codec.unpack
_second = operator.itemgetter(1)


def _bound(timeout: float) -> float:
    """How long the client waits for a reply that the server may delay by ``timeout`` (a
    write waiting for another's lock()): a little longer, so that the server's own answer
    (LockTimeoutError) wins, yet within ~10% of ``timeout`` when it is stopped or hung."""
    return timeout * 1.05 + 0.02


class ManagerMapping(SharedMapping):
    """A mapping held by a server process; one round trip per operation."""

    backend = "manager"
    record_fields: ClassVar[dict[str, tuple[type, ...]]] = {
        "authkey": (str,), "server_pid": (int,), "server_start": (int, type(None))}
    capabilities = Capabilities(
        attach_by_name=True,
        cross_machine=False,
        ordered=True,
        notes="server process; one round trip per call",
    )
    #: The module whose ``main()`` the server process runs (see ``_rpc.start_server``).
    server_module: ClassVar[str] = "shareit.backends._manager_server"
    #: What errors call the server process.
    server_title: ClassVar[str] = "manager server"

    def __init__(self, name: str | None, config: Config, address: str, authkey: bytes,
                 stem: str | None = None):
        super().__init__(name, config)
        self._address = address
        self._authkey = authkey
        self._stem = stem  # the name, or an anonymous stem: where the server's files are
        self._tls = threading.local()  # a Link per (process, thread): see _link
        self._links: list[Link] = []
        self._links_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def _create(cls, name: str | None, config: Config) -> ManagerMapping:
        authkey = secrets.token_bytes(32)
        stem = name if name is not None else _runtime.anon_stem()
        address = _runtime.socket_path(stem)
        cls._prepare_server(stem)
        try:
            proc = _start_server(cls.server_module, name, stem, config, address, authkey)
        except BaseException:
            cls._unprepare_server(stem)
            raise
        self = cls(name, config, address, authkey, stem)
        self._proc = proc
        if name is not None:
            self._publish(
                authkey=authkey.hex(),
                server_pid=proc.pid,
                server_start=_runtime.proc_start_time(proc.pid),
            )
        return self

    @classmethod
    def _prepare_server(cls, stem: str) -> None:
        """Create what the server needs beside its socket before it starts. Default: nothing."""

    @classmethod
    def _unprepare_server(cls, stem: str) -> None:
        """Undo :meth:`_prepare_server` when the server did not start."""

    @classmethod
    def _attach_record(cls, name: str, config: Config, record: Mapping[str, Any]) -> ManagerMapping:
        address, authkey = _runtime.socket_path(name), record["authkey"]  # (never from a record)
        if len(authkey) != 64:
            raise RecordError(f"the record of mapping {name!r} has a malformed auth key")
        try:
            key = bytes.fromhex(authkey)
        except ValueError:
            raise RecordError(f"the record of mapping {name!r} has a malformed auth key") from None
        _rpc.reap_started()
        self = cls(name, config, address, key, name)
        self._call("len")  # fail now, with BackendDiedError, if the server is gone
        return self

    @classmethod
    def _cleanup_record(cls, name: str, record: Mapping[str, Any]) -> None:
        """A dead owner's server normally exits by itself; one still running is stopped only
        once proven to be this user's shareit server (uid, start time, command line)."""
        try:
            fields = _records.backend_fields(record, cls.record_fields)
        except RecordError:
            return
        pid, start = fields["server_pid"], fields["server_start"]
        if _runtime.is_own_process(pid, start, SERVER_MARK.encode()):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        _unlink_quiet(_runtime.socket_path(name))

    def _handle(self) -> tuple[Any, ...]:
        return (self._name, self._config, self._authkey, self._stem)

    @classmethod
    def _from_handle(cls, handle: tuple[Any, ...]) -> ManagerMapping:
        # A handle carries no path: the server's address follows from the stem, in our
        # own private runtime dir, as for every other backend.
        name, config, authkey, stem = handle
        stem = _runtime.check_stem(stem)
        return cls(name, config, _runtime.socket_path(stem), authkey, stem)

    def _close(self) -> None:
        _rpc.reap_started()  # a server of ours that exited by itself meanwhile
        with self._links_lock:
            links, self._links = self._links, []
        for link in links:
            if link.pid == os.getpid():
                link.conn.close()
        self._tls = threading.local()

    def _destroy(self) -> None:
        try:
            self._call("shutdown")
        except BackendDiedError:
            pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=self._config.timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._name is not None:
            record = _runtime.read_meta_quiet(self._name)
            mine = record is None or record["fields"].get("authkey") == self._authkey.hex()
            if record is not None and mine:
                _runtime.remove_meta(self._name, expect=record)
        else:
            mine = True
        if mine:  # (not through a handle of a mapping whose name was taken again since)
            self._remove_server_files()
        _rpc.reap_started()
        self._close()

    def _remove_server_files(self) -> None:
        """What the server leaves beside its record (its mapping is being destroyed)."""
        _unlink_quiet(self._address)  # a killed server cannot remove its socket

    # ------------------------------------------------------------------ transport

    def _link(self) -> Link:
        """This thread's connection to the server, made on first use (and in a forked child)."""
        tls = self._tls
        link: Link | None = getattr(tls, "link", None)
        if link is not None and link.generation == _runtime.fork_generation:
            return link
        self._check_open()
        link = tls.link = self._connect()
        return link

    def _connect(self) -> Link:
        """A new authenticated connection to the server (this thread's, or one a subclass keeps)."""
        timeout = self._config.timeout
        try:
            link = _rpc.connect(self._address, self._authkey, timeout, _bound(timeout),
                                ("hello", timeout, os.getpid()), _runtime.fork_generation)
        except _rpc.ForeignServerError as exc:
            raise PermissionDeniedError(
                f"the server at the address of mapping {self._label()} "
                f"({self._address.lstrip(chr(0))!r}) belongs to uid {exc.uid}, not you "
                f"(uid {os.geteuid()}); refusing to use it"
            ) from None
        except _rpc.WrongKeyError:
            raise BackendDiedError(
                f"mapping {self._label()} was destroyed, and another mapping has this name "
                f"now (its {self.server_title} does not know this handle's key); open it "
                f"again by name"
            ) from None
        except (OSError, EOFError) as exc:
            raise self._died(exc) from None
        with self._links_lock:
            self._links.append(link)
        return link

    def _drop_link(self) -> None:
        link: Link | None = getattr(self._tls, "link", None)
        self._tls.link = None
        if link is not None and link.pid == os.getpid():
            link.conn.close()

    def _died(self, exc: BaseException) -> BackendDiedError:
        if isinstance(exc, (BlockingIOError, socket.timeout)):
            return BackendTimeoutError(
                f"the {self.server_title} of mapping {self._label()} did not answer within "
                f"{_bound(self._config.timeout):g} s: it is stopped, hung or overloaded"
            )
        return BackendDiedError(
            f"the {self.server_title} of mapping {self._label()} is gone "
            f"({type(exc).__name__}); its data is lost. Create the mapping again"
        )

    def _call(self, *req: Any) -> Any:
        try:
            data = encode(req)
        except Exception as exc:
            raise TypeError(f"cannot send this key to the {self.server_title}: {exc}") from None
        tls = self._tls
        if getattr(tls, "lost", 0):  # (inside a lock() block whose connection went)
            raise self._lock_lost()
        link: Link | None = getattr(tls, "link", None)
        if link is None or link.generation != _runtime.fork_generation:
            link = self._link()
        # Out of the thread's slot while a request is in flight: a call made meanwhile by
        # a signal handler of this thread connects afresh instead of reading this call's
        # reply; and a call cut short (KeyboardInterrupt) leaves a reply unread: the
        # connection goes with it, never to answer the next call with a stale reply --
        # and with it any lock() it held (the server releases it): every later call of
        # the block raises LockLostError, and so does leaving it (unless it is left by
        # an exception already).
        tls.link = None
        conn = link.conn
        try:
            conn.send_bytes(data)
            reply = decode(conn.recv_bytes())
        except BaseException as exc:
            if link.pid == os.getpid():
                conn.close()
                if link.locks:
                    tls.lost = link.locks
            if isinstance(exc, (OSError, EOFError)):
                raise self._died(exc) from None
            raise
        nested = getattr(tls, "link", None)
        tls.link = link  # (it may hold lock() on the server: it stays this thread's link)
        if nested is not None and nested is not link and nested.pid == os.getpid():
            nested.conn.close()  # a signal handler's, made while this call was in flight
        if reply[0]:
            return reply[1]
        raise reply[1]

    # ------------------------------------------------------------------ the five

    def __getitem__(self, key: Any) -> Any:
        if self._declared is not None:
            key = self._check_key(key)  # otherwise the server's dict raises the same TypeError
        return _unpack(self._call("get", key))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._call("set", self._check_key(key), _pack(self._coerce(value)))

    def __delitem__(self, key: Any) -> None:
        self._call("del", self._check_key(key))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._call("keys"))

    def __len__(self) -> int:
        n: int = self._call("len")
        return n

    # ------------------------------------------------------------------ one round trip each

    def __contains__(self, key: Any) -> bool:
        try:
            key = self._check_key(key)
        except KeyError:
            return False
        has: bool = self._call("has", key)
        return has

    def snapshot(self) -> dict[Any, Any]:
        data: dict[Any, Any]
        data, wrapped = self._call("items")
        if wrapped:
            for k, v in data.items():
                if type(v) is tuple:
                    data[k] = decode(v[0])
        return data

    def _update_items(self, items: list[tuple[Any, Any]]) -> None:
        if _codec.all_plain(map(_second, items)):  # (the common case)
            self._call("update", dict(items))
        else:
            plain = _codec.PLAIN_TYPES
            self._call("update", {k: v if type(v) in plain else _pack(v) for k, v in items})

    def clear(self) -> None:
        self._call("clear")

    def pop(self, key: Any, default: Any = MISSING) -> Any:
        try:
            return _unpack(self._call("pop", self._check_key(key)))
        except KeyError:
            if default is MISSING:
                raise
            return default

    def popitem(self) -> tuple[Any, Any]:
        key, value = self._call("popitem")
        return key, _unpack(value)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        return _unpack(self._call("setdefault", self._check_key(key), _pack(self._coerce(default))))

    def incr(self, key: Any, delta: Any = 1, default: Any = 0) -> Any:
        _check_number("delta", delta)
        return self._call("incr", self._check_key(key), delta, self._coerce(default))

    # ------------------------------------------------------------------ locking

    def _lock_acquire(self, timeout: float) -> bool:
        got: bool = self._call_waiting(timeout, "acquire", timeout)
        if got:
            self._tls.link.locks += 1
        return got

    def _lock_release(self) -> None:
        self._end_hold(False, "release")

    def _lock_exit(self, by_exception: bool) -> None:
        self._end_hold(by_exception, "release")

    def _end_hold(self, by_exception: bool, *req: Any) -> Any:
        """End one level of this thread's hold of the server's lock with ``req``
        ("release", or "set_release" and its write). If the hold was lost -- a call cut
        short closed the connection that owned it -- nothing is sent: LockLostError,
        unless an exception is already leaving (``by_exception``), which goes on."""
        tls = self._tls
        lost = getattr(tls, "lost", 0)
        if lost:
            tls.lost = lost - 1
            if by_exception:
                return None
            raise self._lock_lost()
        link: Link = tls.link  # (it holds the lock: this thread's link)
        try:
            got = self._call(*req)
        except BaseException:
            lost = getattr(tls, "lost", 0)
            if lost:  # this very call was cut short: its connection, and the hold, went
                tls.lost = lost - 1  # (this level is over either way)
            raise
        link.locks -= 1
        return got

    def _lock_lost(self) -> LockLostError:
        return LockLostError(
            f"the lock() of mapping {self._label()} was released when a call inside it was "
            f"cut short (an exception while it waited for the server, which then dropped its "
            f"connection): what the block read may have changed since, and nothing it wrote "
            f"after that call was sent"
        )

    def _call_waiting(self, timeout: float, *req: Any) -> Any:
        """A call the server may hold for up to ``timeout`` s: widen the client's bound for it."""
        if timeout <= self._config.timeout:
            return self._call(*req)
        link = self._link()
        set_timeouts(link.conn, _bound(timeout), _bound(timeout))
        try:
            return self._call(*req)
        finally:
            if getattr(self._tls, "link", None) is link:
                t = _bound(self._config.timeout)
                set_timeouts(link.conn, t, t)

    def _locked_read(self, key: Any, default: Any) -> Any:
        """Take the lock and read ``key`` in one round trip; the caller must release."""
        timeout = self._config.timeout
        got = self._call_waiting(timeout, "lock_get", key, timeout)
        if got is None:
            raise lock_timeout(f"mapping {self._label()}", timeout)
        self._tls.link.locks += 1  # (held now, as by lock())
        present, stored = got
        if present:
            return _unpack(stored)
        if default is MISSING:
            self._end_hold(False, "release")
            raise KeyError(key)
        return _copy_default(default)

    def transform(self, key: Any, fn: Callable[[Any], Any], default: Any = MISSING) -> Any:
        key = self._check_key(key)
        current = self._locked_read(key, default)
        try:
            new = self._coerce(fn(current))
            stored = _pack(new)
        except BaseException:
            self._end_hold(True, "release")
            raise
        self._end_hold(False, "set_release", key, stored)  # (never after the hold is lost)
        return new

    def edit(self, key: Any, default: Any = MISSING) -> _Edit:  # type: ignore[override]
        return _Edit(self, self._check_key(key), default)

    def info(self) -> dict[str, Any]:
        """Server-side facts: pid, number of keys, bytes held, whether ``lock()`` is held."""
        info: dict[str, Any] = self._call("info")
        return info


class _Edit:
    """``edit()`` in two round trips: lock+read on enter, write+unlock on a clean exit."""

    __slots__ = ("_m", "_key", "_default", "_value")

    def __init__(self, m: ManagerMapping, key: Any, default: Any):
        self._m, self._key, self._default = m, key, default

    def __enter__(self) -> Any:
        self._value = self._m._locked_read(self._key, self._default)
        return self._value

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self._m._end_hold(True, "release")
            return
        try:
            stored = _pack(self._m._coerce(self._value))
        except BaseException:
            self._m._end_hold(True, "release")
            raise
        self._m._end_hold(False, "set_release", self._key, stored)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _copy_default(default: Any) -> Any:
    return copy.deepcopy(default)


def _start_server(module: str, name: str | None, stem: str, config: Config, address: str,
                  authkey: bytes) -> subprocess.Popen[bytes]:
    """Start the server process (``module``'s ``main``) and wait until it listens."""
    owner = _runtime.owner_fields()
    params = {
        "name": name,
        "stem": stem,
        "address": address,
        "authkey": authkey,
        "timeout": config.timeout,
        "value_type": config.value_type,
        "persist": config.persist,
        "owner_pid": owner["owner_pid"],
        "owner_start": owner["owner_start"],
    }
    return _rpc.start_server(module, params, config.timeout)
