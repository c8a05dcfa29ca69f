"""The shm ``Table`` driven directly: a writer killed between its locked steps, and the
one hot path that ``ShmMapping.__setitem__`` inlines pinned to ``Table.store_inline``."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shareit
from helpers import apply_op, by_steps, shm_state
from shareit.backends.shm import fastpath
from shareit.backends.shm import layout as L
from shareit.backends.shm.codec import encode_key, encode_value, f2i
from shareit.backends.shm.table import Table
from shareit.testing import join_all, shareit_files

FORK = mp.get_context("fork")
OLD = {"n": 1, "s": "old", "keep": [1, 2]}


def _encoded(key: object, value: object) -> tuple:
    kkind, kb = encode_key(key)
    return (key, kkind, kb, zlib.crc32(kb, kkind), *encode_value(value))


def steps_then_die(d, steps: str) -> None:
    """Take the lock and run ``steps`` of the table by hand, then die holding the lock."""
    t: Table = d._t
    t.wlock()
    if steps == "put":  # open transaction: rolled back
        t.journal.begin()
        t.put(*_encoded("s", "new" * 10))
        t.put(*_encoded("fresh", "new"))
    elif steps == "put+commit":  # committed, lock still held: kept
        t.journal.begin()
        t.put(*_encoded("s", "new" * 10))
        t.journal.commit()
    elif steps == "delete":
        _, kkind, kb, h, *_ = _encoded("s", None)
        e, slot = t.find(t.g, kkind, kb, h)
        t.journal.begin()
        t.delete(t.g, e, slot)
    elif steps == "build":  # a whole new generation built, never switched to
        t.build(t.g.gen + 1, extra_entries=10, extra_heap=1000)
    elif steps == "store_inline":  # the in-flight mark set, the word not yet written
        _, kkind, kb, h, *_ = _encoded("n", None)
        w = t.g.ew + t.find(t.g, kkind, kb, h)[0] * 4  # (the child's slots start empty)
        t.c[L.C_JSTATE] = (w << 2) | L.J_INLINE
        t.g.q[w] += 1  # odd: being written
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("steps, s_after", [
    ("put", "old"), ("put+commit", "new" * 10), ("delete", "old"), ("build", "old"),
    ("store_inline", "old"),
])
def test_a_writer_killed_between_table_steps_is_repaired(name, steps: str, s_after: str) -> None:
    d = shareit.open(name, backend="shm")
    try:
        d.update(OLD)
        child = FORK.Process(target=steps_then_die, args=(d, steps))
        child.start()
        assert join_all([child]) == [-signal.SIGKILL]
        assert d.snapshot() == {**OLD, "s": s_after}, "read without the lock: the committed state"
        assert d.verify() == [], "the next writer repaired the table"
        assert d.snapshot() == {**OLD, "s": s_after}
        d["n"] = 2
        assert d.incr("n") == 3
        gen = d.info()["generation"]
        assert shareit_files(name) == [f"{name}@ctl", f"{name}@g{gen}", f"{name}@lock",
                                       f"{name}@meta"], "a half-built generation leaked"
    finally:
        d.close()




@pytest.mark.parametrize("value", [7, -(2**63), 2**63 - 1, 2.5, -0.0, float("inf")])
def test_the_inlined_hot_path_does_what_table_store_inline_does(value) -> None:
    """``d[k] = number`` for a key this process has placed runs a copy of
    ``Table.store_inline`` inline (a call costs as much as the store): both must leave
    the same bytes in the control and the data segment."""
    kind = L.V_FLOAT if type(value) is float else L.V_INT
    a, b = shareit.open(backend="shm"), shareit.open(backend="shm")
    try:
        for m in (a, b):  # the same history: the same bytes
            m.update({"pad": "x" * 20, "n": 0.5 if kind == L.V_FLOAT else 1, "z": 3})
            m["n"] = 1.5 if kind == L.V_FLOAT else 2  # (now placed: the hot path applies)
        assert shm_state(a) == shm_state(b)
        tseq = a._t.c[L.C_TSEQ]
        a["n"] = value  # the inlined copy
        assert a._t.c[L.C_TSEQ] == tseq, "the hot path ran (it opens no transaction)"
        t: Table = b._t
        t.wlock()
        try:
            t.store_inline(t.slots["n"], f2i(value) if kind == L.V_FLOAT else value)
        finally:
            t.leave()
        assert shm_state(a) == shm_state(b)
        assert a["n"] == b["n"] == value or value != value
        assert a._t.c[L.C_JSTATE] == 0 and a._t.c[L.C_STAMP] == b._t.c[L.C_STAMP]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("via", ["write_flat", "mapping"])
@pytest.mark.parametrize("key", ["s", "fresh", b"b", 12])
@pytest.mark.parametrize("value", ["new", "new" * 10, b"\x00" * 24, [1, "two", (3.0,)], 7, None])
def test_the_flat_writes_do_what_the_steps_do(key, value, via) -> None:
    """``fastpath.write_flat`` does the commonest writes flat, for speed -- a value over
    a key's value that fits its room ("s"), a new key ("fresh") -- and must leave the
    bytes that ``enter``, ``Journal.begin``, ``put`` and ``Journal.commit`` leave, one
    call after another (whichever of the two ran, both must agree). ``d[k] = value``
    (``via="mapping"``) calls them itself, with the value encoded once: the same bytes."""
    a, b = shareit.open(backend="shm"), shareit.open(backend="shm")
    placed = key != "fresh"
    try:
        for m in (a, b):  # the same history: the same bytes; the key gets room for 5 words
            m.update({"pad": "x" * 20, "n": 1, "s": "old", b"b": "old", 12: "old"})
            for k in ("s", b"b", 12):
                m[k] = "y" * 40
                m[k] = "old"
        assert shm_state(a) == shm_state(b)
        item = _encoded(key, value)
        ta: Table = a._t
        flat = not placed or type(value) in (str, bytes, list)
        ta.journal.saved_header = placed  # (Journal.begin resets it; flat paths do not)
        if via == "mapping":
            a[key] = value
        else:
            ran = fastpath.write_flat(ta, *item)
            assert ran == flat
            if not ran:
                ta.set(*item)  # (the steps, as the mapping would go on to)
        if flat:
            assert ta.journal.saved_header == placed, "the flat path ran"
        tb: Table = b._t
        tb.enter()
        try:
            tb.journal.begin()
            tb.put(*item)
            tb.journal.commit()
        finally:
            tb.leave()
        assert shm_state(a) == shm_state(b)
        assert a[key] == b[key] == value and a.verify() == b.verify() == []
        assert a._t.slots == b._t.slots
    finally:
        a.close()
        b.close()


def overwrite_and_die(d, step: str) -> None:
    d["s"] = "x" * 40  # (the child places "s", with room: its next write of "s" is flat)
    d["s"] = "old"
    L.FAULT = step
    d["s"] = "new" * 10
    os._exit(3)


@pytest.mark.parametrize("step", ["after_begin", "mid_entry", "before_commit"])
def test_a_flat_write_after_a_writer_died_in_one(name, step: str) -> None:
    """The lock's last holder died in a flat write: the next flat write must take the
    lock from the dead (EOWNERDEAD), have the steps repair, and leave it usable."""
    d = shareit.open(name, backend="shm")
    try:
        d.update(OLD)
        d["s"] = "y" * 40  # (this process placed "s", with room: its writes of it are flat)
        d["s"] = "old"
        child = FORK.Process(target=overwrite_and_die, args=(d, step))
        child.start()
        assert join_all([child]) == [-signal.SIGKILL]
        d["s"] = "mine"  # flat if it could be: it must not be, until repaired
        d["fresh"] = "too"
        assert d.snapshot() == {**OLD, "s": "mine", "fresh": "too"} and d.verify() == []
        with d.lock():  # the lock is free and consistent
            d["s"] = "locked"
        assert d["s"] == "locked"
    finally:
        d.close()


@pytest.mark.parametrize("via", ["probe", "slots"])
@pytest.mark.parametrize("want", [False, True])
@pytest.mark.parametrize("key", ["s", "n", "pad", "absent"])
def test_the_flat_remove_does_what_the_steps_do(key: str, want: bool, via: str) -> None:
    """``fastpath.remove_flat`` (``del``, ``pop``) must leave the bytes that ``enter``,
    ``Journal.begin``, ``Table.delete`` and ``Journal.commit`` leave -- finding the key by
    a probe, or (``via="slots"``, as ``del d[k]`` does for a key this process placed) by
    its entry, with its index slot from the entry's hash."""
    a, b = shareit.open(backend="shm"), shareit.open(backend="shm")
    try:
        for m in (a, b):
            m.update({"pad": "x" * 20, "n": 1, "s": [1, 2]})
            m["s"] = "y" * 40
        assert shm_state(a) == shm_state(b)
        _, kkind, kb, h, *_ = _encoded(key, None)
        ta: Table = a._t
        ta.journal.saved_header = True  # (Journal.begin resets it; the flat path does not)
        w = ta.slots.get(key, -1) if via == "slots" else -1
        assert (w >= 0) == (via == "slots" and key != "absent")
        got_a = fastpath.remove_flat(ta, key, kkind, kb, h, want, w)
        assert got_a is not fastpath.NOT_FLAT and ta.journal.saved_header
        tb: Table = b._t
        tb.enter()
        try:
            got_b = tb.remove(key, kkind, kb, h, want)
        finally:
            tb.leave()
        assert shm_state(a) == shm_state(b)
        assert got_a == got_b or (got_a is got_b is fastpath.ABSENT)
        assert a.snapshot() == b.snapshot() and a.verify() == b.verify() == []
        assert a._t.slots == b._t.slots
    finally:
        a.close()
        b.close()


