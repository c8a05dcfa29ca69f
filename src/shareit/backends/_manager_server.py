"""The manager backend's server process: holds the data, runs atomic operations.

Started by :mod:`shareit.backends.manager` through :func:`._rpc.start_server`
(isolated, ``python -I``, from ``/``), with its parameters pickled on stdin. It
listens on ``STEM@sock`` in the user's private runtime dir (mode 0700), so no
other user can even connect; the socket, the handshake and its gate, and the
accept loop are :mod:`._rpc`'s (``Listener``), whose counts are in ``info()``.

One thread serves each client connection (an :class:`._rpc.Session`), and a
client uses one connection per thread, so "the session of this call"
identifies the calling client thread. That is what ``lock()`` records as its
holder: when the client dies, its connection ends, its server thread ends, and
the lock is released at once -- no pid polling, no lease.

Values of plain built-in types are kept as themselves, others as ``(pickle,)``
(see ``_codec.pack``): the server never needs the classes of user values, and
``wrapped`` counts the pickled ones so that a snapshot of plain data needs no
per-value decoding in the client. A named mapping's server exits once the
mapping has no live user (``watch_users``) or its record is gone; an anonymous
one's when its creator dies (``pidfd``); any on ``shutdown``.

A server with more to do subclasses :class:`Store` (its mutation steps
``_put``, ``_removed``, ``_update``, ``_clear``) and :class:`Server`
(``make_store``, ``dispatch``, ``run_op``, ``shutdown``), and starts from a
``main()`` of its own.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import Counter
from typing import Any, NoReturn

from .. import _codec, _runtime
from ..errors import LockTimeoutError, lock_timeout
from ._rpc import Listener, Session, boot_params, decode, encode, set_timeouts

USERS_CHECK = 0.5  # seconds between checks that a named mapping still has a live user

Reply = tuple[bool, Any]  # (True, result) or (False, the exception the client raises)


class Store:
    """The data and the one lock; every ``op_*`` method is one client request, called
    with the :class:`Session` that sent it."""

    def __init__(self, value_type: str | None, name: str | None):
        self.data: dict[Any, Any] = {}
        self.cond = threading.Condition(threading.Lock())
        self.holder: Session | None = None
        self.depth = 0
        self.vt = _codec.VALUE_TYPES[value_type] if value_type else None
        self.what = "the mapping" if name is None else f"mapping {name!r}"
        self.requests = 0  # served so far; lets tests count round trips
        self.conn_stats: dict[str, int] = {}  # the accept loop's counts (see _rpc.Listener)
        self.wrapped = 0  # values stored as (pickle,) rather than as themselves

    # -- the user lock ------------------------------------------------------------

    def _wait_free(self, me: Session, timeout: float) -> None:
        """With ``cond`` held: wait until no *other* client holds the user lock."""
        deadline = None
        while self.holder is not None and self.holder is not me:
            if not self.holder.thread.is_alive():  # belt and braces; serve() releases on exit
                self.holder, self.depth = None, 0
                break
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout
            if now >= deadline:
                raise lock_timeout(self.what, timeout, "another process holds lock()")
            self.cond.wait(min(deadline - now, 0.5))

    def _take(self, me: Session, timeout: float) -> bool:
        try:
            self._wait_free(me, timeout)
        except LockTimeoutError:
            return False
        self.holder = me
        self.depth += 1
        return True

    def op_acquire(self, me: Session, timeout: float) -> bool:
        with self.cond:
            return self._take(me, timeout)

    def op_release(self, me: Session) -> None:
        with self.cond:
            self._release_one(me)

    def _release_one(self, me: Session) -> None:
        if self.holder is not me:
            raise RuntimeError("release of a lock() this thread does not hold")
        self.depth -= 1
        if self.depth == 0:
            self.holder = None
            self.cond.notify_all()

    def release_all_of(self, me: Session) -> None:
        with self.cond:
            if self.holder is me:
                self.holder, self.depth = None, 0
                self.cond.notify_all()

    # -- reads: never wait for the lock -------------------------------------------

    def op_get(self, me: Session, key: Any) -> Any:
        return self.data[key]

    def op_has(self, me: Session, key: Any) -> bool:
        return key in self.data

    def op_len(self, me: Session) -> int:
        return len(self.data)

    def op_keys(self, me: Session) -> list[Any]:
        return list(self.data)

    def op_items(self, me: Session) -> tuple[dict[Any, Any], int]:
        return self.data.copy(), self.wrapped

    # -- the mutation steps: every change goes through one of these -----------------

    def _put(self, key: Any, value: Any) -> None:
        data = self.data
        old = data.get(key)
        data[key] = value
        self.wrapped += (type(value) is tuple) - (type(old) is tuple)

    def _removed(self, key: Any, value: Any) -> Any:
        """``key`` and its ``value`` were just taken out of ``data``."""
        self.wrapped -= type(value) is tuple
        return value

    def _update(self, items: dict[Any, Any]) -> None:
        data = self.data
        if self.wrapped:
            self.wrapped -= Counter(map(type, map(data.get, items)))[tuple]
        self.wrapped += Counter(map(type, items.values()))[tuple]
        data.update(items)

    def _clear(self) -> None:
        self.data.clear()
        self.wrapped = 0

    # -- writes: wait while another client holds the lock ---------------------------

    def op_set(self, me: Session, key: Any, value: Any) -> None:
        with self.cond:
            self._wait_free(me, me.timeout)
            self._put(key, value)

    def op_del(self, me: Session, key: Any) -> None:
        with self.cond:
            self._wait_free(me, me.timeout)
            self._removed(key, self.data.pop(key))

    def op_update(self, me: Session, items: dict[Any, Any]) -> None:
        """Store every item of ``items`` (a dict: a key given twice to ``update()`` was
        merged by the client into its last value, at its first place)."""
        with self.cond:
            self._wait_free(me, me.timeout)
            self._update(items)

    def op_clear(self, me: Session) -> None:
        with self.cond:
            self._wait_free(me, me.timeout)
            self._clear()

    def op_pop(self, me: Session, key: Any) -> Any:
        with self.cond:
            self._wait_free(me, me.timeout)
            return self._removed(key, self.data.pop(key))

    def op_popitem(self, me: Session) -> tuple[Any, Any]:
        with self.cond:
            self._wait_free(me, me.timeout)
            if not self.data:
                raise KeyError("popitem(): mapping is empty")
            key, value = self.data.popitem()
            return key, self._removed(key, value)

    def op_setdefault(self, me: Session, key: Any, value: Any) -> Any:
        with self.cond:
            self._wait_free(me, me.timeout)
            if key not in self.data:
                self._put(key, value)
            return self.data[key]

    def op_incr(self, me: Session, key: Any, delta: Any, default: Any) -> Any:
        from ..base import _add  # the same rule and message as the generic incr

        with self.cond:
            self._wait_free(me, me.timeout)
            current = _codec.unpack(self.data[key]) if key in self.data else default
            new = _add(key, current, delta)
            if self.vt is not None:
                new = self.vt.coerce(new)
            self._put(key, _codec.pack(new))
            return new

    def op_lock_get(self, me: Session, key: Any, timeout: float) -> tuple[bool, Any] | None:
        """Take the user lock and read ``key`` in one round trip (for transform/edit)."""
        with self.cond:
            if not self._take(me, timeout):
                return None
            return (key in self.data, self.data.get(key))

    def op_set_release(self, me: Session, key: Any, value: Any) -> None:
        with self.cond:
            self._put(key, value)
            self._release_one(me)

    def op_hello(self, me: Session, timeout: float, pid: int) -> int:
        """A connection's first request: who the client is, and how long its writes wait."""
        me.timeout, me.pid = timeout, pid
        return os.getpid()

    def op_info(self, me: Session) -> dict[str, Any]:
        holder = self.holder
        return {
            "pid": os.getpid(),
            "requests": self.requests,
            "keys": len(self.data),
            "pickled_values": self.wrapped,
            "lock_held": holder is not None,
            "lock_holder": holder.pid if holder is not None else None,
            **self.conn_stats,
        }


