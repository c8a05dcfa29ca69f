"""Outside review of dfaf875: the hash probe inlined into ``fastpath.insert`` and
``fastpath.remove_flat``, and ``d[new str key] = number`` sent straight to ``insert``.

Real processes and shared memory. A child that must stop or die at a precise point of a
write uses the backend's own fault hook (``layout.fault``), replaced in the child only.
Every wait on another process is a pipe, an event or a /proc poll with a deadline.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shareit
from helpers import apply_op, by_steps, shm_state, wait_stopped
from shareit.backends.shm import fastpath
from shareit.backends.shm import layout as L
from shareit.backends.shm import mapping as M
from shareit.backends.shm.read import probe
from shareit.errors import ClosedError, LockTimeoutError
from shareit.testing import join_all

FORK = mp.get_context("fork")
DEADLINE = 30.0


# ---------------------------------------------------------------------------- helpers








def _same(x: object, y: object) -> bool:
    return x == y or (x != x and y != y)




# ------------------------------------------- the inline probes against the Table's steps

# Keys of three kinds whose encoded bytes collide ("a" / b"a"), and an int key.
_KEYS = ["a", b"a", "b", b"b", 97, 98, "c", "\udc80", "\u00e9", "k" * 40]
_NUMBERS = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(2**63, 2**70),
                     st.integers(-(2**70), -(2**63) - 1), st.floats(), st.booleans(),
                     st.sampled_from([-0.0, 0.0, float("inf"), float("-inf"), float("nan")]))
_VALUES = st.one_of(_NUMBERS, st.text(max_size=12), st.none())
_OPS = st.lists(st.one_of(st.tuples(st.just("set"), st.sampled_from(_KEYS), _VALUES,
                                    st.booleans()),
                          st.tuples(st.sampled_from(["del", "pop"]), st.sampled_from(_KEYS),
                                    st.booleans())),
                min_size=1, max_size=40)


@settings(max_examples=50, deadline=None)
@given(ops=_OPS, spread=st.integers(1, 3))
def test_inline_probes_match_the_steps_over_wraparound_and_kind_collisions(ops, spread) -> None:
    """Every key hashes to the LAST index slot (the probe wraps to slot 0), with only
    ``spread`` distinct full hashes, independent of the key's kind: "a", b"a" and the
    like share hash and bytes, and only the kind tells them apart. The flat paths,
    with this process's slot cache dropped at random (a key "placed by another
    process": probed), must leave the very bytes the steps leave, op after op."""
    a = shareit.open(backend="shm", capacity=200)
    b = shareit.open(backend="shm", capacity=200)
    try:
        isize = a._t.g.isize
        assert b._t.g.isize == isize

        def forced(kb: bytes, kind: int) -> int:
            return isize - 1 + isize * (zlib.crc32(kb) % spread)

        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(M, "_crc32", forced)
            model: dict = {}
            for op in ops:
                if op[-1]:  # probed, as for a key another process placed (both sides:
                    a._t.slots.clear()  # a cached key takes the inline store, not put)
                    b._t.slots.clear()
                op = op[:-1]
                got_a = apply_op(a, op)
                got_b = by_steps(b, op)
                assert _same(got_a, got_b), op
                if op[0] == "set":
                    model[op[1]] = op[2]
                else:
                    model.pop(op[1], None)
                assert shm_state(a) == shm_state(b), op
                assert a._t.g.isize == isize, "no growth: the wrap-around stays forced"
            assert a.verify() == b.verify() == []
            snap = a.snapshot()
            assert snap.keys() == model.keys()
            assert all(_same(snap[k], model[k]) and type(snap[k]) is type(model[k])
                       for k in model)
            for k, v in model.items():  # read back through the (forced) probe
                assert _same(a[k], v) and _same(b[k], v)
    finally:
        a.close()
        b.close()


