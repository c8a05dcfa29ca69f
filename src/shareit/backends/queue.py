"""The ``queue`` backend: per-process replicas kept fresh by pushed updates.

Features
--------
- Each process keeps its own replica (a plain dict), so a read is a local
  lookup. A hub process (the manager server, extended) holds the
  authoritative state, applies every change in one global order, numbers it,
  and pushes it to every replica over a connection of its own.
- Every write (``d[k] = v``, ``del``, ``incr``, ``update``, ``clear``,
  ``transform``, ``edit``, ``lock()``) is a round trip to the hub, as in the
  ``manager`` backend. The queue backend is for many readers of data that
  changes rarely; its writes cost what the manager's cost.
- Linearizable, simply. Before replying to a write, the hub publishes the
  change's number in a shared 8-byte word, and only then pushes the change. A
  read compares that word with the number its replica has applied -- no system
  call when nothing changed -- and when it is behind, applies pushed changes
  until it has caught up. So a read sees every write that returned anywhere
  before it began, and no replica ever shows a change before every later read
  would see it too.
- Change notification: :meth:`QueueMapping.on_change` registers a callback
  that runs in this process for every change applied to its replica, and
  :meth:`QueueMapping.wait_for_change` blocks until one arrives.
- Attaching, by inheritance or by name, subscribes and receives a snapshot at
  the hub's current change number, then every later change: nothing missed,
  nothing applied twice.
- Faults: the hub never waits for a replica: a replica that stops reading is
  dropped (its connection is shut down) once its backlog passes a bound, and
  resubscribes with a fresh snapshot when it reads again. The hub dying gives
  :class:`~shareit.BackendDiedError` on the next operation in every process
  (a watcher thread notices the push connection hang up; it exits when no
  replica is left). A stopped hub gives :class:`~shareit.BackendTimeoutError`
  after ``timeout``. The hub exits when its owner dies.

Configuration
-------------
``shareit.open("flags", backend="queue")``; in ``shareit.toml``::

    [mappings.flags]
    backend = "queue"
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from mmap import mmap
from typing import Any, ClassVar

from .. import _codec, _runtime
from ..base import MISSING, Capabilities
from ..config import Config
from ..errors import BackendTimeoutError
from . import _queue_watch
from ._queue_wire import (
    CLEARED,
    UPDATED,
    W_SEQ,
    W_SHUT,
    WORDS_SIZE,
    create_words,
    map_words,
    remove_words,
    words_path,
)
from ._rpc import FrameReader, Link, decode, encode
from .manager import ManagerMapping

_PLAIN, _all_plain = _codec.PLAIN_TYPES, _codec.all_plain
_pack = _codec.pack
STALE = -1  # a "last seen change" that the change word never equals: the next read looks
_NO_WORDS = memoryview(bytearray(WORDS_SIZE)).cast("Q")  # before subscribing, after close

_live: weakref.WeakValueDictionary[int, QueueMapping] = weakref.WeakValueDictionary()


class QueueMapping(ManagerMapping):
    """A mapping replicated into every process that uses it; reads are local."""

    backend = "queue"
    capabilities = Capabilities(
        attach_by_name=True,
        ordered=True,
        notes="per-process replicas; reads are local dict lookups; writes are hub round trips",
    )

    server_module: ClassVar[str] = "shareit.backends._queue_hub"
    server_title: ClassVar[str] = "queue hub"

    def __init__(self, name: str | None, config: Config, address: str, authkey: bytes,
                 stem: str | None = None):
        super().__init__(name, config, address, authkey, stem)
        self._seq_path = words_path(_runtime.check_stem(stem))
        self._local: dict[Any, Any] = {}  # key -> stored value (plain, or (pickle,)), hub order
        self._fast: dict[Any, Any] = {}  # key -> value for plain values: all __getitem__ reads
        self._applied = -1  # the number of the last change applied to the replica
        self._sub: Link | None = None  # the push connection
        self._frames: FrameReader | None = None  # its frames
        self._w: memoryview = _NO_WORDS
        self._wmm: mmap | None = None
        self._seen = STALE  # the change word's value this replica is known fresh for
        self._hup = False
        self._replica_lock = threading.RLock()
        self._callbacks: list[Callable[[str, Any, Any], None]] = []
        _live[id(self)] = self

    @classmethod
    def _prepare_server(cls, stem: str) -> None:
        create_words(stem)

    @classmethod
    def _unprepare_server(cls, stem: str) -> None:
        remove_words(stem)

    @classmethod
    def _cleanup_record(cls, name: str, record: Mapping[str, Any]) -> None:
        super()._cleanup_record(name, record)
        remove_words(name)

    def _forked(self) -> None:
        """In a forked child: the parent's connections and push stream are not ours."""
        self._tls = threading.local()
        if self._sub is not None:
            self._sub.conn.close()  # this process's copy of the descriptor only
        self._sub = self._frames = None
        self._replica_lock = threading.RLock()
        self._seen = STALE
        self._hup = False

    # ------------------------------------------------------------------ the replica

    def _catch_up(self) -> None:
        """Make this replica reflect every change that completed anywhere before this call."""
        self._check_open()
        with self._replica_lock:
            if self._sub is None:
                self._subscribe()
                return
            w = self._w
            if self._hup or w[W_SHUT]:
                self._check_alive()
            target = w[W_SEQ]
            if target > self._applied:
                self._drain(target, time.monotonic() + self._config.timeout)
            self._seen = target

    def _map_words(self) -> None:
        try:
            self._wmm, self._w = map_words(self._seq_path)
        except FileNotFoundError:
            raise self._died(FileNotFoundError(self._seq_path)) from None

    def _subscribe(self) -> None:
        """(Re)subscribe: a snapshot at the hub's current change number, then its pushes."""
        if self._sub is not None:
            self._unwatch()
            self._sub.conn.close()
        self._sub = self._frames = None
        if self._wmm is None:
            self._map_words()
        link = self._connect()
        try:
            link.conn.send_bytes(encode(("subscribe",)))
            seq, data = decode(link.conn.recv_bytes())
        except (OSError, EOFError) as exc:
            link.conn.close()
            raise self._died(exc) from None
        old = self._local
        self._set_all(data)
        self._applied = seq
        self._sub, self._frames, self._hup = link, FrameReader(link.conn.fileno()), False
        self._watch()
        self._seen = seq  # the word was at most seq when the hub took the snapshot
        if self._callbacks and old is not data:
            self._notify_resync(old, data)

    def _read_pushes(self, timeout: float) -> list[Any]:
        """Every whole push message now available, waiting up to ``timeout`` s for one."""
        assert self._frames is not None  # (subscribed)
        return self._frames.read(timeout)

    def _drain(self, target: int, deadline: float) -> None:
        """Apply pushed changes until change ``target`` is applied; BackendTimeoutError if
        the hub sends nothing until ``deadline`` (stopped or overloaded)."""
        while self._applied < target:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendTimeoutError(
                    f"the hub of mapping {self._label()} did not send change {target} within "
                    f"{self._config.timeout:g} s: it is stopped or overloaded"
                )
            try:
                for msg in self._read_pushes(left):
                    self._apply(msg)
            except (OSError, EOFError):
                self._subscribe()  # dropped (we stopped reading) or the hub died: start over

    def _apply(self, msg: tuple[int, list[tuple[Any, Any]]]) -> None:
        seq, effects = msg
        if seq <= self._applied:
            return  # already in the snapshot we subscribed with
        local, fast, notify = self._local, self._fast, self._callbacks
        for key, value in effects:
            if type(value) is tuple and type(value[0]) is str:  # a marker, not a value
                if value == CLEARED:
                    local.clear()
                    fast.clear()
                    if notify:
                        self._notify("clear", None, None)
                elif value == UPDATED:  # one update(): ``key`` holds its items
                    self._apply_update(key)
                else:  # REMOVED
                    local.pop(key, None)
                    fast.pop(key, None)
                    if notify:
                        self._notify("del", key, None)
            else:
                self._store_local(key, value)
                if notify:
                    self._notify("set", key, value)
        self._applied = seq

    def _apply_update(self, items: dict[Any, Any]) -> None:
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

    def _store_local(self, key: Any, stored: Any) -> None:
        self._local[key] = stored
        if type(stored) in _PLAIN:
            self._fast[key] = stored
        else:
            self._fast.pop(key, None)

    def _set_all(self, data: dict[Any, Any]) -> None:
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
            for msg in self._read_pushes(0):
                self._apply(msg)
            self._read_pushes(0)  # EOFError once everything before the hang-up is applied
        except (OSError, EOFError):
            self._subscribe()  # raises BackendDiedError if the hub is gone

    def sync(self) -> None:
        """Apply every change the hub had made when ``sync()`` was called. Reads need it
        only to act on changes made *during* a long computation: each read catches up."""
        self._catch_up()

    # ------------------------------------------------------------------ reads: local

    def _fresh(self) -> dict[Any, Any]:
        if self._w[W_SEQ] != self._seen:
            self._catch_up()
        return self._local

    def __getitem__(self, key: Any) -> Any:
        if self._w[W_SEQ] != self._seen:
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
        return decode(stored[0])

    def __contains__(self, key: Any) -> bool:
        return key in self._fresh()

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._fresh()))

    def __len__(self) -> int:
        return len(self._fresh())

    def snapshot(self) -> dict[Any, Any]:
        data = dict(self._fresh())
        for k, v in data.items():
            if type(v) is tuple:
                data[k] = decode(v[0])
        return data

    # ------------------------------------------------------------------ writes

    def __setitem__(self, key: Any, value: Any) -> None:
        key = self._check_key(key)
        self._call("set", key, _pack(value if self._vt is None else self._vt.coerce(value)))

    # ------------------------------------------------------------------ notification

    def on_change(self, callback: Callable[[str, Any, Any], None]) -> None:
        """Call ``callback(kind, key, value)`` for every change applied to this process's replica.

        ``kind`` is ``"set"`` (with the new value), ``"del"`` or ``"clear"``
        (key and value None). Callbacks run in this process, in the thread
        that applies the change (any read, :meth:`sync` or
        :meth:`wait_for_change`), in the hub's order, from the moment of this
        call (this replica subscribes now if it had not yet). This process's
        own writes are notified like everyone else's, when their push arrives.
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
                try:
                    for msg in self._read_pushes(left):
                        self._apply(msg)
                except (OSError, EOFError):
                    self._subscribe()
        self._catch_up()
        return True

    def _notify(self, kind: str, key: Any, value: Any) -> None:
        for fn in self._callbacks:
            fn(kind, key, None if value is None else _codec.unpack(value))

    def _notify_resync(self, old: dict[Any, Any], new: dict[Any, Any]) -> None:
        for key in old.keys() - new.keys():
            self._notify("del", key, None)
        for key, value in new.items():
            if old.get(key, MISSING) != value:
                self._notify("set", key, value)

    # ------------------------------------------------------------------ lifetime

    def _watch(self) -> None:
        assert self._sub is not None
        _queue_watch.watch(self._sub.conn.fileno(), self)

    def _unwatch(self) -> None:
        if self._sub is not None:
            _queue_watch.unwatch(self._sub.conn.fileno())

    def hung_up(self) -> None:
        """The push connection hung up (see ``_queue_watch``): the next read looks."""
        self._hup = True
        self._seen = STALE

    def _close(self) -> None:
        if self._sub is not None:
            self._unwatch()
            self._sub.conn.close()
        self._sub = self._frames = None
        self._seen = STALE
        if self._wmm is not None:
            w, self._w = self._w, _NO_WORDS
            w.release()  # no view may outlive the map: mmap.close() would raise BufferError
            self._wmm.close()
            self._wmm = None
        self._local, self._fast = {}, {}
        _live.pop(id(self), None)
        super()._close()

    def _remove_server_files(self) -> None:
        super()._remove_server_files()
        try:
            os.unlink(self._seq_path)
        except FileNotFoundError:
            pass


def _after_fork_in_child() -> None:
    for m in list(_live.values()):
        m._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
