"""The manager backend's server process: holds the data, runs atomic operations.

Started by :mod:`shareit.backends.manager` (isolated, ``python -I``, from ``/``)
with its parameters pickled on stdin. It checks the same HMAC challenge as ``multiprocessing`` managers, per connection, in
that connection's thread (so a stalled client cannot block ``accept``).

It listens on ``STEM@sock`` in the user's private runtime dir (mode 0700), so
no other user can even connect. Still, nothing a client does may take the
server down or make it print: the gate in front of the handshake (``Gate``,
``Server.admit``) closes a peer of another uid (``SO_PEERCRED``) at once --
defence in depth, should the socket ever be reachable -- lets at most
``MAX_PENDING`` connections handshake at a time, each for at most
``HANDSHAKE_LIMIT`` seconds; running out of descriptors or threads makes the
accept loop back off instead of dying; and nothing a hostile peer does prints
to the owner's stderr (it is logged at DEBUG on ``shareit.server``). The
counts are in ``info()``.

One thread serves each client connection, and a client uses one connection per
thread, so "the server thread serving this call" identifies the calling
client thread. That is what ``lock()`` records as its holder: when the client
dies, its connection ends, its server thread ends, and the lock is released
at once -- no pid polling, no lease.

Values of plain built-in types are kept as themselves, others as ``(pickle,)``
(see ``_codec.pack``): the server never needs the classes of user values, and
``wrapped`` counts the pickled ones so that a snapshot of plain data needs no
per-value decoding in the client. A named mapping's server exits once the
mapping has no live user (``watch_users``) or its record is gone; an anonymous
one's when its creator dies (``pidfd``); any on ``shutdown``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from .. import _codec, _runtime
from ..errors import LockTimeoutError

_dumps, _loads = pickle.dumps, pickle.loads
_PROTO = pickle.HIGHEST_PROTOCOL
REMOVED = ("<removed>",)  # a 1-tuple of str: never a packed value, which is (bytes,)
CLEARED = ("<cleared>",)

log = logging.getLogger("shareit.server")
USERS_CHECK = 0.5  # seconds between checks that a named mapping still has a live user
MAX_PENDING = 32  # connections in the handshake phase at once; more are closed unheard
HANDSHAKE_LIMIT = 5.0  # seconds a connection may take to authenticate (or timeout, if less)
ACCEPT_BACKOFF = 0.05  # seconds to pause accepting when out of descriptors, memory or threads
_PEER_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO})  # accept() failures not worth a pause
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
COUNTERS = ("rejected_foreign", "rejected_busy", "failed_handshakes", "accept_errors")


class Store:
    """The data and the one lock; every op_* method is one client request."""

    def __init__(self, value_type: str | None):
        self.data: dict = {}
        self.cond = threading.Condition(threading.Lock())
        self.holder: threading.Thread | None = None
        self.depth = 0
        self.vt = _codec.VALUE_TYPES[value_type] if value_type else None
        self.tls = threading.local()
        self.requests = 0  # served so far; lets tests count round trips
        self.conn_stats = dict.fromkeys(COUNTERS, 0)  # the gate's counts (see Server.admit)
        self.wrapped = 0  # values stored as (pickle,) rather than as themselves

    # -- the user lock ------------------------------------------------------------

    def _wait_free(self, timeout: float) -> None:
        """With ``cond`` held: wait until no *other* client holds the user lock."""
        me = threading.current_thread()
        deadline = None
        while self.holder is not None and self.holder is not me:
            if not self.holder.is_alive():  # belt and braces; serve() releases on exit
                self.holder, self.depth = None, 0
                break
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout
            if now >= deadline:
                raise LockTimeoutError(
                    f"the mapping is locked by another process and was not released within "
                    f"{timeout:g} s; pass a larger timeout if that is expected"
                )
            self.cond.wait(min(deadline - now, 0.5))

    def _take(self, timeout: float) -> bool:
        try:
            self._wait_free(timeout)
        except LockTimeoutError:
            return False
        self.holder = threading.current_thread()
        self.depth += 1
        return True

    def op_acquire(self, timeout: float) -> bool:
        with self.cond:
            return self._take(timeout)

    def op_release(self) -> None:
        with self.cond:
            self._release_one()

    def _release_one(self) -> None:
        if self.holder is not threading.current_thread():
            raise RuntimeError("release of a lock() this thread does not hold")
        self.depth -= 1
        if self.depth == 0:
            self.holder = None
            self.cond.notify_all()

    def release_all_of(self, thread: threading.Thread) -> None:
        with self.cond:
            if self.holder is thread:
                self.holder, self.depth = None, 0
                self.cond.notify_all()

    # -- reads: never wait for the lock -------------------------------------------

    def op_get(self, key):
        return self.data[key]

    def op_has(self, key) -> bool:
        return key in self.data

    def op_len(self) -> int:
        return len(self.data)

    def op_keys(self) -> list:
        return list(self.data)

    def op_items(self) -> tuple:
        return self.data.copy(), self.wrapped

    # -- writes: wait while another client holds the lock ---------------------------

    def _put(self, key, value) -> None:
        data = self.data
        new = key not in data
        old = None if new else data[key]
        data[key] = value
        self.wrapped += (type(value) is tuple) - (type(old) is tuple)
        self.changed(key, value, new)

    def _removed(self, key, value):
        self.wrapped -= type(value) is tuple
        self.changed(key, REMOVED, False)
        return value

    def changed(self, key, value, new: bool) -> None:
        """Every change goes through here, an update()'s through ``changed_many``, which
        calls this per item unless overridden (``value`` is :data:`REMOVED` for a delete
        and :data:`CLEARED`, with key None, for clear; ``new`` says the key was inserted);
        a subclass may record them (the queue backend's hub pushes them). Markers are
        tuples of str, which no stored value is."""

    def changed_many(self, items: dict) -> None:
        """``changed`` for each of ``items`` (sets of one update), before they are stored."""
        if type(self).changed is not Store.changed:
            data = self.data
            for key, value in items.items():
                self.changed(key, value, key not in data)

    def op_set(self, key, value) -> None:
        with self.cond:
            self._wait_free(self.tls.timeout)
            self._put(key, value)

    def op_del(self, key) -> None:
        with self.cond:
            self._wait_free(self.tls.timeout)
            self._removed(key, self.data.pop(key))

    def op_update(self, items: dict) -> None:
        """Store every item of ``items`` (a dict: a key given twice to ``update()`` was
        merged by the client into its last value, at its first place)."""
        with self.cond:
            self._wait_free(self.tls.timeout)
            data = self.data
            if self.wrapped:
                self.wrapped -= Counter(map(type, map(data.get, items)))[tuple]
            self.wrapped += Counter(map(type, items.values()))[tuple]
            self.changed_many(items)
            data.update(items)

    def op_clear(self) -> None:
        with self.cond:
            self._wait_free(self.tls.timeout)
            self.data.clear()
            self.wrapped = 0
            self.changed(None, CLEARED, False)

    def op_pop(self, key):
        with self.cond:
            self._wait_free(self.tls.timeout)
            return self._removed(key, self.data.pop(key))

    def op_popitem(self):
        with self.cond:
            self._wait_free(self.tls.timeout)
            if not self.data:
                raise KeyError("popitem(): mapping is empty")
            key, value = self.data.popitem()
            return key, self._removed(key, value)

    def op_setdefault(self, key, value):
        with self.cond:
            self._wait_free(self.tls.timeout)
            if key not in self.data:
                self._put(key, value)
            return self.data[key]

    def op_incr(self, key, delta, default):
        from ..base import _add  # the same rule and message as the generic incr

        with self.cond:
            self._wait_free(self.tls.timeout)
            current = _codec.unpack(self.data[key]) if key in self.data else default
            new = _add(key, current, delta)
            if self.vt is not None:
                new = self.vt.coerce(new)
            self._put(key, _codec.pack(new))
            return new

    def op_lock_get(self, key, timeout: float):
        """Take the user lock and read ``key`` in one round trip (for transform/edit)."""
        with self.cond:
            if not self._take(timeout):
                return None
            return (key in self.data, self.data.get(key))

    def op_set_release(self, key, value) -> None:
        with self.cond:
            self._put(key, value)
            self._release_one()

    def op_hello(self, timeout: float) -> int:
        self.tls.timeout = timeout
        return os.getpid()

    def op_info(self) -> dict:
        holder = self.holder
        return {
            "pid": os.getpid(),
            "requests": self.requests,
            "keys": len(self.data),
            "pickled_values": self.wrapped,
            "lock_held": holder is not None,
            "lock_holder": getattr(holder, "client_pid", None) if holder else None,
            **self.conn_stats,
        }


class Server:
    def __init__(self, params: dict):
        self.params = params
        self.store = self.make_store(params)
        self.ops = {
            name[3:]: getattr(self.store, name) for name in dir(self.store) if name.startswith("op_")
        }
        self.authkey: bytes = params["authkey"]
        self.gate = Gate(min(params["timeout"], HANDSHAKE_LIMIT))
        self.uid = os.geteuid()

    def serve(self, conn: Connection) -> None:
        """A connection's thread. Catches everything: the default excepthook would print
        a traceback to the owner's stderr, and a client must not be able to cause one."""
        try:
            if self.admitted(conn):
                self.serve_client(conn)
        except BaseException:
            log.debug("connection thread failed", exc_info=True)
        finally:
            conn.close()

    def admitted(self, conn: Connection) -> bool:
        """The HMAC challenge both ways, within the gate's time limit; False if it failed."""
        fd = conn.fileno()
        limit = self.gate.limit
        try:
            conn_setup(conn, limit, limit)
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
        except Exception as exc:  # wrong key, garbage, EOF, reaped by the gate: all the same
            self.count("failed_handshakes")
            log.debug("handshake failed: %s: %s", type(exc).__name__, exc)
            return False
        finally:
            self.gate.leave(fd)  # before any close: the gate knows connections by descriptor
        return True

    def serve_client(self, conn: Connection) -> None:
        """Serve an authenticated client until it goes away; then release what it held."""
        me = threading.current_thread()
        store = self.store
        store.tls.timeout = self.params["timeout"]
        try:
            conn_setup(conn, 0, self.params["timeout"])  # an idle client may wait forever
            self.loop(conn, me)
        except (EOFError, OSError):
            pass  # the client went away
        finally:
            store.release_all_of(me)
            self.disconnected(me)

    def loop(self, conn: Connection, me: threading.Thread) -> None:
        """Serve one connection's requests until it ends (EOFError/OSError)."""
        recv = conn.recv_bytes
        while True:
            self.handle(conn, me, recv())

    def handle(self, conn: Connection, me: threading.Thread, raw: bytes) -> None:
        """One request: run it and send the reply."""
        try:
            request = _loads(raw)
        except Exception as exc:
            self.store.requests += 1
            conn.send_bytes(_dumps((False, _unloadable(exc)), _PROTO))
            return
        self.dispatch(conn, me, request)

    def dispatch(self, conn: Connection, me: threading.Thread, request: tuple) -> None:
        self.store.requests += 1
        op, *args = request
        if op == "shutdown":
            self.shutdown(conn)
        if op == "hello":
            me.client_pid = args[1]  # type: ignore[attr-defined]
            args = args[:1]
        conn.send_bytes(_dumps(self.run_op(op, args), _PROTO))

    def disconnected(self, me: threading.Thread) -> None:
        """A client connection ended (its lock, if any, is already released)."""

    def make_store(self, params: dict) -> Store:
        return Store(params["value_type"])

    def run_op(self, op: str, args: list) -> tuple:
        """One request's reply: (True, result) or (False, the exception to raise)."""
        try:
            return (True, self.ops[op](*args))
        except BaseException as exc:  # sent back to the caller, raised there
            return (False, exc)

    def shutdown(self, conn: Connection | None) -> None:
        self.remove_record()
        try:
            os.unlink(self.params["address"])  # no one else binds it while we live
        except OSError:
            pass
        if conn is not None:
            try:
                conn.send_bytes(_dumps((True, None), _PROTO))
            except OSError:
                pass
        os._exit(0)

    def remove_record(self) -> None:
        name = self.params.get("name")
        if name is None:
            return
        record = _runtime.read_meta_quiet(name)
        if record is not None and record["fields"].get("authkey") == self.params["authkey"].hex():
            _runtime.remove_meta(name)

    def watch_owner(self) -> None:
        """Exit when the owner process dies, so no server outlives it as an orphan."""
        pid, start = self.params["owner_pid"], self.params["owner_start"]
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = None
        while True:
            if fd is not None:
                select.select([fd], [], [], 5.0)
            else:  # pragma: no cover - kernels without pidfd
                time.sleep(0.2)
            if not _runtime.pid_alive(pid, start):
                self.shutdown(None)

    def watch_users(self) -> None:
        """A named mapping's server lives while the mapping has a live user (its record's
        list, see ``shareit._lifetime``): exit once the record is gone or replaced, or
        (unless persistent) once no user is alive -- removing the record then."""
        from .. import _lifetime
        from ..errors import LockTimeoutError

        name, key = self.params["name"], self.params["authkey"].hex()
        tick = threading.Event()
        while True:
            tick.wait(USERS_CHECK)  # a server's own pace, not a wait for another process
            try:
                with _lifetime.name_lock(name, USERS_CHECK, create=False) as lock:
                    record = _runtime.read_meta_quiet(name)
                    gone = record is None or record["fields"].get("authkey") != key
                    if not gone and not _runtime.in_use(record):
                        _runtime.remove_meta(name)
                        lock["remove"] = True
                        gone = True
            except FileNotFoundError:  # no lock file: the mapping was removed
                gone = True
            except (LockTimeoutError, OSError):
                continue
            if gone:
                self.shutdown(None)

    def run(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = self.params["address"]
        try:
            os.unlink(path)  # a dead server's, in our private dir (its record is gone)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # the socket file: 0600 (its directory is 0700 too)
        try:
            listener.bind(path)
        finally:
            os.umask(old)
        listener.listen(128)
        if self.params["name"] is not None:
            threading.Thread(target=self.watch_users, daemon=True).start()
        elif not self.params["persist"]:
            threading.Thread(target=self.watch_owner, daemon=True).start()
        threading.Thread(target=self.gate.reap, daemon=True).start()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        while True:
            self.admit(listener)

    def admit(self, listener: socket.socket) -> None:
        """Accept one connection and hand it to a thread of its own -- unless it is
        another user's, or too many are already handshaking. Never raises: the accept
        loop dying would make the mapping look lost to every process using it."""
        try:
            sock, _ = listener.accept()
        except OSError as exc:
            self.back_off("accept", exc, exc.errno not in _PEER_GONE)  # EMFILE, ENFILE, ENOMEM...
            return
        try:
            uid = peer_uid(sock)
        except OSError:
            uid = -1
        if uid != self.uid:
            sock.close()
            self.count("rejected_foreign")
            log.debug("closed a connection from uid %s", uid)
            return
        if not self.gate.enter(sock.fileno()):
            sock.close()
            self.count("rejected_busy")
            return
        conn = Connection(sock.detach())
        try:
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()
        except RuntimeError as exc:  # can't start new thread
            self.gate.leave(conn.fileno())
            conn.close()
            self.back_off("start a thread", exc, True)

    def back_off(self, what: str, exc: BaseException, pause: bool) -> None:
        """Count a failure of the accept loop; pause briefly if it was resource exhaustion
        (or unknown), so that the loop neither dies nor spins until it passes."""
        self.count("accept_errors")
        log.debug("could not %s: %s", what, exc)
        if pause:
            time.sleep(ACCEPT_BACKOFF)  # a server shedding load, not waiting on another process

    def count(self, key: str) -> None:
        with self.gate.cond:  # from the accept thread and handshaking threads alike
            self.store.conn_stats[key] += 1


class Gate:
    """The handshake phase: at most ``MAX_PENDING`` connections at once, each for at
    most ``limit`` seconds in all (a per-read timeout alone would let a peer that
    sends a byte now and then take forever). Connections are known by descriptor,
    which stays open while it is here: a thread leaves the gate before closing it."""

    def __init__(self, limit: float):
        self.limit = limit
        self.cond = threading.Condition(threading.Lock())
        self.pending: dict[int, float] = {}  # fd -> deadline (inf once shut down)

    def enter(self, fd: int) -> bool:
        with self.cond:
            if len(self.pending) >= MAX_PENDING:
                return False
            self.pending[fd] = time.monotonic() + self.limit
            self.cond.notify()
            return True

    def leave(self, fd: int) -> None:
        with self.cond:
            self.pending.pop(fd, None)

    def reap(self) -> None:
        """Shut down connections past their deadline; their thread then sees EOF."""
        with self.cond:
            while True:
                now = time.monotonic()
                for fd, deadline in self.pending.items():
                    if deadline <= now:
                        _shut(fd)
                        self.pending[fd] = math.inf
                soonest = min(self.pending.values(), default=math.inf)
                self.cond.wait(None if soonest == math.inf else soonest - now)


def _shut(fd: int) -> None:
    """shutdown() the socket ``fd`` without closing it (its thread does that)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (when it connected or listened)."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]


def conn_setup(conn: Connection, recv_timeout: float, send_timeout: float) -> None:
    """Bound reads and writes on ``conn`` (0: no bound), so a stalled peer cannot hang us.

    With SO_RCVTIMEO/SO_SNDTIMEO a stalled read fails with EAGAIN, which costs
    nothing per call, unlike a ``poll()`` before every ``recv()``.
    """
    sock = socket.socket(fileno=conn.fileno())  # no dup(): it must work with no descriptor to spare
    try:
        for opt, t in ((socket.SO_RCVTIMEO, recv_timeout), (socket.SO_SNDTIMEO, send_timeout)):
            sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", int(t), int((t % 1) * 1e6)))
    finally:
        sock.detach()


def _unloadable(exc: Exception) -> TypeError:
    return TypeError(
        f"the manager server cannot load this key ({type(exc).__name__}: {exc}); "
        f"use keys of built-in types (str, int, bytes, tuples of these)"
    )


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the owner, who shuts us down
    params = pickle.loads(sys.stdin.buffer.read())
    if params.get("hub"):
        from ._queue_hub import HubServer

        HubServer(params).run()
    else:
        Server(params).run()


if __name__ == "__main__":
    main()