def test_a_flat_remove_that_compacts() -> None:
    """Deleting most keys compacts the table (a rebuild, under the flat path's lock)."""
    d = shareit.open(backend="shm")
    try:
        d.update({f"k{i}": str(i) for i in range(300)})
        gen = d.info()["generation"]
        for i in range(280):
            assert d.pop(f"k{i}") == str(i)
        assert d.info()["generation"] > gen and len(d) == 20
        assert d.snapshot() == {f"k{i}": str(i) for i in range(280, 300)} and d.verify() == []
        with d.lock():  # the lock is free again
            d["x"] = 1
    finally:
        d.close()


def test_regrowth_after_a_compaction_takes_few_rebuilds() -> None:
    """A batch deleted then the next inserted: the compactions shrink the table (memory
    follows the live data), and it grows back towards its size in one or two rebuilds
    (was one per 2.25x step), with no more than a bounded multiple of spare room."""
    d = shareit.open(backend="shm")
    try:
        for r in range(3):
            for i in range(3000):
                d[f"r{r}-{i}"] = "v" * 10
            peak = d.info()["capacity"]
            for i in range(3000):
                del d[f"r{r}-{i}"]
            info = d.info()
            assert info["capacity"] < peak // 8 and len(d) == 0
        gen = d.info()["generation"]
        for i in range(3000):
            d[f"x{i}"] = "v" * 10
        assert d.info()["generation"] - gen <= 3 and d.info()["capacity"] <= peak
        assert len(d) == 3000 and d.verify() == []
    finally:
        d.close()