class Server:
    """Serves a :class:`Store` to the clients ``_rpc.Listener`` admits; watches its users."""

    def __init__(self, params: dict[str, Any]):
        self.params = params
        self.store = self.make_store(params)
        store = self.store
        self.ops = {name[3:]: getattr(store, name) for name in dir(store) if name.startswith("op_")}
        self.listener = Listener(params["address"], params["authkey"], params["timeout"],
                                 self.serve)
        self.store.conn_stats = self.listener.counts

    def make_store(self, params: dict[str, Any]) -> Store:
        return Store(params["value_type"], params["name"])

    def serve(self, me: Session) -> None:
        """Serve an authenticated client until it goes away; then release what it held."""
        try:
            set_timeouts(me.conn, 0, self.params["timeout"])  # an idle client may wait forever
            recv = me.conn.recv_bytes
            while True:
                self.handle(me, recv())
        except (EOFError, OSError):
            pass  # the client went away
        finally:
            self.store.release_all_of(me)

    def handle(self, me: Session, raw: bytes) -> None:
        """One request: run it and send the reply."""
        try:
            request = decode(raw)
        except Exception as exc:
            self.store.requests += 1
            me.conn.send_bytes(encode((False, _unloadable(exc))))
            return
        self.dispatch(me, request)

    def dispatch(self, me: Session, request: tuple[Any, ...]) -> None:
        self.store.requests += 1
        op, *args = request
        if op == "shutdown":
            self.shutdown(me)
        me.conn.send_bytes(encode(self.run_op(me, op, args)))

    def run_op(self, me: Session, op: str, args: list[Any]) -> Reply:
        """One request's reply: (True, result) or (False, the exception to raise)."""
        try:
            return (True, self.ops[op](me, *args))
        except BaseException as exc:  # sent back to the caller, raised there
            return (False, exc)

    def shutdown(self, me: Session | None) -> NoReturn:
        self.remove_record()
        try:
            os.unlink(self.params["address"])  # no one else binds it while we live
        except OSError:
            pass
        if me is not None:
            try:
                me.conn.send_bytes(encode((True, None)))
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
            fd: int | None = os.pidfd_open(pid)
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

        name, key = self.params["name"], self.params["authkey"].hex()
        tick = threading.Event()
        while True:
            tick.wait(USERS_CHECK)  # a server's own pace, not a wait for another process
            try:
                with _lifetime.name_lock(name, USERS_CHECK, create=False) as lock:
                    record = _runtime.read_meta_quiet(name)
                    gone = record is None or record["fields"].get("authkey") != key
                    if record is not None and not gone and not _runtime.in_use(record):
                        _runtime.remove_meta(name)
                        lock["remove"] = True
                        gone = True
            except FileNotFoundError:  # no lock file: the mapping was removed
                gone = True
            except (LockTimeoutError, OSError):
                continue
            if gone:
                self.shutdown(None)

    def run(self) -> NoReturn:
        self.listener.listen()
        if self.params["name"] is not None:
            threading.Thread(target=self.watch_users, daemon=True).start()
        elif not self.params["persist"]:
            threading.Thread(target=self.watch_owner, daemon=True).start()
        self.listener.run()


def _unloadable(exc: Exception) -> TypeError:
    return TypeError(
        f"the manager server cannot load this key ({type(exc).__name__}: {exc}); "
        f"use keys of built-in types (str, int, bytes, tuples of these)"
    )


def main() -> None:
    Server(boot_params()).run()


if __name__ == "__main__":
    main()
