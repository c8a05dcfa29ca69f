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
import pickle
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

from .. import _codec, _records, _runtime
from ..base import MISSING, Capabilities, SharedMapping, _check_number
from ..config import Config
from ..errors import (
    BackendDiedError,
    BackendTimeoutError,
    BackendUnavailableError,
    LockTimeoutError,
    RecordError,
)
from ._manager_server import conn_setup

_dumps, _loads = pickle.dumps, pickle.loads
_pack, _unpack = _codec.pack, _codec.unpack
_second = operator.itemgetter(1)
_PROTO = pickle.HIGHEST_PROTOCOL
def _bound(timeout: float) -> float:
    """How long the client waits for a reply that the server may delay by ``timeout`` (a
    write waiting for another's lock()): a little longer, so that the server's own answer
    (LockTimeoutError) wins, yet within ~10% of ``timeout`` when it is stopped or hung."""
    return timeout * 1.05 + 0.02

class ManagerMapping(SharedMapping):
    """A mapping held by a server process; one round trip per operation."""

    backend = "manager"
    _prefetch_reads = True
    record_fields = {"authkey": (str,), "server_pid": (int,), "server_start": (int, type(None))}
    capabilities = Capabilities(
        attach_by_name=True,
        cross_machine=False,
        ordered=True,
        notes="server process; one round trip per call",
    )

    def __init__(self, name: str | None, config: Config, address: str, authkey: bytes,
                 **extra: Any):
        super().__init__(name, config)
        self._address = address
        self._authkey = authkey
        self._extra = extra  # what a subclass's server needs too (see _server_extra)
        self._tls = threading.local()  # a connection per (process, thread): see _conn
        self._conns: list[Connection] = []
        self._conns_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def _create(cls, name: str | None, config: Config) -> ManagerMapping:
        authkey = secrets.token_bytes(32)
        stem = name if name is not None else _runtime.anon_stem()
        address = _runtime.socket_path(stem)
        extra = cls._server_extra(stem)
        cls._prepare_server(stem)
        try:
            proc = _start_server(name, config, address, authkey, extra)
        except BaseException:
            cls._unprepare_server(stem)
            raise
        self = cls(name, config, address, authkey, **extra)
        self._proc = proc
        if name is not None:
            self._publish(
                authkey=authkey.hex(),
                server_pid=proc.pid,
                server_start=_runtime.proc_start_time(proc.pid),
                **extra,
            )
        return self

    @classmethod
    def _server_extra(cls, stem: str) -> dict:
        """Extra server parameters, also kept in the handle (JSON-able; never paths:
        the record of a named mapping does not carry them, they follow from the name)."""
        return {}

    @classmethod
    def _prepare_server(cls, stem: str) -> None:
        """Create what the server needs beside its socket before it starts. Default: nothing."""

    @classmethod
    def _unprepare_server(cls, stem: str) -> None:
        """Undo :meth:`_prepare_server` when the server did not start."""

    @classmethod
    def _attach_record(cls, name: str, config: Config, record: dict) -> ManagerMapping:
        address, authkey = _runtime.socket_path(name), record["authkey"]  # (never from a record)
        if len(authkey) != 64:
            raise RecordError(f"the record of mapping {name!r} has a malformed auth key")
        try:
            key = bytes.fromhex(authkey)
        except ValueError:
            raise RecordError(f"the record of mapping {name!r} has a malformed auth key") from None
        self = cls(name, config, address, key, **cls._server_extra(name))
        self._call("len")  # fail now, with BackendDiedError, if the server is gone
        return self

    @classmethod
    def _cleanup_record(cls, name: str, record: dict) -> None:
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

    def _handle(self) -> tuple:
        return (self._name, self._config, self._address, self._authkey, self._extra)

    @classmethod
    def _from_handle(cls, handle: tuple) -> ManagerMapping:
        name, config, address, authkey, extra = handle
        return cls(name, config, address, authkey, **extra)

    def _close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            if getattr(conn, "_shareit_pid", None) == os.getpid():
                conn.close()
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
            if record is not None and record["fields"].get("authkey") == self._authkey.hex():
                _runtime.remove_meta(self._name)
            if record is None or record["fields"].get("authkey") == self._authkey.hex():
                _unlink_quiet(self._address)  # a killed server cannot remove its socket
        else:
            _unlink_quiet(self._address)
        self._close()

    # ------------------------------------------------------------------ transport

    def _conn(self) -> Connection:
        tls = self._tls
        conn = getattr(tls, "conn", None)
        if conn is not None and tls.generation == _runtime.fork_generation:
            return conn
        self._check_open()
        conn = self._connect()
        tls.conn, tls.generation = conn, _runtime.fork_generation
        return conn

    def _connect(self) -> Connection:
        timeout = self._config.timeout
        deadline = time.monotonic() + _bound(timeout)  # beyond the server's handshake limit
        pause = 0.002
        while (sock := self._dial(timeout)) is None:
            if time.monotonic() + pause > deadline:
                raise self._died(TimeoutError()) from None  # "overloaded"
            time.sleep(pause)  # the server is shedding load: try again shortly, until timeout
            pause = min(pause * 2, 0.1)
        conn = Connection(sock.detach())
        conn._shareit_pid = os.getpid()  # type: ignore[attr-defined]
        try:
            conn_setup(conn, _bound(timeout), _bound(timeout))
            answer_challenge(conn, self._authkey)
            deliver_challenge(conn, self._authkey)
            conn.send_bytes(_dumps(self._hello(), _PROTO))
            conn._shareit_hello = _loads(conn.recv_bytes())[1]  # type: ignore[attr-defined]
        except (OSError, EOFError) as exc:
            conn.close()
            raise self._died(exc) from None
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _dial(self, timeout: float) -> socket.socket | None:
        """Connect, check the server is ours, and wait for its first byte. None if it
        closed the connection before sending any: a server turns connections away while
        too many are handshaking at once (a burst of clients, or a flood)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self._address)
        except OSError as exc:
            sock.close()
            raise self._died(exc) from None
        self._check_server_uid(sock)
        try:
            sock.settimeout(_bound(timeout))
            first = sock.recv(1, socket.MSG_PEEK)
            sock.settimeout(None)
        except ConnectionResetError:
            first = b""
        except OSError as exc:
            sock.close()
            raise self._died(exc) from None
        if not first:
            sock.close()
            return None
        return sock

    def _check_server_uid(self, sock: socket.socket) -> None:
        """Refuse a server of another user before sending it anything (defence in depth:
        the socket is in our private directory, which no other user can enter)."""
        from ..errors import PermissionDeniedError
        from ._manager_server import peer_uid

        try:
            uid = peer_uid(sock)
        except OSError as exc:
            sock.close()
            raise self._died(exc) from None
        if uid != os.geteuid():
            sock.close()
            raise PermissionDeniedError(
                f"the server at the address of mapping {self._label()} "
                f"({self._address.lstrip(chr(0))!r}) belongs to uid {uid}, not you "
                f"(uid {os.geteuid()}); refusing to use it"
            )

    def _hello(self) -> tuple:
        """The first request on every connection: who this client is."""
        return ("hello", self._config.timeout, os.getpid())

    def _drop_conn(self) -> None:
        conn = getattr(self._tls, "conn", None)
        self._tls.conn = None
        if conn is not None and getattr(conn, "_shareit_pid", None) == os.getpid():
            conn.close()

    def _died(self, exc: BaseException) -> BackendDiedError:
        if isinstance(exc, (BlockingIOError, socket.timeout)):
            return BackendTimeoutError(
                f"the manager server of mapping {self._label()} did not answer within "
                f"{_bound(self._config.timeout):g} s: it is stopped, hung or overloaded"
            )
        return BackendDiedError(
            f"the manager server of mapping {self._label()} is gone "
            f"({type(exc).__name__}); its data is lost. Create the mapping again"
        )

    def _encode_request(self, req: tuple) -> bytes:
        try:
            return _dumps(req, _PROTO)
        except Exception as exc:
            raise TypeError(f"cannot send this key to the manager server: {exc}") from None

    def _call(self, *req: Any) -> Any:
        try:
            data = _dumps(req, _PROTO)
        except Exception:
            data = self._encode_request(req)  # raises TypeError saying what failed
        self._end_prefetch()
        tls = self._tls
        conn = getattr(tls, "conn", None)
        if conn is None or tls.generation != _runtime.fork_generation:
            conn = self._conn()
        try:
            conn.send_bytes(data)
            reply = _loads(conn.recv_bytes())
        except (OSError, EOFError) as exc:
            self._drop_conn()
            raise self._died(exc) from None
        if reply[0]:
            return reply[1]
        raise reply[1]

    # ------------------------------------------------------------------ the five

    def __getitem__(self, key: Any) -> Any:
        value = self._take_prefetched(key)
        if value is not MISSING:
            return value
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
        return self._call("len")

    # ------------------------------------------------------------------ one round trip each

    def __contains__(self, key: Any) -> bool:
        try:
            key = self._check_key(key)
        except KeyError:
            return False
        return self._call("has", key)

    def snapshot(self) -> dict:
        data, wrapped = self._call("items")
        if wrapped:
            for k, v in data.items():
                if type(v) is tuple:
                    data[k] = _loads(v[0])
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
        return self._call_waiting(timeout, "acquire", timeout)

    def _lock_release(self) -> None:
        self._call("release")

    def _call_waiting(self, timeout: float, *req: Any) -> Any:
        """A call the server may hold for up to ``timeout`` s: widen the client's bound for it."""
        if timeout <= self._config.timeout:
            return self._call(*req)
        conn = self._conn()
        conn_setup(conn, _bound(timeout), _bound(timeout))
        try:
            return self._call(*req)
        finally:
            if getattr(self._tls, "conn", None) is conn:
                t = _bound(self._config.timeout)
                conn_setup(conn, t, t)

    def _locked_read(self, key: Any, default: Any) -> Any:
        """Take the lock and read ``key`` in one round trip; the caller must release."""
        timeout = self._config.timeout
        got = self._call_waiting(timeout, "lock_get", key, timeout)
        if got is None:
            raise LockTimeoutError(
                f"could not lock mapping {self._label()} within {timeout:g} s: another "
                f"process holds it. Pass a larger timeout"
            )
        present, stored = got
        if present:
            return _unpack(stored)
        if default is MISSING:
            self._call("release")
            raise KeyError(key)
        return _copy_default(default)

    def transform(self, key: Any, fn: Callable[[Any], Any], default: Any = MISSING) -> Any:
        key = self._check_key(key)
        current = self._locked_read(key, default)
        try:
            new = self._coerce(fn(current))
            stored = _pack(new)
        except BaseException:
            self._call("release")
            raise
        self._call("set_release", key, stored)
        return new

    def edit(self, key: Any, default: Any = MISSING):
        return _Edit(self, self._check_key(key), default)

    def info(self) -> dict:
        """Server-side facts: pid, number of keys, bytes held, whether ``lock()`` is held."""
        return self._call("info")