def test_slots_survive_rebuilds() -> None:
    """A rebuild keeps the live entries in order, so this process's key -> entry slots are
    carried over (the flat writes go on for keys placed before it): each must name the
    entry a probe finds, through growth and compaction alike."""
    d = shareit.open(backend="shm")
    try:
        gen = d.info()["generation"]
        for i in range(300):  # grows several times
            d[f"k{i}"] = str(i)
        t: Table = d._t
        assert d.info()["generation"] > gen and len(t.slots) == 300

        def check() -> None:
            for key, w in t.slots.items():
                _, kkind, kb, h, *_ = _encoded(key, None)
                e, _ = t.find(t.g, kkind, kb, h)
                assert e >= 0 and t.g.ew + e * 4 == w, key

        check()
        gen = d.info()["generation"]
        for i in range(250):  # compacts (live < used / 4)
            del d[f"k{i}"]
        assert d.info()["generation"] > gen
        check()
        assert set(t.slots) <= {f"k{i}" for i in range(250, 300)}
        for i in range(250, 300):
            d[f"k{i}"] = "new" + str(i)  # in place, flat, after the rebuilds
        assert d.snapshot() == {f"k{i}": "new" + str(i) for i in range(250, 300)}
        assert d.verify() == []
    finally:
        d.close()