def test_a_key_past_a_deleted_slot_placed_by_another_handle_is_not_duplicated(name) -> None:
    """x, y, z share one home slot; x is deleted (its slot DELETED, the first slot of
    the chain). Another handle (no slots cached) sets z = number: insert must look past
    the DELETED slot, find z and decline -- a probe that stopped at the first free slot
    would append a second z. Then x again: it takes the DELETED slot."""
    a = shareit.open(name, backend="shm")
    b = shareit.open(name, backend="shm")
    try:
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(M, "_crc32", lambda kb, kind: 5)
            a.update({"x": "1", "y": "2", "z": "3"})
            del a["x"]
            used = a._t.g.q[L.H_USED]
            b["z"] = 30  # existing: the steps overwrite
            b["y"] = 2.5
            assert a._t.g.q[L.H_USED] == used, "no entry appended for an existing key"
            assert len(a) == len(b) == 2
            slot0 = 5 % a._t.g.isize
            b["x"] = 10  # new: the DELETED home slot is reused
            assert a._t.g.i32[L.HEADER_BYTES // 4 + slot0] == used
            assert a.snapshot() == b.snapshot() == {"y": 2.5, "z": 30, "x": 10}
            assert a["z"] == 30 and a.verify() == []
            a._t.slots.clear()
            del a["z"]  # probed: past x's slot again
            assert b.snapshot() == {"y": 2.5, "x": 10} and b.verify() == []
    finally:
        a.close()
        b.close()


def test_probes_terminate_and_agree_with_read_probe_on_an_index_with_no_empty_slot() -> None:
    """Every EMPTY index word turned DELETED (no EMPTY left: the loop must end by its
    count). insert must pick the slot ``read.probe`` picks (the first DELETED from the
    home slot, wrapping), remove_flat must find a present key and say ABSENT for an
    absent one, and neither may spin."""
    d = shareit.open(backend="shm", capacity=16)
    try:
        d.update({f"p{i}": i for i in range(6)})
        d["warm"] = 0  # this process's lock set up
        t = d._t
        g = t.g
        base = L.HEADER_BYTES // 4
        for j in range(g.isize):
            if g.i32[base + j] == L.EMPTY:
                g.i32[base + j] = L.DELETED
        assert L.EMPTY not in [g.i32[base + j] for j in range(g.isize)]
        for i, key in enumerate(["new1", "new2", "new3"]):
            kb = key.encode()
            h = zlib.crc32(kb, L.K_STR)
            e, want = probe(g, L.K_STR, kb, h)
            assert e == -1 and want >= 0
            used = g.q[L.H_USED]
            assert fastpath.insert(t, key, L.K_STR, kb, h, L.V_INT, i, None)
            assert g.i32[base + want] == used, (key, want)
        kb = b"absent"
        assert fastpath.remove_flat(t, "absent", L.K_STR, kb, zlib.crc32(kb, L.K_STR),
                                    True) is fastpath.ABSENT
        t.slots.clear()
        kb = b"p3"
        assert fastpath.remove_flat(t, "p3", L.K_STR, kb, zlib.crc32(kb, L.K_STR), True) == 3
        assert d.get("p3") is None and d["new2"] == 1 and d["p4"] == 4
    finally:
        d.close()


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, True, False, -0.0, float("nan"),
                                   float("inf"), 2**63 - 1, -(2**63)])
def test_edge_numbers_as_a_new_key_match_the_steps_and_round_trip(value) -> None:
    a, b = shareit.open(backend="shm"), shareit.open(backend="shm")
    try:
        for m in (a, b):
            m["pad"] = "x"
            m["warm"] = 1
        apply_op(a, ("set", "new", value))
        by_steps(b, ("set", "new", value))
        assert shm_state(a) == shm_state(b)
        for m in (a, b, ):
            got = m["new"]
            assert type(got) is type(value) and _same(got, value)
            if type(value) is float:
                assert repr(got) == repr(value)  # (-0.0 keeps its sign)
        a._t.slots.clear()
        b._t.slots.clear()
        assert _same(a.pop("new"), by_steps(b, ("pop", "new")))
        assert shm_state(a) == shm_state(b)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("why", ["entries", "heap"])
def test_a_new_key_that_needs_growth_grows_like_the_steps(why: str) -> None:
    a, b = shareit.open(backend="shm"), shareit.open(backend="shm")
    try:
        for m in (a, b):
            m["warm"] = 0
        i = 0
        while a._t.g.q[L.H_USED] < a._t.g.cap:  # fill to the last entry
            key = f"f{i}"
            apply_op(a, ("set", key, i))
            by_steps(b, ("set", key, i))
            i += 1
        gen = a.info()["generation"]
        key = "L" * (a._t.g.heapw * 8 + 8) if why == "heap" else "one-more"
        if why == "heap":  # room for an entry, none for the key
            apply_op(a, ("del", "f0"))
            by_steps(b, ("del", "f0"))
        apply_op(a, ("set", key, 12.5))
        by_steps(b, ("set", key, 12.5))
        assert a.info()["generation"] > gen
        assert shm_state(a) == shm_state(b)
        assert a[key] == 12.5 and a.verify() == []
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------- processes

OLD = {"s": "old", "n": 1, "keep": [1, 2]}


