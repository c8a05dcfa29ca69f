"""The ``queue`` backend's hub: the manager server, plus pushes to every replica.

Every change made by one request -- or by one batch of pipelined sets -- is
collected (``Store.changed``) and, while the store's lock is still held, sent
to every subscribed replica as one message ``(seq, effects, origin, n)`` in one
global order; then ``seq`` is published in the shared words file (layout
below), which replicas compare with what they applied. A replica subscribes on
a connection of its own and first receives a snapshot at the current ``seq``,
so it misses nothing and applies nothing twice. A replica that stops reading
is dropped after a short send timeout (it resubscribes when it reads again)
instead of stalling everyone.

Pipelined sets (``"aset"``) get no reply. Each request connection owns a *slot*
in the words file: the client bumps ``sent[slot]`` after each complete aset,
the hub bumps ``done[slot]`` after applying it. Every hub operation and every
subscription first waits until ``done >= sent`` in all slots (the barrier), so
whatever any process's set had returned before is applied before it. While
another client holds ``lock()``, asets are counted as done but deferred, and
applied in arrival order when the lock is released.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from multiprocessing.connection import Connection

from .. import _runtime
from ._manager_server import UPDATED, Server, Store, _dumps, _loads, _PROTO, conn_setup

SUB_SEND_TIMEOUT = 1.0
READ_CHUNK = 1 << 16  # below malloc's mmap threshold: no mmap/munmap per read

# The shared words file: 8-byte words.
W_CHANGE = 0  # changes on every change anywhere: hub publish or client aset (unique values)
W_SEQ = 1  # the hub's last published change number
W_LOCKED = 2  # 1 while some client holds lock()
W_SLOTS_HW = 3  # slots in use are below this
W_SHUT = 4  # 1 once the hub is shutting down (destroy, or its owner died)
SLOT_BASE = 8  # slot i: sent at SLOT_BASE + 2i, done at SLOT_BASE + 2i + 1
N_SLOTS = 1024
WORDS_SIZE = 8 * (SLOT_BASE + 2 * N_SLOTS)
PREFIX_SHIFT = 40  # a client's change word is prefix << 40 | its aset count; the hub's is < 2**40
NO_BARRIER = frozenset({"hello", "release", "info"})


class HubStore(Store):
    def __init__(self, params: dict):
        self.word = None
        self._holder = None
        self.deferred: list = []
        super().__init__(params["value_type"])
        self.cond = threading.Condition(threading.RLock())  # run_op() wraps ops that lock too
        self.seq = 0
        self.hub_change = 0
        self.effects: list = []
        self.subs: dict[Connection, bytes | None] = {}  # subscription -> its replica's token
        self.slots_free = list(range(N_SLOTS - 1, -1, -1))
        self.active: dict[int, threading.Thread] = {}  # slot -> the thread serving it
        self.next_prefix = 0
        self.timeout = params["timeout"]
        fd = _runtime.open_private(_runtime.path(params["stem"], "seq"), os.O_RDWR)
        try:
            self.seqmm = mmap.mmap(fd, WORDS_SIZE)
        finally:
            os.close(fd)
        self.word = memoryview(self.seqmm).cast("Q")

    # -- lock(): publish whether it is held; apply deferred sets when it is freed ------

    @property
    def holder(self):
        return self._holder

    @holder.setter
    def holder(self, thread) -> None:
        self._holder = thread
        if self.word is not None:
            self.word[W_LOCKED] = thread is not None
            if thread is None and self.deferred:
                deferred, self.deferred = self.deferred, []
                for prefix, n, replica, pairs in deferred:
                    self._apply_pairs(pairs, prefix, n, replica)

    # -- slots ----------------------------------------------------------------------

    def op_hello(self, timeout: float):
        super().op_hello(timeout)
        me = threading.current_thread()
        with self.cond:
            slot = self.slots_free.pop() if self.slots_free else -1
            self.next_prefix = self.next_prefix % ((1 << 23) - 1) + 1
            me.slot, me.prefix, me.acount = slot, self.next_prefix, 0  # type: ignore[attr-defined]
            if slot >= 0:
                self.word[SLOT_BASE + 2 * slot] = self.word[SLOT_BASE + 2 * slot + 1] = 0
                self.active[slot] = me
                self.word[W_SLOTS_HW] = max(self.word[W_SLOTS_HW], slot + 1)
        return (os.getpid(), slot, me.prefix)

    def free_slot(self, me: threading.Thread) -> None:
        slot = getattr(me, "slot", -1)
        if slot < 0:
            return
        with self.cond:
            me.slot = -1  # type: ignore[attr-defined]
            self.active.pop(slot, None)
            self.word[SLOT_BASE + 2 * slot] = 0  # the client is gone: it writes here no more
            self.word[SLOT_BASE + 2 * slot + 1] = 0
            self.slots_free.append(slot)
            self.cond.notify_all()

    def acked(self) -> dict:
        """How many asets each live request connection has had applied, by its prefix."""
        return {t.prefix: t.acount for t in self.active.values()}

    def wait_caught_up(self) -> None:
        """The barrier: wait until every aset whose sender counted it is applied or deferred."""
        word = self.word
        deadline = None
        with self.cond:
            while True:
                if all(word[SLOT_BASE + 2 * s + 1] >= word[SLOT_BASE + 2 * s] for s in self.active):
                    return
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.timeout
                if now >= deadline:
                    return  # a connection's thread is stuck; do not stall everyone else with it
                self.cond.wait(min(deadline - now, 0.05))

    # -- changes ----------------------------------------------------------------------

    def changed(self, key, value, new: bool) -> None:
        self.effects.append((key, value, new))

    def changed_many(self, items: dict) -> None:
        """One effect for a whole update(): ``(items, UPDATED, the keys it inserts)``, with
        True for "all of them"; a replica applies it with one dict.update()."""
        news = items.keys() - self.data.keys()
        self.effects.append((items, UPDATED, True if len(news) == len(items) else news))

    def apply_batch(self, me: threading.Thread, pairs: list) -> None:
        """Apply pipelined sets from one connection (or defer them while another holds lock())."""
        with self.cond:
            n = me.acount = me.acount + len(pairs)  # type: ignore[attr-defined]
            holder = self._holder
            if holder is not None and holder is not me:
                self.deferred.append((me.prefix, n, me.replica, pairs))  # type: ignore[attr-defined]
            else:
                self._apply_pairs(pairs, me.prefix, n, me.replica)  # type: ignore[attr-defined]
            if me.slot >= 0:  # type: ignore[attr-defined]
                self.word[SLOT_BASE + 2 * me.slot + 1] = n  # type: ignore[attr-defined]
            self.cond.notify_all()

    def _apply_pairs(self, pairs: list, prefix: int, n: int, replica) -> None:
        for key, value in pairs:
            self._put(key, value)
        self.flush(prefix, n, replica)

    def flush(self, prefix: int, n: int, replica=None) -> None:
        """Push the pending changes to every replica, then publish ``seq`` (lock held).

        With ``replica`` (a batch of that replica's own pipelined sets, whose values
        it already holds), that replica gets only ``(seq, None, prefix, n, news)``:
        which of its sets are applied (up to number ``n``), and which inserted a new key.
        """
        if not self.effects:
            return
        self.seq += 1
        effects, self.effects = self.effects, []
        msg = _dumps((self.seq, effects, prefix, n), _PROTO)
        slim = None
        if replica is not None:
            first = n - len(effects) + 1  # the number of this batch's first set
            news = [first + i for i, effect in enumerate(effects) if effect[2]]
            slim = _dumps((self.seq, None, prefix, n, news), _PROTO)
        for conn, token in list(self.subs.items()):
            try:
                conn.send_bytes(slim if token == replica and slim is not None else msg)
            except OSError:  # stopped or gone: it resubscribes when it reads again
                del self.subs[conn]
                conn.close()
        self.word[W_SEQ] = self.seq
        self.hub_change += 1
        self.word[W_CHANGE] = self.hub_change

    def op_seq(self) -> int:
        return self.seq


class HubServer(Server):
    def make_store(self, params: dict) -> Store:
        return HubStore(params)

    def run_op(self, op: str, args: list) -> tuple:
        store = self.store
        if op not in NO_BARRIER:
            store.wait_caught_up()
        me = threading.current_thread()
        with store.cond:
            reply = super().run_op(op, args)
            store.flush(getattr(me, "prefix", 0), getattr(me, "acount", 0))
            return reply + (store.seq,)

    def loop(self, conn: Connection, me: threading.Thread) -> None:
        """Read requests in chunks; apply each run of pipelined sets as one batch (one push)."""
        fd = conn.fileno()
        buf = bytearray()
        apply_batch = self.store.apply_batch
        while True:
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                return  # EOF: a partly sent request is dropped; everything complete was applied
            buf += chunk
            pos, end, batch = 0, len(buf), []
            while end - pos >= 4:
                size = int.from_bytes(buf[pos:pos + 4], "big", signed=True)
                start = pos + 4
                if size == -1:  # multiprocessing.connection's header for 2 GiB and more
                    if end - pos < 12:
                        break
                    size, start = int.from_bytes(buf[pos + 4:pos + 12], "big"), pos + 12
                if end - start < size:
                    break
                raw = bytes(buf[start:start + size])
                pos = start + size
                try:
                    request = _loads(raw)
                except Exception:
                    request = None
                if request is not None and request[0] == "aset":
                    batch.append(request[1:])
                    continue
                if batch:  # everything this connection sent before a request comes first
                    apply_batch(me, batch)
                    batch = []
                if request is None:
                    self.handle(conn, me, raw)  # replies with the reason it cannot be loaded
                else:
                    self.dispatch(conn, me, request)
            if pos:
                del buf[:pos]
            if batch:
                apply_batch(me, batch)

    def disconnected(self, me: threading.Thread) -> None:
        self.store.free_slot(me)

    def subscribe(self, conn: Connection, replica: bytes | None = None) -> None:
        store = self.store
        store.free_slot(threading.current_thread())  # this connection sends no sets
        conn_setup(conn, 0, SUB_SEND_TIMEOUT)
        store.wait_caught_up()
        with store.cond:
            conn.send_bytes(_dumps((store.seq, store.data.copy(), store.acked()), _PROTO))
            store.subs[conn] = replica
        try:
            while True:
                conn.recv_bytes()  # a replica never writes here: this waits for it to go away
        except (EOFError, OSError):
            pass
        finally:
            with store.cond:
                store.subs.pop(conn, None)

    def shutdown(self, conn: Connection | None) -> None:
        store = self.store
        store.word[W_SHUT] = 1  # readers learn it on their next read, before any reply
        store.word[W_CHANGE] = store.hub_change + 1
        try:
            os.unlink(_runtime.path(self.params["stem"], "seq"))
        except FileNotFoundError:
            pass
        super().shutdown(conn)
