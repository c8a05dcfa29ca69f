"""The ``queue`` backend: per-process replicas kept fresh by pushed updates.

Features
--------
- Each process keeps its own replica (a plain dict), so a read is a local
  lookup. A hub process (the manager server, extended) holds the
  authoritative state, applies every change in one global order, and pushes
  each change to every replica over a connection of its own.
- ``d[k] = v`` is pipelined: it is sent to the hub and returns without waiting
  for a reply, so a process can issue hundreds of thousands of sets a second.
  The hub applies what arrives in batches, one push per batch.
- Consistency. A read costs no system call when nothing changed: a shared
  8-byte word changes whenever anything changes (a set sent by any process, or
  a change published by the hub), and a replica only looks further when it
  moved. Then it waits until the hub has applied every set that any process
  had finished sending, and applies the pushed changes up to there. So a read
  sees every change completed before it started -- by this process or any
  other, including sets that returned an instant ago (read-your-writes and
  monotonic reads follow). The same barrier runs in the hub before every other
  operation (``incr``, ``del``, ``lock()``, ...) and before a new replica's
  snapshot, so nothing overtakes a set that had returned. ``sync()`` applies
  everything the hub had accepted when it was called; reads need it only to
  act on changes that happen *during* a long computation.
- ``incr``, ``transform``, ``edit``, ``del``, ``update``, ``clear`` and
  ``lock()`` are round trips to the hub (linearizable), as in the ``manager``
  backend. While another process holds ``lock()``, ``d[k] = v`` waits like the
  other writes; a set sent in the instant the lock was being taken is applied
  when it is released.
- Change notification: :meth:`QueueMapping.on_change` registers a callback
  that runs in this process for every change applied to its replica, and
  :meth:`QueueMapping.wait_for_change` blocks until one arrives.
- Attaching, by inheritance or by name, subscribes and receives a snapshot at
  the hub's current change number, then every later change: nothing missed,
  nothing applied twice.
- Faults: an unpicklable value fails in the writer before anything is sent; a
  set that returned is in the hub's socket and is applied even if the writer
  is killed at once; a writer killed in the middle of sending a value changes
  nothing; a replica that stops reading is dropped and resubscribes when it
  reads again; the hub dying gives :class:`~shareit.BackendDiedError` on the
  next operation in every process at once (a watcher thread notices the hang-up
  of the push connection); the hub exits when its owner dies.

Configuration
-------------
``shareit.open("flags", backend="queue")``; in ``shareit.toml``::

    [mappings.flags]
    backend = "queue"
"""

from __future__ import annotations

import mmap
import os
import pickle
import secrets
import select
import struct
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Iterator

from .. import _codec, _runtime
from ..base import MISSING, Capabilities
from ..errors import BackendTimeoutError
from ._manager_server import CLEARED, UPDATED
from ._queue_hub import (
    PREFIX_SHIFT,
    SLOT_BASE,
    W_CHANGE,
    W_LOCKED,
    W_SEQ,
    W_SHUT,
    W_SLOTS_HW,
    WORDS_SIZE,
)
from .manager import ManagerMapping

_loads, _dumps = pickle.loads, pickle.dumps
_PROTO = pickle.HIGHEST_PROTOCOL
_PLAIN, _all_plain = _codec.PLAIN_TYPES, _codec.all_plain
_pack = _codec.pack
_HEADER, _BIG_HEADER = struct.Struct("!i").pack, struct.Struct("!iQ").pack  # connection framing
STALE = -1  # a "last seen change" that no change word ever equals: the next read looks
PIPELINED_KEYS = frozenset({str, int, bytes})  # keys the hub can always load: sets need no reply
DRAIN_AFTER = 32  # a writer applies the hub's confirmations once this many are waiting
READ_CHUNK = 1 << 16  # below malloc's mmap threshold: no mmap/munmap per read
_NO_WORDS = memoryview(bytearray(8 * (SLOT_BASE + 2))).cast("Q")  # before subscribing, after close

_live: "weakref.WeakValueDictionary[int, QueueMapping]" = weakref.WeakValueDictionary()