def _die_at(d, step: str, op: str) -> None:
    d["warm"] = 0  # the child's lock set up
    d._t.slots.clear()  # every key: "placed by another process"
    L.FAULT = step
    if op == "insert_int":
        d["fresh"] = 7
    elif op == "insert_float":
        d["fresh"] = 7.5
    elif op == "del_probed":
        del d["s"]
    elif op == "pop_probed":
        d.pop("n")
    os._exit(3)  # the fault point was not reached


FAULT_CASES = [(s, o) for o in ("insert_int", "insert_float")
               for s in ("after_begin", "mid_entry", "after_write", "before_commit")] + \
              [(s, o) for o in ("del_probed", "pop_probed")
               for s in ("after_begin", "mid_entry", "before_commit")]


@pytest.mark.parametrize("step, op", FAULT_CASES)
def test_a_writer_killed_inside_the_changed_paths_leaves_old_or_new(name, step, op) -> None:
    d = shareit.open(name, backend="shm")
    try:
        d.update(OLD)
        child = FORK.Process(target=_die_at, args=(d, step, op))
        child.start()
        assert join_all([child], DEADLINE) == [-signal.SIGKILL], "fault point not reached"
        snap = d.snapshot()  # lock-free: the committed state
        assert snap == {**OLD, "warm": 0}, "an uncommitted write is visible"
        assert "fresh" not in d and len(d) == 4
        assert d.verify() == []
        d["fresh2"] = 3  # the next writer repairs
        assert d.verify() == [] and d.snapshot() == {**OLD, "warm": 0, "fresh2": 3}
        del d["s"]
        assert "s" not in d and d.verify() == []
    finally:
        d.close()


def _stop_at(name: str, step: str, op: str, conn) -> None:
    d = shareit.open(name, backend="shm")
    d["warm"] = 0
    d._t.slots.clear()

    def hook(s: str) -> None:
        if s == step:
            conn.send("at")
            os.kill(os.getpid(), signal.SIGSTOP)

    L.fault = hook
    L.FAULT = "hooked"
    if op == "insert_int":
        d["fresh"] = 7
    else:
        del d["s"]
    L.FAULT = None
    conn.send("done")
    d.close()


@pytest.mark.parametrize("op, step", [("insert_int", "mid_entry"), ("insert_int", "after_write"),
                                     ("insert_int", "before_commit"), ("del_probed", "mid_entry"),
                                     ("del_probed", "before_commit")])
def test_a_stopped_writer_inside_the_changed_paths(name, step, op) -> None:
    """Stopped holding the lock with the entry (and index word) written but not
    committed: reads neither wait nor see it, and another process's new key times out
    within its timeout (not the writer's), leaving nothing behind."""
    d = shareit.open(name, backend="shm", timeout=0.5)
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_stop_at, args=(name, step, op, child))
    try:
        d.update(OLD)
        p.start()
        child.close()
        assert parent.poll(DEADLINE) and parent.recv() == "at"
        wait_stopped(p.pid, DEADLINE)
        t0 = time.monotonic()
        assert d.snapshot() == {**OLD, "warm": 0}
        assert ("fresh" in d) is False and d.get("s") == "old" and len(d) == 4
        assert time.monotonic() - t0 < 0.4, "a read waited for the lock"
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError):
            d["other"] = 5  # a new key: insert declines (trylock), the steps wait
        with pytest.raises(LockTimeoutError):
            del d["keep"]
        waited = time.monotonic() - t0
        assert 0.9 <= waited < 5, waited
        assert "other" not in d and d["keep"] == [1, 2]
        os.kill(p.pid, signal.SIGCONT)
        assert parent.poll(DEADLINE) and parent.recv() == "done"
        assert join_all([p], DEADLINE) == [0]
        want = {**OLD, "warm": 0}
        if op == "insert_int":
            want["fresh"] = 7
        else:
            del want["s"]
        assert d.snapshot() == want and d.verify() == []
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


