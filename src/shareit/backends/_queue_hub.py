"""The ``queue`` backend's hub: the manager server, plus pushes to every replica.

Every request is a round trip, served under the store's lock as in the
manager server. The changes one request makes become one *change* with the
next sequence number. While the lock is still held the hub

1. publishes that number in the shared words file (``STEM@seq``, word
   ``W_SEQ``), and only then
2. queues the change for every subscribed replica,

and then replies. A replica about to be read compares ``W_SEQ`` with the number
it has applied and, when behind, applies pushed changes until it has caught
up. Because of 1, a read sees every change that returned anywhere before it
began; because 2 comes after 1, no replica can show a change that a later read
elsewhere could miss: reads and writes are linearizable.

A replica subscribes on a connection of its own and first receives a snapshot
at the current number, so it misses nothing and applies nothing twice. Pushes
never block the hub: each subscription has an outbox, emptied by that
connection's own thread; a replica that stops reading is dropped once its
outbox passes ``OUTBOX_LIMIT`` bytes, or a send to it stalls for ``timeout``
(its socket is shut down, so it sees EOF at once and resubscribes when it
reads again).

Words file layout (8-byte words): ``W_SEQ`` the last published change number,
``W_SHUT`` 1 once the hub is shutting down (destroy, or its owner died).
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import threading
from collections import deque
from multiprocessing.connection import Connection

from .. import _runtime
from ._manager_server import _PROTO, Server, Store, _dumps, conn_setup

UPDATED = ("<updated>",)  # a marker: the effect's key holds one update()'s items
W_SEQ = 0
W_SHUT = 1
WORDS_SIZE = 4096
OUTBOX_LIMIT = 64 << 20  # bytes queued for one replica before it is dropped
SUB_IDLE_CHECK = 1.0  # seconds between checks that an idle subscriber is still there


class Outbox:
    """Messages queued for one subscribed replica, in change order."""

    __slots__ = ("conn", "cond", "items", "size", "closed")

    def __init__(self, conn: Connection):
        self.conn = conn
        self.cond = threading.Condition(threading.Lock())
        self.items: deque = deque()
        self.size = 0
        self.closed = False

    def put(self, msg: bytes) -> None:
        with self.cond:
            if self.closed:
                return
            self.items.append(msg)
            self.size += len(msg)
            if self.size > OUTBOX_LIMIT:  # it stopped reading: drop it rather than grow
                self._close()
            self.cond.notify()

    def take(self, timeout: float) -> list | None:
        """Everything queued (waiting up to ``timeout`` for something); None once closed."""
        with self.cond:
            if not self.items and not self.closed:
                self.cond.wait(timeout)
            if self.closed:
                return None
            out = list(self.items)
            self.items.clear()
            self.size = 0
            return out

    def close(self) -> None:
        with self.cond:
            self._close()
            self.cond.notify()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.items.clear()
            try:  # EOF for the replica now, even while its connection's thread is sending
                s = socket.socket(fileno=self.conn.fileno())
                try:
                    s.shutdown(socket.SHUT_RDWR)
                finally:
                    s.detach()
            except OSError:
                pass


class HubStore(Store):
    def __init__(self, params: dict):
        super().__init__(params["value_type"])
        self.cond = threading.Condition(threading.RLock())  # run_op() wraps ops that lock too
        self.seq = 0
        self.effects: list = []
        self.subs: list[Outbox] = []
        fd = _runtime.open_private(_runtime.path(params["stem"], "seq"), os.O_RDWR)
        try:
            self.seqmm = mmap.mmap(fd, WORDS_SIZE)
        finally:
            os.close(fd)
        self.word = memoryview(self.seqmm).cast("Q")

    def changed(self, key, value, new: bool) -> None:
        self.effects.append((key, value))

    def changed_many(self, items: dict) -> None:
        """One effect for a whole update(); a replica applies it with one dict.update()."""
        self.effects.append((items, UPDATED))

    def publish(self) -> None:
        """With ``cond`` held: number what the last request changed, publish the number,
        then queue the change for every replica (in that order: see the module doc)."""
        if not self.effects:
            return
        self.seq += 1
        effects, self.effects = self.effects, []
        self.word[W_SEQ] = self.seq
        msg = _dumps((self.seq, effects), _PROTO)
        for box in self.subs:
            box.put(msg)

    def subscribe(self, box: Outbox) -> None:
        with self.cond:
            box.put(_dumps((self.seq, self.data.copy()), _PROTO))
            self.subs.append(box)

    def unsubscribe(self, box: Outbox) -> None:
        with self.cond:
            if box in self.subs:
                self.subs.remove(box)
        box.close()

    def op_info(self) -> dict:
        return {**super().op_info(), "seq": self.seq, "replicas": len(self.subs)}


class HubServer(Server):
    def make_store(self, params: dict) -> Store:
        return HubStore(params)

    def run_op(self, op: str, args: list) -> tuple:
        store = self.store
        with store.cond:
            reply = super().run_op(op, args)
            store.publish()
            return reply

    def dispatch(self, conn: Connection, me: threading.Thread, request: tuple) -> None:
        if request[0] == "subscribe":
            self.store.requests += 1
            self.serve_replica(conn)
            raise EOFError  # the connection was the replica's push stream: it is over
        super().dispatch(conn, me, request)

    def serve_replica(self, conn: Connection) -> None:
        """This connection's thread sends its replica's pushes until it goes away or is
        dropped; a send that stalls for ``timeout`` drops it."""
        store = self.store
        conn_setup(conn, 0, self.params["timeout"])
        box = Outbox(conn)
        store.subscribe(box)
        try:
            while True:
                msgs = box.take(SUB_IDLE_CHECK)
                if msgs is None:
                    return
                for msg in msgs:
                    conn.send_bytes(msg)
                if not msgs and select.select([conn.fileno()], [], [], 0)[0]:
                    return  # a replica never writes here: readable means it hung up
        except OSError:
            return
        finally:
            store.unsubscribe(box)

    def shutdown(self, conn: Connection | None) -> None:
        store = self.store
        store.word[W_SHUT] = 1  # readers learn it on their next read, before any reply
        store.word[W_SEQ] = store.seq + 1  # (a word no replica has applied: they all look)
        try:
            os.unlink(_runtime.path(self.params["stem"], "seq"))
        except FileNotFoundError:
            pass
        super().shutdown(conn)