class QueueMapping(ManagerMapping):
    """A mapping replicated into every process that uses it; reads are local."""

    backend = "queue"
    _prefetch_reads = False  # dict(d) reads the local replica: no snapshot hand-off needed
    capabilities = Capabilities(
        attach_by_name=True,
        ordered=True,
        notes="per-process replicas; reads are local dict lookups; sets are pipelined to a hub",
    )

    def __init__(self, name: str | None, config: Any, address: str, authkey: bytes,
                 **extra: Any):
        super().__init__(name, config, address, authkey, **extra)
        self._seq_path = _runtime.path(_runtime.check_stem(extra["stem"]), "seq")
        self._local: dict = {}  # key -> stored value (plain, or (pickle,)), in the hub's order
        self._fast: dict = {}  # key -> value for plain values: all that __getitem__ looks at
        self._pending: dict = {}  # key -> (prefix, n, stored): own sets not yet confirmed
        self._unacked: dict[int, deque] = {}  # prefix -> (n, key, stored) of own sets, in order
        self._own_slots: set[int] = set()
        self._applied = -1
        self._sub: Any = None
        self._subbuf = bytearray()
        self._w: Any = _NO_WORDS
        self._wmm: Any = None
        self._seen = STALE
        self._hup = False
        self._token = secrets.token_bytes(8)
        self._replica_lock = threading.RLock()
        self._callbacks: list[Callable[[str, Any, Any], None]] = []
        _live[id(self)] = self

    @classmethod
    def _server_extra(cls, stem: str) -> dict:
        return {"hub": True, "stem": stem}

    @classmethod
    def _prepare_server(cls, stem: str) -> None:
        """The words file, ``STEM@seq``: created exclusively, never through a symlink."""
        path = _runtime.path(stem, "seq")
        _unlink_quiet(path)  # a dead owner's, in our own private dir
        fd = _runtime.open_private(path, os.O_RDWR, create=True)
        try:
            os.ftruncate(fd, WORDS_SIZE)
        finally:
            os.close(fd)

    @classmethod
    def _cleanup_record(cls, name: str, record: dict) -> None:
        super()._cleanup_record(name, record)
        _unlink_quiet(_runtime.path(name, "seq"))

    def _forked(self) -> None:
        """In a forked child: the parent's connections and replica state are not ours."""
        self._tls = threading.local()
        self._sub = None
        self._subbuf = bytearray()
        self._own_slots = set()
        self._unacked = {}
        self._token = secrets.token_bytes(8)
        self._replica_lock = threading.RLock()
        self._seen = STALE

    # ------------------------------------------------------------------ connections

    def _hello(self) -> tuple:
        return ("hello", self._config.timeout, os.getpid(), self._token)

    def _conn(self):
        conn = super()._conn()
        if not hasattr(conn, "_qslot"):
            _, slot, prefix = conn._shareit_hello
            conn._qslot, conn._qprefix, conn._qsent = slot, prefix, 0
            conn._qbase, conn._qword = prefix << PREFIX_SHIFT, SLOT_BASE + 2 * slot
            conn._qfd = conn.fileno()
            if slot >= 0:
                self._own_slots.add(slot)
                conn._qunacked = self._unacked[prefix] = deque()
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._tls, "conn", None)
        if conn is not None and getattr(conn, "_qslot", -1) >= 0:
            self._own_slots.discard(conn._qslot)
            self._unacked.pop(conn._qprefix, None)
            # its sets that were sent whole are applied; resubscribe to learn their effect
            self._pending.clear()
            self._seen = STALE
            if self._sub is not None:
                self._unwatch()
                self._sub.close()
                self._sub = None
        super()._drop_conn()

    # ------------------------------------------------------------------ the replica

    def _catch_up(self, own: bool = False) -> None:
        """Make this replica reflect every change completed anywhere before this call.

        With ``own``, this process's own sets are waited for too: its replica then
        holds the hub's order, not only its contents (for iteration)."""
        self._check_open()
        with self._replica_lock:
            if self._sub is None:
                self._subscribe()
                return
            w = self._w
            if self._hup or w[W_SHUT]:
                self._check_alive()
            change = w[W_CHANGE]
            self._wait_for_sets(own)
            target = w[W_SEQ]
            if target > self._applied:
                self._drain(target)
            self._seen = change

    def _wait_for_sets(self, own: bool) -> None:
        """Wait until the hub has applied every set that another replica (or, with ``own``,
        this one too) finished sending."""
        w, own = self._w, (() if own else self._own_slots)
        deadline = None
        while True:
            for slot in range(w[W_SLOTS_HW]):
                i = SLOT_BASE + 2 * slot
                if w[i + 1] < w[i] and slot not in own:
                    break
            else:
                return
            now = time.monotonic()
            if deadline is None:
                deadline = now + self._config.timeout
            elif now >= deadline:
                raise BackendTimeoutError(
                    f"the hub of mapping {self._label()} did not apply sets sent by another "
                    f"process within {self._config.timeout:g} s: it is stopped or overloaded"
                )
            self._drain_some(0.0005)

    def _subscribe(self) -> None:
        if self._sub is not None:
            self._unwatch()
            self._sub.close()
        self._sub = None
        if self._wmm is None:
            try:
                fd = _runtime.open_private(self._seq_path, os.O_RDWR)
            except FileNotFoundError:
                raise self._died(FileNotFoundError(self._seq_path)) from None
            try:
                self._wmm = mmap.mmap(fd, WORDS_SIZE)
            finally:
                os.close(fd)
            self._w = memoryview(self._wmm).cast("Q")
        change = self._w[W_CHANGE]
        conn = self._connect()
        try:
            conn.send_bytes(_dumps(("subscribe", self._token), _PROTO))
            seq, data, acked = _loads(conn.recv_bytes())
        except (OSError, EOFError) as exc:
            conn.close()
            raise self._died(exc) from None
        old = self._local
        for key, (prefix, n, stored) in list(self._pending.items()):
            if acked.get(prefix, n) >= n:  # in the snapshot (a connection gone had all applied)
                del self._pending[key]
            else:
                data[key] = stored  # not applied yet: this replica still shows its own set
        for prefix, queue in self._unacked.items():
            done = acked.get(prefix, -1)
            while queue and queue[0][0] <= done:
                queue.popleft()
        self._set_all(data)
        self._applied = seq
        self._sub, self._subbuf, self._hup = conn, bytearray(), False
        self._watch()
        self._seen = change
        if self._callbacks and old is not data:
            self._notify_resync(old, data)

    def _read_pushes(self, timeout: float | None) -> list:
        """Every whole push message now available (waiting up to ``timeout`` for one)."""
        sub, buf, out = self._sub, self._subbuf, []
        fd = sub.fileno()
        while True:
            pos, end = 0, len(buf)
            while end - pos >= 4:
                size = int.from_bytes(buf[pos:pos + 4], "big", signed=True)
                start = pos + 4
                if size == -1:
                    if end - pos < 12:
                        break
                    size, start = int.from_bytes(buf[pos + 4:pos + 12], "big"), pos + 12
                if end - start < size:
                    break
                out.append(_loads(buf[start:start + size]))
                pos = start + size
            if pos:
                del buf[:pos]
            if out:
                return out
            if timeout is not None and not sub.poll(timeout):
                return out
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                raise EOFError
            buf += chunk
            timeout = None  # a message has started: wait for the rest of it

    def _drain(self, target: int) -> None:
        """Apply pushed changes until this replica has applied change ``target``."""
        while self._applied < target:
            try:
                for msg in self._read_pushes(None):
                    self._apply(msg)
            except (OSError, EOFError):
                self._subscribe()  # dropped (we were stopped) or the hub died: try again

    def _drain_some(self, timeout: float) -> None:
        try:
            for msg in self._read_pushes(timeout):
                self._apply(msg)
        except (OSError, EOFError):
            self._subscribe()

    def _apply(self, msg: tuple) -> None:
        seq, effects, prefix, n = msg[:4]
        if seq <= self._applied:
            return  # already in the snapshot we subscribed with
        if effects is None:
            self._confirmed(prefix, n, msg[4])
        elif self._pending:
            self._apply_merging(effects, prefix, n)
        else:
            local, fast, notify = self._local, self._fast, self._callbacks
            for key, value, _new in effects:
                if type(value) is tuple and type(value[0]) is str:  # a marker, not a value
                    if value == CLEARED:
                        local.clear()
                        fast.clear()
                        notify and self._notify("clear", None, None)
                    elif value == UPDATED:  # one update(): ``key`` holds its items
                        self._apply_update(key)
                    else:  # REMOVED
                        local.pop(key, None)
                        fast.pop(key, None)
                        notify and self._notify("del", key, None)
                else:
                    local[key] = value
                    if type(value) in _PLAIN:
                        fast[key] = value
                    else:
                        fast.pop(key, None)
                    notify and self._notify("set", key, value)
        self._applied = seq

    def _apply_update(self, items: dict) -> None:
        """One ``update()`` at the hub: its items, stored forms, in the hub's order."""
        if _all_plain(items.values()):
            self._local.update(items)
            self._fast.update(items)
        else:
            for key, value in items.items():
                self._store_local(key, value)
        if self._callbacks:
            for key, value in items.items():
                self._notify("set", key, value)

    def _apply_merging(self, effects: list, prefix: int, n: int) -> None:
        """Apply changes while own sets are in flight: those come later in the hub's order,
        so they win over any change pushed before them."""
        local = self._local
        for key, value, new in effects:
            if type(value) is tuple and value == CLEARED:
                keep = {k: local[k] for k in self._pending if k in local}
                self._set_all({})
                self._notify("clear", None, None)
                for k, v in keep.items():
                    self._store_local(k, v)
                local = self._local
            elif type(value) is tuple and value == UPDATED:
                for k, v in key.items():  # (``new``: the keys it inserted, or True for all)
                    self._merge_one(k, v, new is True or k in new, prefix, n)
            else:
                self._merge_one(key, value, new, prefix, n)

    def _merge_one(self, key: Any, value: Any, new: bool, prefix: int, n: int) -> None:
        local, pending = self._local, self._pending
        p = pending.get(key)
        if p is not None:
            if p[0] == prefix and p[1] <= n:
                del pending[key]  # our own set, by a round trip on the same connection
            else:
                if new and key in local:  # the hub inserted it here: keep its order
                    local[key] = local.pop(key)
                return
        if type(value) is tuple and type(value[0]) is str:  # REMOVED
            local.pop(key, None)
            self._fast.pop(key, None)
            self._notify("del", key, None)
        else:
            self._store_local(key, value)
            self._notify("set", key, value)

    def _confirmed(self, prefix: int, n: int, news: list) -> None:
        """The hub applied this replica's own sets up to number ``n`` on connection ``prefix``."""
        queue = self._unacked.get(prefix)
        if queue is None:
            return
        pending, local = self._pending, self._local
        news = set(news)
        while queue and queue[0][0] <= n:
            m, key, stored = queue.popleft()
            p = pending.get(key)
            if p is not None and p[0] == prefix and p[1] == m:
                del pending[key]
            elif p is None:
                self._store_local(key, stored)  # another thread's set came first at the hub
            # else a later set of ours to this key is in flight: it shows already
            if m in news and key in local:
                local[key] = local.pop(key)  # inserted at the hub now: that is its place
            self._notify("set", key, stored)

    def _store_local(self, key: Any, stored: Any) -> None:
        self._local[key] = stored
        if type(stored) in _PLAIN:
            self._fast[key] = stored
        else:
            self._fast.pop(key, None)

    def _set_all(self, data: dict) -> None:
        self._local = data
        if _all_plain(data.values()):  # (attach of 100k keys)
            self._fast = data.copy()
        else:
            self._fast = {k: v for k, v in data.items() if type(v) in _PLAIN}

    def _check_alive(self) -> None:
        """The watcher saw the push connection hang up: the hub is gone or dropped us."""
        self._hup = False
        if self._w[W_SHUT]:
            raise self._died(EOFError("the hub shut down"))
        try:
            while self._sub.poll(0):
                for msg in self._read_pushes(0):
                    self._apply(msg)
        except (OSError, EOFError):
            self._subscribe()  # raises BackendDiedError if the hub is gone

    def _pushed(self, seq: int) -> None:
        if self._sub is not None and seq > self._applied:
            with self._replica_lock:
                self._drain(seq)  # our own change, and everything before it, is applied

    def sync(self) -> None:
        """Apply every change the hub had accepted when ``sync()`` was called (sets any
        process had sent included)."""
        if self._sub is None:
            self._catch_up()  # subscribe
        self._call("seq")  # the hub's barrier runs first; the reply's change number is drained
        self._catch_up(own=True)  # and this replica notes the change word it is now fresh for

    # ------------------------------------------------------------------ reads: local

    def _fresh(self) -> dict:
        if self._w[W_CHANGE] != self._seen:
            self._catch_up()
        return self._local

    def _in_order(self) -> dict:
        """The replica in the hub's order: own sets of new keys take their place there
        once the hub confirms them, so wait for that when some are in flight."""
        if self._w[W_CHANGE] != self._seen or self._pending:
            self._catch_up(own=bool(self._pending))
        return self._local

    def __getitem__(self, key: Any) -> Any:
        if self._w[W_CHANGE] != self._seen:
            self._catch_up()
        try:
            return self._fast[key]
        except (KeyError, TypeError):
            pass
        try:
            stored = self._local[key]
        except KeyError:
            if self._declared is not None:
                self._check_key(key)
            raise KeyError(key) from None
        return _loads(stored[0])

    def __contains__(self, key: Any) -> bool:
        return key in self._fresh()

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._in_order()))

    def __len__(self) -> int:
        return len(self._fresh())

    def snapshot(self) -> dict:
        data = dict(self._in_order())
        for k, v in data.items():
            if type(v) is tuple:
                data[k] = _loads(v[0])
        return data

    # ------------------------------------------------------------------ writes

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._declared is not None or type(key) not in PIPELINED_KEYS:
            key = self._check_key(key)
        stored = _pack(value if self._vt is None else self._vt.coerce(value))
        conn = getattr(self._tls, "conn", None)
        if (conn is None or self._w[W_LOCKED] or self._sub is None or conn._qslot < 0
                or type(key) not in PIPELINED_KEYS):
            self._set_slow(key, stored)
        else:
            self._send_set(conn, key, stored)

    def _set_slow(self, key: Any, stored: Any) -> None:
        if self._sub is None:
            self._catch_up()
        conn = self._conn()
        if self._w[W_LOCKED] or conn._qslot < 0 or type(key) not in PIPELINED_KEYS:
            self._call("set", key, stored)  # waits for another process's lock(), with its timeout
        else:
            self._send_set(conn, key, stored)

    def _send_set(self, conn: Any, key: Any, stored: Any) -> None:
        """Pipeline one set: once the request is in the hub's socket it will be applied."""
        data = _dumps(("aset", key, stored), _PROTO)
        size = len(data)
        frame = (_HEADER(size) if size < 0x7FFFFFFF else _BIG_HEADER(-1, size)) + data
        done = 0
        try:
            done = os.write(conn._qfd, frame)
            while done < len(frame):  # a large value, or a signal: send the rest
                done += os.write(conn._qfd, memoryview(frame)[done:])
        except OSError as exc:
            self._drop_conn()
            raise self._died(exc) from None
        except BaseException:
            if done:  # (KeyboardInterrupt between two writes) the hub drops the part sent
                self._drop_conn()
            raise
        n = conn._qsent = conn._qsent + 1
        w = self._w
        w[conn._qword] = n  # counted: every read and hub operation now waits for it
        w[W_CHANGE] = conn._qbase | n
        self._pending[key] = (conn._qprefix, n, stored)
        conn._qunacked.append((n, key, stored))
        self._local[key] = stored  # (_store_local, inline)
        if type(stored) in _PLAIN:
            self._fast[key] = stored
        else:
            self._fast.pop(key, None)
        if w[W_SEQ] - self._applied > DRAIN_AFTER:
            with self._replica_lock:
                self._drain(w[W_SEQ])

    # ------------------------------------------------------------------ notification

    def on_change(self, callback: Callable[[str, Any, Any], None]) -> None:
        """Call ``callback(kind, key, value)`` for every change applied to this process's replica.

        ``kind`` is ``"set"`` (with the new value), ``"del"`` or ``"clear"``
        (key and value None). Callbacks run in this process, in the thread
        that applies the change (any read, write, :meth:`sync` or
        :meth:`wait_for_change`), in the hub's order, from the moment of this call
        (this replica subscribes now if it had not yet). This process's own sets
        are notified when the hub confirms them.
        """
        self._catch_up()
        self._callbacks.append(callback)

    def wait_for_change(self, timeout: float | None = None) -> bool:
        """Block until a change from any process reaches this replica; False on timeout."""
        self._catch_up()
        applied = self._applied
        deadline = time.monotonic() + (self._config.timeout if timeout is None else timeout)
        with self._replica_lock:
            while self._applied == applied:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._drain_some(left)
        self._catch_up()
        return True

    def _notify(self, kind: str, key: Any, value: Any) -> None:
        for fn in self._callbacks:
            fn(kind, key, None if value is None else _codec.unpack(value))

    def _notify_resync(self, old: dict, new: dict) -> None:
        for key in old.keys() - new.keys():
            self._notify("del", key, None)
        for key, value in new.items():
            if old.get(key, MISSING) != value:
                self._notify("set", key, value)

    # ------------------------------------------------------------------ lifetime

    def _watch(self) -> None:
        _watcher().add(self._sub.fileno(), self)

    def _unwatch(self) -> None:
        if self._sub is not None:
            _watcher().remove(self._sub.fileno())

    def _close(self) -> None:
        if self._sub is not None:
            self._unwatch()
            self._sub.close()
        self._sub = None
        self._w = _NO_WORDS
        self._seen = STALE
        if self._wmm is not None:
            self._wmm.close()
            self._wmm = None
        self._local, self._fast, self._pending = {}, {}, {}
        _live.pop(id(self), None)
        super()._close()

    def _destroy(self) -> None:
        super()._destroy()
        _unlink_quiet(self._seq_path)