def _handler_reenters(name: str, op: str, catch: bool, conn) -> None:
    """A Python signal handler (it runs in the main thread, between two bytecodes of
    whatever runs there) writes while the main thread is inside a write of the same
    mapping: a flat one (``insert_int``, ``del_probed``, ``overwrite``) or the Table's
    steps (``steps``: a write inside ``lock()``, interrupted after its journal began)."""
    d = shareit.open(name, backend="shm")
    d["warm"] = 0
    d["s2"] = "x" * 40  # (placed by this process, with room: its overwrite is flat)
    d._t.slots.pop("s", None)
    fired: list[object] = []
    seen: list[tuple] = []

    def on_usr1(signum, frame) -> None:
        seen.append((d.get("keep"), d.get("s2"), d.get("main", "absent")))  # reads: fine
        try:
            d["from_handler"] = 42
        except shareit.ReentrantWriteError as e:
            fired.append(e)
            if not catch:
                raise
        else:
            fired.append("wrote")

    signal.signal(signal.SIGUSR1, on_usr1)
    point = {"insert_int": "after_write", "del_probed": "before_commit",
             "overwrite": "mid_entry", "steps": "before_commit"}[op]

    def hook(s: str) -> None:
        if s == point and not fired:
            signal.raise_signal(signal.SIGUSR1)

    L.fault = hook
    L.FAULT = "hooked"
    outer: object = "returned"
    try:
        if op == "insert_int":
            d["main"] = 1
        elif op == "overwrite":
            d["s2"] = "new"
        elif op == "steps":
            with d.lock():
                d["main"] = [1]  # (a pickled new key inside lock(): the Table's steps)
        else:
            d.pop("s")
    except shareit.ReentrantWriteError:
        outer = "raised"
    L.FAULT = None
    odd = d._t.c[L.C_TSEQ] & 1  # (before verify(), which takes the lock and repairs)
    busy = d._t.lock.busy
    d._t.slots.clear()
    conn.send(([type(f).__name__ for f in fired], outer, odd, busy, d.snapshot(), len(d),
               d.verify(), seen))
    d.close()


@pytest.mark.parametrize("catch", [True, False], ids=["handler_catches", "handler_raises"])
@pytest.mark.parametrize("op", ["insert_int", "del_probed", "overwrite", "steps"])
def test_a_signal_handler_writing_during_a_write(name, op, catch) -> None:
    """Was a strict xfail: the writer mutex is recursive, so a signal handler's write
    re-took it inside the main thread's flat write, rolled that write back as if its
    writer had died (recover()) and committed its own; the outer write then finished with
    no journal and returned normally, lost, with tseq left odd. Now the handler's write
    raises ReentrantWriteError having changed nothing: caught, the outer write lands;
    not caught, it propagates into the outer write, which is undone and raises it."""
    d = shareit.open(name, backend="shm")
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_handler_reenters, args=(name, op, catch, child))
    try:
        d.update(OLD)
        p.start()
        child.close()
        assert parent.poll(DEADLINE), "child hung"
        fired, outer, odd, busy, snap, n, problems, seen = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        assert fired == ["ReentrantWriteError"], fired
        # the handler's reads see the state before the interrupted write, never part of it
        assert seen == [([1, 2], "x" * 40, "absent")], seen
        want = {**OLD, "warm": 0, "s2": "x" * 40}
        if catch:  # the outer write lands
            assert outer == "returned"
            if op == "insert_int":
                want["main"] = 1
            elif op == "steps":
                want["main"] = [1]
            elif op == "overwrite":
                want["s2"] = "new"
            else:
                del want["s"]
        else:  # the outer write is undone and raises
            assert outer == "raised"
        assert (odd, busy, snap, n, problems) == (0, 0, want, len(want), [])
        assert d.snapshot() == want and d.verify() == []
        d["after"] = 1  # the lock is free
        assert d["after"] == 1
    finally:
        if p.is_alive():
            p.kill()
            p.join(DEADLINE)
        d.close()


def test_a_forked_child_inserts_and_deletes_before_its_lock_is_set_up(name) -> None:
    """The parent holds lock() when it forks: the child inherits a WriterLock whose depth
    is 1 and whose forkgen is stale. Its first writes -- a new key = number, a probed
    del -- must wait for the parent's lock, not write under the parent's depth."""
    d = shareit.open(name, backend="shm")
    try:
        d.update(OLD)
        d["warm"] = 0  # the parent's lock set up

        def child_body(conn) -> None:
            d["child_new"] = 5
            del d["s"]
            conn.send(d.snapshot())

        parent, child = FORK.Pipe()
        with d.lock():
            tseq = d._t.c[L.C_TSEQ]
            p = FORK.Process(target=child_body, args=(child,))
            p.start()
            child.close()
            # bounded: a child that writes while the parent holds the lock reports here
            early = parent.poll(1.0)
            assert not early, "the child wrote while the parent held the lock"
            assert d._t.c[L.C_TSEQ] == tseq and "child_new" not in d
            d["in_lock"] = 1
        assert parent.poll(DEADLINE), "the child never finished"
        snap = parent.recv()
        assert join_all([p], DEADLINE) == [0]
        want = {"n": 1, "keep": [1, 2], "warm": 0, "in_lock": 1, "child_new": 5}
        assert snap == want and d.snapshot() == want and d.verify() == []
    finally:
        d.close()


