"""The ``queue`` backend's hub: the manager server, plus pushes to every replica.

Every change made by one request is collected (``Store.changed``) and, while
the store's lock is still held, sent to every subscribed replica as one
message ``(seq, effects)`` in one global order; then ``seq`` is stored in a
shared 8-byte word that replicas compare with what they applied. A replica
subscribes on a connection of its own and first receives a snapshot at the
current ``seq``, so it misses nothing and applies nothing twice. A replica
that stops reading is dropped after a short send timeout (it resubscribes
when it reads again) instead of stalling everyone.
"""

from __future__ import annotations

import mmap
import os
import threading
from multiprocessing.connection import Connection

from ._manager_server import Server, Store, _dumps, _PROTO, conn_setup

SUB_SEND_TIMEOUT = 1.0


class HubStore(Store):
    def __init__(self, params: dict):
        super().__init__(params["value_type"])
        self.cond = threading.Condition(threading.RLock())  # run_op() wraps ops that lock too
        self.seq = 0
        self.effects: list = []
        self.subs: set[Connection] = set()
        fd = os.open(params["seq_path"], os.O_RDWR)
        try:
            self.seqmm = mmap.mmap(fd, 8)
        finally:
            os.close(fd)
        self.seqword = memoryview(self.seqmm).cast("Q")

    def changed(self, key, value) -> None:
        self.effects.append((key, value))

    def flush(self) -> None:
        """Push this request's changes to every replica, then publish its ``seq`` (lock held)."""
        if not self.effects:
            return
        self.seq += 1
        msg = _dumps((self.seq, self.effects), _PROTO)
        self.effects = []
        for conn in list(self.subs):
            try:
                conn.send_bytes(msg)
            except OSError:  # stopped or gone: it resubscribes when it reads again
                self.subs.discard(conn)
                conn.close()
        self.seqword[0] = self.seq

    def op_seq(self) -> int:
        return self.seq


class HubServer(Server):
    def make_store(self, params: dict) -> Store:
        return HubStore(params)

    def run_op(self, op: str, args: list) -> tuple:
        store = self.store
        with store.cond:
            reply = super().run_op(op, args)
            store.flush()
            return reply + (store.seq,)

    def subscribe(self, conn: Connection) -> None:
        store = self.store
        conn_setup(conn, 0, SUB_SEND_TIMEOUT)
        with store.cond:
            conn.send_bytes(_dumps((store.seq, store.data.copy()), _PROTO))
            store.subs.add(conn)
        try:
            while True:
                conn.recv_bytes()  # a replica never writes here: this waits for it to go away
        except (EOFError, OSError):
            pass
        finally:
            with store.cond:
                store.subs.discard(conn)

    def shutdown(self, conn: Connection | None) -> None:
        try:
            os.unlink(self.params["seq_path"])
        except FileNotFoundError:
            pass
        super().shutdown(conn)