def test_an_unpicklable_value_says_what_would_work() -> None:
    """``d[k] = object`` pickles inline (no _codec.dumps frame) and keeps its error."""
    import threading

    d = shareit.open(backend="shm")
    try:
        with pytest.raises(TypeError, match="cannot be pickled"):
            d["x"] = threading.Lock()
        assert "x" not in d
        d["x"] = [1, ("a", 2.5)]
        assert d["x"] == [1, ("a", 2.5)]
    finally:
        d.close()


_KEYS = st.sampled_from(["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", 3, -9, b"b"])
_VALUES = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False),
                    st.text(max_size=30), st.binary(max_size=40), st.none(),
                    st.lists(st.integers(), max_size=3))
_OPS = st.lists(st.one_of(st.tuples(st.just("set"), _KEYS, _VALUES),
                          st.tuples(st.sampled_from(["del", "pop"]), _KEYS)),
                min_size=1, max_size=40)






@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_flat_writes_and_their_inline_probes_match_the_steps(ops) -> None:
    """Histories of sets (new keys, numbers, heap values) and deletes over a few keys of
    a small table -- probes past collisions and over deleted slots, reuse of a deleted
    slot, growth -- leave the very bytes the Table's steps leave, op after op."""
    a, b = shareit.open(backend="shm"), shareit.open(backend="shm")
    try:
        model: dict = {}
        for op in ops:
            got_a = apply_op(a, op)
            got_b = by_steps(b, op)
            assert got_a == got_b or got_a != got_a  # (a float nan is not drawn; -0.0 is)
            if op[0] == "set":
                model[op[1]] = op[2]
            else:
                model.pop(op[1], None)
            assert shm_state(a) == shm_state(b), op
        assert a.snapshot() == b.snapshot() == model
        assert a.verify() == b.verify() == []
    finally:
        a.close()
        b.close()


def test_flat_writes_inside_this_threads_lock() -> None:
    """Inside this thread's ``lock()`` the writes are still flat (the mutex is recursive:
    ``edit``, ``transform`` and user blocks gain by it), while another thread's write
    waits for the block's end."""
    import threading

    d = shareit.open(backend="shm")
    try:
        d["s"] = "y" * 40  # placed by this process, with room
        d["s"] = "old"
        d["gone"] = 1
        done = threading.Event()

        def other() -> None:
            d["b"] = "other"
            done.set()

        t: Table = d._t
        with d.lock():
            t.journal.saved_header = True  # (Journal.begin resets it; the flat paths do not)
            d["s"] = "new"  # overwrite in place
            d["fresh"] = "v"  # insert
            d["n"] = 5  # insert of a number
            del d["gone"]  # remove by its slot
            assert t.journal.saved_header, "a write inside lock() took the steps"
            b = threading.Thread(target=other)
            b.start()
            assert not done.wait(0.3), "another thread wrote inside this thread's lock()"
            assert "b" not in d
        b.join(10)
        assert done.is_set() and d["b"] == "other"
        assert d.snapshot() == {"s": "new", "fresh": "v", "n": 5, "b": "other"}
        assert d.verify() == [] and t.lock.depth == 0 and t.lock.busy == 0
    finally:
        d.close()