class _Watcher:
    """One thread per process that marks a replica stale when its push connection hangs
    up (the hub died, or dropped a replica that stopped reading), so that reads need no
    time check of their own to notice within a second."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refs: dict[int, weakref.ref] = {}
        self.poller = select.poll()
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.poller.register(self.wake_r, select.POLLIN)
        threading.Thread(target=self.run, name="shareit-queue-watcher", daemon=True).start()

    def add(self, fd: int, m: QueueMapping) -> None:
        with self.lock:
            self.refs[fd] = weakref.ref(m)
            self.poller.register(fd, select.POLLRDHUP)
        self._wake()

    def remove(self, fd: int) -> None:
        with self.lock:
            if self.refs.pop(fd, None) is not None:
                self.poller.unregister(fd)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass

    def run(self) -> None:
        while True:
            for fd, _events in self.poller.poll():
                if fd == self.wake_r:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                with self.lock:
                    ref = self.refs.pop(fd, None)
                    if ref is not None:
                        self.poller.unregister(fd)
                m = ref() if ref is not None else None
                if m is not None:
                    m._hup = True
                    m._seen = STALE


_the_watcher: _Watcher | None = None
_watcher_lock = threading.Lock()


def _watcher() -> _Watcher:
    global _the_watcher
    if _the_watcher is None:
        with _watcher_lock:
            if _the_watcher is None:
                _the_watcher = _Watcher()
    return _the_watcher


def _after_fork_in_child() -> None:
    global _the_watcher, _watcher_lock
    _the_watcher, _watcher_lock = None, threading.Lock()  # its thread is not in the child
    for m in list(_live.values()):
        m._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _unlink_quiet(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
