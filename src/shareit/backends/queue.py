"""The ``queue`` backend: per-process replicas kept fresh by pushed updates.

Features
--------
- Each process keeps its own replica (a plain dict), so a read is a local
  lookup. A hub process (the manager server, extended) holds the
  authoritative state, applies every change in one global order, and pushes
  each change to every replica over a connection of its own.
- A read costs no system call when nothing changed: the hub stores the
  number of its last change in a shared 8-byte word, and a replica drains
  the pushed changes only when that word moved. Every read therefore sees
  every change completed before it, in any process (read-your-writes and
  monotonic reads follow). ``sync()`` makes this replica apply everything the
  hub had accepted when it was called.
- Writes, ``incr``, ``transform``, ``edit`` and ``lock()`` go through the hub
  (linearizable), as in the ``manager`` backend; a write returns after its own
  change is applied to this process's replica.
- Change notification: :meth:`QueueMapping.on_change` registers a callback
  that runs in this process for every change applied to its replica, and
  :meth:`QueueMapping.wait_for_change` blocks until one arrives.
- Attaching, by inheritance or by name, subscribes first and receives a
  snapshot at the hub's current change number, then every later change:
  nothing missed, nothing applied twice.
- Faults: an unpicklable value fails in the writer before anything is sent;
  a killed writer's acknowledged change is already in the hub; a replica
  that stops reading is dropped and resubscribes when it reads again; the hub
  dying gives :class:`~shareit.BackendDiedError` on the next write at once and
  on the next read within 0.25 s; the hub exits when its owner dies.

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
import time
from typing import Any, Callable, Iterator

from .. import _runtime
from ..base import MISSING, Capabilities
from ..errors import ClosedError
from ._manager_server import CLEARED
from .manager import ManagerMapping

_loads = pickle.loads
_monotonic = time.monotonic
ALIVE_CHECK = 0.25  # seconds between checks that the hub is still there, on reads


class _ClosedReplica(dict):
    def __missing__(self, key: Any) -> Any:
        raise ClosedError("this queue mapping is closed in this process; open it again by name")


class QueueMapping(ManagerMapping):
    """A mapping replicated into every process that uses it; reads are local."""

    backend = "queue"
    _server_extra_fields = ("seq_path",)
    _prefetch_reads = False  # dict(d) reads the local replica: no snapshot hand-off needed
    capabilities = Capabilities(
        attach_by_name=True,
        ordered=True,
        notes="per-process replicas; reads are local dict lookups; writes go through a hub",
    )

    def __init__(self, name: str | None, config: Any, address: str, authkey: bytes,
                 **extra: Any):
        super().__init__(name, config, address, authkey, **extra)
        self._seq_path: str = extra["seq_path"]
        self._local: dict = {}
        self._applied = -1
        self._sub: Any = None
        self._sub_gen = -1
        self._seqmm: Any = None
        self._seqw: Any = None
        self._next_check = 0.0
        self._callbacks: list[Callable[[str, Any, Any], None]] = []

    @classmethod
    def _server_extra(cls, name: str | None) -> dict:
        stem = name if name is not None else f"anon-{os.getpid()}-{secrets.token_hex(5)}"
        path = os.path.join(_runtime.runtime_dir(), f"{_runtime.PREFIX}{stem}.seq")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, 8)
        finally:
            os.close(fd)
        return {"hub": True, "seq_path": path}

    @classmethod
    def _cleanup_record(cls, name: str, record: dict) -> None:
        super()._cleanup_record(name, record)
        _unlink_quiet(record.get("seq_path"))

    # ------------------------------------------------------------------ the replica

    def _refresh(self) -> None:
        """Bring the replica up to the hub's last published change (subscribing if needed)."""
        self._check_open()
        if self._sub is None or self._sub_gen != _runtime.fork_generation:
            self._subscribe()
        target = self._seqw[0]
        if target > self._applied:
            self._drain(target)

    def _subscribe(self) -> None:
        if self._sub is not None and self._sub_gen == _runtime.fork_generation:
            self._sub.close()
        self._sub = None
        if self._seqw is None:
            try:
                fd = os.open(self._seq_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise self._died(FileNotFoundError(self._seq_path)) from None
            try:
                self._seqmm = mmap.mmap(fd, 8, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self._seqw = memoryview(self._seqmm).cast("Q")
        conn = self._connect()
        try:
            conn.send_bytes(pickle.dumps(("subscribe",)))
            seq, data = _loads(conn.recv_bytes())
        except (OSError, EOFError) as exc:
            conn.close()
            raise self._died(exc) from None
        old = self._local
        self._local, self._applied = data, seq
        self._sub, self._sub_gen = conn, _runtime.fork_generation
        self._next_check = _monotonic() + ALIVE_CHECK
        if self._callbacks and old is not data:
            self._notify_resync(old, data)

    def _drain(self, target: int) -> None:
        """Apply pushed changes until this replica has applied change ``target``."""
        while self._applied < target:
            try:
                raw = self._sub.recv_bytes()
            except (OSError, EOFError):
                self._subscribe()  # dropped (we were stopped) or the hub died: try again
                continue
            self._apply(*_loads(raw))

    def _apply(self, seq: int, effects: list) -> None:
        if seq <= self._applied:
            return  # already in the snapshot we subscribed with
        local = self._local
        for key, value in effects:
            if type(value) is tuple and type(value[0]) is str:  # a marker, not a stored value
                if value == CLEARED:
                    local.clear()
                    self._notify("clear", None, None)
                else:  # REMOVED
                    local.pop(key, None)
                    self._notify("del", key, None)
            else:
                local[key] = value
                self._notify("set", key, value)
        self._applied = seq

    def _check_alive(self) -> None:
        """Notice a dead hub on reads too (at most every ALIVE_CHECK seconds)."""
        self._next_check = _monotonic() + ALIVE_CHECK
        sub = self._sub
        try:
            if sub.poll(0):  # pushed changes, or EOF because the hub went away
                raw = sub.recv_bytes()
                self._apply(*_loads(raw))
        except (OSError, EOFError):
            self._subscribe()  # raises BackendDiedError if the hub is gone

    def _pushed(self, seq: int) -> None:
        if self._sub is not None and self._sub_gen == _runtime.fork_generation:
            if seq > self._applied:
                self._drain(seq)  # read-your-writes: our own change is applied before we return

    def sync(self) -> None:
        """Apply every change the hub had accepted when ``sync()`` was called."""
        self._refresh()
        self._call("seq")  # the reply carries the hub's change number: _pushed drains to it

    # ------------------------------------------------------------------ reads: local

    def _fresh(self) -> dict:
        seqw = self._seqw
        if seqw is None or seqw[0] != self._applied or self._sub_gen != _runtime.fork_generation:
            self._refresh()
        if _monotonic() >= self._next_check:
            self._check_alive()
        return self._local

    def __getitem__(self, key: Any) -> Any:
        seqw = self._seqw  # the common case inline: nothing changed, no check due
        if (seqw is None or seqw[0] != self._applied or self._sub_gen != _runtime.fork_generation
                or _monotonic() >= self._next_check):
            self._fresh()
        try:
            value = self._local[key]
        except KeyError:
            if self._declared is not None:
                self._check_key(key)
            raise KeyError(key) from None
        return _loads(value[0]) if type(value) is tuple else value

    def __contains__(self, key: Any) -> bool:
        return key in self._fresh()

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._fresh()))

    def __len__(self) -> int:
        return len(self._fresh())

    def snapshot(self) -> dict:
        data = dict(self._fresh())
        for k, v in data.items():
            if type(v) is tuple:
                data[k] = _loads(v[0])
        return data

    # ------------------------------------------------------------------ notification

    def on_change(self, callback: Callable[[str, Any, Any], None]) -> None:
        """Call ``callback(kind, key, value)`` for every change applied to this process's replica.

        ``kind`` is ``"set"`` (with the new value), ``"del"`` or ``"clear"``
        (key and value None). Callbacks run in this process, in the thread
        that applies the change (any read, write, :meth:`sync` or
        :meth:`wait_for_change`), in the hub's order, from the moment of this call
        (this replica subscribes now if it had not yet).
        """
        self._refresh()
        self._callbacks.append(callback)

    def wait_for_change(self, timeout: float | None = None) -> bool:
        """Block until a change from any process reaches this replica; False on timeout."""
        self._refresh()
        sub = self._sub
        try:
            if not sub.poll(self._config.timeout if timeout is None else timeout):
                return False
            self._apply(*_loads(sub.recv_bytes()))
        except (OSError, EOFError):
            self._subscribe()
        self._refresh()
        return True

    def _notify(self, kind: str, key: Any, value: Any) -> None:
        for fn in self._callbacks:
            fn(kind, key, None if value is None else (_loads(value[0]) if type(value) is tuple else value))

    def _notify_resync(self, old: dict, new: dict) -> None:
        for key in old.keys() - new.keys():
            self._notify("del", key, None)
        for key, value in new.items():
            if old.get(key, MISSING) != value:
                self._notify("set", key, value)

    # ------------------------------------------------------------------ lifetime

    def _close(self) -> None:
        if self._sub is not None and self._sub_gen == _runtime.fork_generation:
            self._sub.close()
        self._sub = None
        if self._seqw is not None:
            self._seqw.release()
            self._seqmm.close()
            self._seqw = None
        self._local = _ClosedReplica()
        super()._close()

    def _destroy(self) -> None:
        super()._destroy()
        _unlink_quiet(self._seq_path)



def _unlink_quiet(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