class _Edit:
    """``edit()`` in two round trips: lock+read on enter, write+unlock on a clean exit."""

    __slots__ = ("_m", "_key", "_default", "_value")

    def __init__(self, m: ManagerMapping, key: Any, default: Any):
        self._m, self._key, self._default = m, key, default

    def __enter__(self) -> Any:
        self._value = self._m._locked_read(self._key, self._default)
        return self._value

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._m._call("release")
            return
        try:
            stored = _pack(self._m._coerce(self._value))
        except BaseException:
            self._m._call("release")
            raise
        self._m._call("set_release", self._key, stored)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _copy_default(default: Any) -> Any:
    return copy.deepcopy(default)


#: In the server's command line: how ``_cleanup_record`` recognises a server of ours.
SERVER_MARK = "shareit.backends._manager_server"
_BOOT = ("import sys; sys.path.insert(0, sys.argv[2]); "
         "from shareit.backends._manager_server import main; main()")


def _start_server(name: str | None, config: Config, address: str, authkey: bytes,
                  extra: dict) -> subprocess.Popen:
    """Start the server process and wait until it listens (or fail with the reason)."""
    import shareit

    root = os.path.dirname(os.path.dirname(os.path.abspath(shareit.__file__)))
    # Isolated (-I: no cwd, no PYTHON* variables, no user site) and run from /: with
    # ``python -m`` the caller's working directory would come first on the server's
    # import path, and whoever can write there (/tmp) would run code as the caller.
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", _BOOT, SERVER_MARK, root],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd="/",
        close_fds=True,
        start_new_session=True,  # it outlives its creator while others use the mapping
    )
    owner = _runtime.owner_fields()
    params = {
        "name": name,
        "address": address,
        "authkey": authkey,
        "timeout": config.timeout,
        "value_type": config.value_type,
        "persist": config.persist,
        "owner_pid": owner["owner_pid"],
        "owner_start": owner["owner_start"],
        **extra,
    }
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(pickle.dumps(params))
    proc.stdin.close()
    deadline = time.monotonic() + max(config.timeout, 10.0)
    line = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if ready:
            line = proc.stdout.readline()
            break
    proc.stdout.close()
    if line != b"ready\n":
        proc.kill()
        proc.wait()
        raise BackendUnavailableError(
            f"the manager server did not start (exit status {proc.returncode}); "
            f"see its error output above"
        )
    return proc