def test_threads_inserting_and_probed_deleting_concurrently(name) -> None:
    """Threads of one process: new keys = numbers through one handle, probed deletes of
    them through another (no slots cached), the GIL switched as often as it can be."""
    d1 = shareit.open(name, backend="shm")
    d2 = shareit.open(name, backend="shm")
    old = sys.getswitchinterval()
    errors: list[BaseException] = []
    n, nthreads = 400, 4

    def work(tid: int) -> None:
        try:
            for i in range(n):
                d1[f"t{tid}-{i}"] = i if i & 1 else float(i)
                if i % 3 == 0:
                    del d2[f"t{tid}-{i}"]
        except BaseException as e:  # (reported below)
            errors.append(e)

    try:
        d1["warm"] = 0
        d2["warm2"] = 0
        sys.setswitchinterval(1e-6)
        threads = [threading.Thread(target=work, args=(k,)) for k in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(DEADLINE)
        assert not any(th.is_alive() for th in threads), "a thread hung"
        sys.setswitchinterval(old)
        assert errors == []
        want = {f"t{k}-{i}": (i if i & 1 else float(i)) for k in range(nthreads)
                for i in range(n) if i % 3}
        want.update(warm=0, warm2=0)
        snap = d2.snapshot()
        assert snap == want and all(type(snap[k]) is type(v) for k, v in want.items())
        assert len(d1) == len(want) and d1.verify() == []
    finally:
        sys.setswitchinterval(old)
        d1.close()
        d2.close()


def _lin_writer(name: str, total: int, progress, done) -> None:
    d = shareit.open(name, backend="shm")
    other = shareit.open(name, backend="shm")  # its deletes: probed
    for i in range(total):
        d[f"n{i}"] = i
        progress.value = i
        d[f"t{i}"] = -i
        del other[f"t{i}"]
    done.set()
    d.close()
    other.close()


def _lin_reader(name: str, progress, done, conn) -> None:
    d = shareit.open(name, backend="shm")
    bad, reads = [], 0
    while not done.is_set() and len(bad) < 5:
        p = progress.value
        if p >= 0:
            got = d.get(f"n{p}")
            if got != p:
                bad.append(("completed insert not visible", p, got))
            t = d.get(f"t{p}")
            if t not in (None, -p):
                bad.append(("torn", p, t))
            size = len(d)
            p2 = progress.value  # (n_0..n_p2 and at most one t_i, or n_p2+1 just in)
            if not p + 1 <= size <= p2 + 2:
                bad.append(("len", p, size, p2))
            reads += 1
    conn.send((bad, reads))
    d.close()


def test_readers_see_completed_new_keys_and_never_uncommitted_ones(name) -> None:
    """A writer inserts n_i = i (flat), publishes i, inserts t_i and deletes it from a
    handle that did not place it (probed). A reader in another process that has seen i
    published must see n_i (linearizable), and t_i only whole or absent."""
    d = shareit.open(name, backend="shm")
    progress = FORK.Value("q", -1, lock=False)
    done = FORK.Event()
    parent, child = FORK.Pipe()
    w = FORK.Process(target=_lin_writer, args=(name, 3000, progress, done))
    r = FORK.Process(target=_lin_reader, args=(name, progress, done, child))
    try:
        r.start()
        w.start()
        child.close()
        assert join_all([w], 120) == [0]
        assert parent.poll(DEADLINE)
        bad, reads = parent.recv()
        assert join_all([r], DEADLINE) == [0]
        assert bad == [] and reads > 0
        assert len(d) == 3000 and d.verify() == []
    finally:
        for p in (w, r):
            if p.is_alive():
                p.kill()
                p.join(DEADLINE)
        d.close()


def test_a_closed_handle_neither_inserts_nor_deletes(name) -> None:
    a = shareit.open(name, backend="shm")
    b = shareit.open(name, backend="shm")
    try:
        a["warm"] = 0
        b["s"] = "x"
        a.close()
        with pytest.raises(ClosedError):
            a["new"] = 1
        with pytest.raises(ClosedError):
            a["new"] = 1.5
        with pytest.raises(ClosedError):
            del a["s"]
        assert b.snapshot() == {"warm": 0, "s": "x"} and b.verify() == []
    finally:
        b.close()
