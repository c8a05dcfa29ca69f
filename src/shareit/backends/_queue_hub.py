"""The ``queue`` backend's hub: the manager server, plus pushes to every replica.

Started by :mod:`shareit.backends.queue` through :func:`._rpc.start_server`, like
the manager server, from this module's own :func:`main`. Every request is a round
trip, served under the store's lock as in the manager server. The changes one
request makes become one *change* with the next sequence number (the messages and
the words file are described in :mod:`._queue_wire`). While the lock is still
held the hub

1. publishes that number in the words file (word ``W_SEQ``), and only then
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
"""

from __future__ import annotations

import select
import threading
from collections import deque
from typing import Any, NoReturn

from ._manager_server import Reply, Server, Store
from ._queue_wire import (
    CLEARED,
    REMOVED,
    UPDATED,
    W_SEQ,
    W_SHUT,
    map_words,
    remove_words,
    words_path,
)
from ._rpc import Session, boot_params, encode, set_timeouts, shut

OUTBOX_LIMIT = 64 << 20  # bytes queued for one replica before it is dropped
SUB_IDLE_CHECK = 1.0  # seconds between checks that an idle subscriber is still there


class Outbox:
    """Messages queued for one subscribed replica, in change order."""

    __slots__ = ("fd", "cond", "items", "size", "closed")

    def __init__(self, fd: int):
        self.fd = fd  # the replica's connection, open while this outbox is
        self.cond = threading.Condition(threading.Lock())
        self.items: deque[bytes] = deque()
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

    def take(self, timeout: float) -> list[bytes] | None:
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
            shut(self.fd)  # EOF for the replica now, even while its thread is sending


class HubStore(Store):
    """The manager's store, recording each request's effects for :meth:`publish`."""

    def __init__(self, params: dict[str, Any]):
        super().__init__(params["value_type"], params["name"])
        self.cond = threading.Condition(threading.RLock())  # run_op() wraps ops that lock too
        self.seq = 0
        self.effects: list[tuple[Any, Any]] = []
        self.subs: list[Outbox] = []
        self.seqmm, self.word = map_words(words_path(params["stem"]))

    def _put(self, key: Any, value: Any) -> None:
        super()._put(key, value)
        self.effects.append((key, value))

    def _removed(self, key: Any, value: Any) -> Any:
        self.effects.append((key, REMOVED))
        return super()._removed(key, value)

    def _update(self, items: dict[Any, Any]) -> None:
        """One effect for a whole update(); a replica applies it with one dict.update()."""
        self.effects.append((items, UPDATED))
        super()._update(items)

    def _clear(self) -> None:
        super()._clear()
        self.effects.append((None, CLEARED))

    def publish(self) -> None:
        """With ``cond`` held: number what the last request changed, publish the number,
        then queue the change for every replica (in that order: see the module doc)."""
        if not self.effects:
            return
        self.seq += 1
        effects, self.effects = self.effects, []
        self.word[W_SEQ] = self.seq
        msg = encode((self.seq, effects))
        for box in self.subs:
            box.put(msg)

    def subscribe(self, box: Outbox) -> None:
        with self.cond:
            box.put(encode((self.seq, self.data.copy())))
            self.subs.append(box)

    def unsubscribe(self, box: Outbox) -> None:
        with self.cond:
            if box in self.subs:
                self.subs.remove(box)
        box.close()

    def op_info(self, me: Session) -> dict[str, Any]:
        return {**super().op_info(me), "seq": self.seq, "replicas": len(self.subs)}


class HubServer(Server):
    store: HubStore

    def make_store(self, params: dict[str, Any]) -> HubStore:
        return HubStore(params)

    def run_op(self, me: Session, op: str, args: list[Any]) -> Reply:
        store = self.store
        with store.cond:
            reply = super().run_op(me, op, args)
            store.publish()
            return reply

    def dispatch(self, me: Session, request: tuple[Any, ...]) -> None:
        if request[0] == "subscribe":
            self.store.requests += 1
            self.serve_replica(me)
            raise EOFError  # the connection was the replica's push stream: it is over
        super().dispatch(me, request)

    def serve_replica(self, me: Session) -> None:
        """This connection's thread sends its replica's pushes until it goes away or is
        dropped; a send that stalls for ``timeout`` drops it."""
        store, conn = self.store, me.conn
        set_timeouts(conn, 0, self.params["timeout"])
        box = Outbox(conn.fileno())
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

    def shutdown(self, me: Session | None) -> NoReturn:
        store = self.store
        store.word[W_SHUT] = 1  # readers learn it on their next read, before any reply
        store.word[W_SEQ] = store.seq + 1  # (a word no replica has applied: they all look)
        remove_words(self.params["stem"])
        super().shutdown(me)


def main() -> None:
    HubServer(boot_params()).run()


if __name__ == "__main__":
    main()
