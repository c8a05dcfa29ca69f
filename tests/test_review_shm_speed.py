"""Outside review of the shm backend's new hot paths (fastpath.py, read.py, cache.py).

Real processes and real shared memory only; no mocks. A child that must pause or die at
a precise point of a write uses the backend's own fault hook (``layout.fault``, called
by every flat path when ``layout.FAULT`` is set), replaced *in the child only* by one
that reports the step on a pipe and SIGSTOPs or SIGKILLs itself. Every wait on another
process is an event, a pipe or a /proc poll, bounded by a deadline.

Each finding was a strict xfail until fixed; the tests now guard the fixes (the reasons
are kept as comments), with the guards that held from the start.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
import zlib

import pytest

import shareit
from helpers import wait_stopped
from shareit.backends.shm import layout as L
from shareit.errors import BackendDiedError, NotFoundError
from shareit.testing import join_all
from shareit.testing.linearizability import run_random_history

FORK = mp.get_context("fork")
DEADLINE = 30.0
INPLACE_MAX = L.INPLACE_MAX_WORDS * 8  # 65024 bytes: the largest value rewritten in place


# ---------------------------------------------------------------------------- helpers


def make_value(kind: str, tag: str, size: int):
    """A self-describing value of about ``size`` encoded bytes: ``whole()`` recognises it,
    and any torn mix of two such values fails it."""
    head = f"{tag}|{size}|".encode()
    seed = zlib.crc32(tag.encode())
    body = bytes((seed + i) & 0x7F or 1 for i in range(max(0, size - len(head))))
    raw = head + body
    if kind == "bytes":
        return raw
    if kind == "str":
        return raw.decode("ascii")
    return {"tag": tag, "blob": raw}  # pickled


def whole(value) -> str:
    """The tag of a value made by ``make_value``, after checking every byte of it."""
    if isinstance(value, dict):
        raw = value["blob"]
        assert set(value) == {"tag", "blob"}
    elif isinstance(value, str):
        raw = value.encode("ascii")
    else:
        raw = value
    tag, size, _ = raw.split(b"|", 2)
    tag_s = tag.decode()
    assert raw == (make_value("bytes", tag_s, int(size))), f"torn value {raw[:40]!r}..."
    if isinstance(value, dict):
        assert value["tag"] == tag_s
    return tag_s




def _hooked_child(name: str, step: str, action: str, conn, ops) -> None:
    """Apply ``ops`` (a list of ("set", k, v) / ("pop", k) / ("del", k)) to ``name``; at the
    backend's fault point ``step`` of the LAST op, report on ``conn`` and SIGSTOP or
    SIGKILL this process. ``ops[:-1]`` run first, unhooked (they place keys in ``slots``)."""
    d = shareit.open(name, backend="shm")
    for op in ops[:-1]:
        _apply(d, op)

    def hook(s: str) -> None:
        if s == step:
            conn.send(("at", s))
            os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)

    L.fault = hook
    L.FAULT = "hooked"
    _apply(d, ops[-1])
    L.FAULT = None
    conn.send(("done", None))
    d.close()


def _apply(d, op) -> None:
    if op[0] == "set":
        d[op[1]] = op[2]
    elif op[0] == "pop":
        d.pop(op[1], None)
    elif op[0] == "del":
        del d[op[1]]


def run_hooked(name: str, step: str, action: str, ops):
    """Start ``_hooked_child``; return (process, conn) once it sits at ``step`` (stopped)
    or has died there; None as conn if it completed the op without reaching the step."""
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_hooked_child, args=(name, step, action, child, ops))
    p.start()
    child.close()
    if not parent.poll(DEADLINE):
        p.kill()
        p.join()
        raise AssertionError("hooked child never reported")
    what, _ = parent.recv()
    if what == "done":
        join_all([p], DEADLINE)
        return p, None
    if action == "stop":
        wait_stopped(p.pid, DEADLINE)
    else:
        assert join_all([p], DEADLINE) == [-signal.SIGKILL]
    return p, parent


def finish_stopped(p, conn, kill: bool) -> None:
    if kill:
        os.kill(p.pid, signal.SIGKILL)
        assert join_all([p], DEADLINE) == [-signal.SIGKILL]
    else:
        os.kill(p.pid, signal.SIGCONT)
        assert conn.poll(DEADLINE), "the continued writer did not finish"
        assert conn.recv()[0] == "done"
        assert join_all([p], DEADLINE) == [0]
    conn.close()


def _fresh_read(name: str, keys, conn) -> None:
    """In a new process (empty caches): every key's tag, or None if absent."""
    d = shareit.open(name, backend="shm")
    out = {}
    for k in keys:
        try:
            out[k] = whole(d[k])
        except KeyError:
            out[k] = None
    conn.send(out)
    d.close()


def fresh_read(name: str, keys) -> dict:
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_fresh_read, args=(name, keys, child))
    p.start()
    child.close()
    assert parent.poll(DEADLINE), "fresh reader hung"
    out = parent.recv()
    assert join_all([p], DEADLINE) == [0]
    parent.close()
    return out


def tags(d, keys) -> dict:
    out = {}
    for k in keys:
        try:
            out[k] = whole(d[k])
        except KeyError:
            out[k] = None
    return out


@pytest.fixture
def shm(name):
    d = shareit.open(name, backend="shm")
    yield d
    try:
        d.close()
    except Exception:
        pass


# ---------------------------------------------------------------------------- FINDING 1
# A key whose heap room is larger than 32767 words + the new value (an old value above
# ~256 KB: appended with no spare, so all its words are "room") gets a small value written
# in place, and the new spare (room - words) no longer fits the 15 bits of meta[17..31]:
# ``u32[...] = ... | spare << SPARE_SHIFT`` raises ValueError in the middle of the write.
#  - fastpath.overwrite: raised with the (recursive, robust) writer mutex held, tseq odd,
#    the entry's version odd; no try/finally, so the lock is never released: every other
#    process's write times out until this process exits.
#  - Table.put (a process that did not place the key): the transaction is rolled back and
#    the user gets ValueError: the key can never be given a smaller value.

SPARE_REASON = ("in-place overwrite of a small value over a >256 KB room: spare = room - "
                "words exceeds SPARE_MAX (15 bits), the u32 meta store raises ValueError "
                "mid-write (fastpath.overwrite: with the writer lock held and never released)")


# Was: SPARE_REASON (fixed: no in-place write whose spare would not fit)
def test_small_value_over_a_huge_one_by_the_placing_process(shm) -> None:
    shm["k"] = b"x" * 300_000  # appended, spare 0: room = 37,500 words
    shm["k"] = b"y" * 1000  # in place: spare 37,375 > SPARE_MAX
    assert shm["k"] == b"y" * 1000


def _write_with_timeout(name: str, conn) -> None:
    d = shareit.open(name, backend="shm", timeout=2.0)
    try:
        d["other"] = "from another process"
        conn.send("ok")
    except Exception as exc:
        conn.send(f"{type(exc).__name__}: {exc}")
    d.close()


# Was: SPARE_REASON, and the lock leaked to other processes (fixed)
def test_a_failed_in_place_overwrite_does_not_keep_the_writer_lock(shm, name) -> None:
    shm["k"] = b"x" * 300_000
    try:
        shm["k"] = b"y" * 1000
    except ValueError:
        pass
    parent, child = FORK.Pipe()
    p = FORK.Process(target=_write_with_timeout, args=(name, child))
    p.start()
    assert parent.poll(DEADLINE)
    got = parent.recv()
    assert join_all([p], DEADLINE) == [0]
    assert got == "ok", got


def _place_huge(name: str) -> None:
    d = shareit.open(name, backend="shm")
    d["k"] = "x" * 300_000
    d.close()


# Was: SPARE_REASON in Table.put: rolled back, ValueError (fixed)
def test_small_value_over_a_huge_one_placed_by_another_process(shm, name) -> None:
    shm["pad"] = 1
    p = FORK.Process(target=_place_huge, args=(name,))
    p.start()
    assert join_all([p], DEADLINE) == [0]
    shm["k"] = "small"  # not in this process's slots: Table.put's in-place branch
    assert shm["k"] == "small"


def test_small_value_over_a_room_just_within_spare_max(shm) -> None:
    """Guard: a room of SPARE_MAX + words fits, and verify() stays clean."""
    words = 125
    shm["k"] = b"x" * ((L.SPARE_MAX + words) * 8)
    shm["k"] = b"y" * (words * 8)
    assert shm["k"] == b"y" * (words * 8)
    assert shm.verify() == []
    shm["k"] = b"z" * (words * 8 + 8 * 1000)  # grows into its spare
    assert shm["k"] == b"z" * (words * 8 + 8000)
    assert shm.verify() == []


# ---------------------------------------------------------------------------- SIGSTOP / SIGKILL
# a writer paused or killed at each fault point of a flat write, readers meanwhile

SIZES = [16376, 16384, 16392, INPLACE_MAX - 8, INPLACE_MAX, INPLACE_MAX + 8]
STEPS = ["after_begin", "mid_entry", "after_write", "before_commit"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["bytes", "str", "pickle"])
def test_a_stopped_in_place_overwrite_reads_old_and_whole(shm, name, kind, size) -> None:
    """The writer placed ``k`` (room for INPLACE_MAX + 8 bytes) and is SIGSTOPped after
    writing the new bytes but before the commit: every reader -- one that cached ``k``,
    a fresh process, ``snapshot`` -- gets the old value, whole; after SIGCONT the new one."""
    keys = ["k", "a", "b"]
    old = make_value(kind, "old", size - 40)
    shm["a"] = make_value(kind, "a", 100)
    ops = [("set", "k", make_value(kind, "room", INPLACE_MAX + 8 + 4000)),  # big room
           ("set", "k", old),  # in place, or appended for the last size
           ("set", "k", make_value(kind, "new", size))]
    # place k and old in a first child, so the parent caches the committed "old"
    p, conn = run_hooked(name, "never", "stop", ops[:2] + [("set", "b", make_value(kind, "b", 50))])
    assert conn is None
    assert tags(shm, keys) == {"k": "old", "a": "a", "b": "b"}  # cached now
    p, conn = run_hooked(name, "after_write", "stop", [("set", "k", old), ops[2]])
    assert conn is not None
    try:
        assert shm._t.c[L.C_TSEQ] & 1, "stopped inside a transaction"
        for _ in range(3):
            assert tags(shm, keys) == {"k": "old", "a": "a", "b": "b"}
        assert fresh_read(name, keys) == {"k": "old", "a": "a", "b": "b"}
        snap = shm.snapshot()
        assert whole(snap["k"]) == "old" and len(snap) == 3
        assert len(shm) == 3
        assert "k" in shm
    finally:
        finish_stopped(p, conn, kill=False)
    assert tags(shm, keys) == {"k": "new", "a": "a", "b": "b"}
    assert fresh_read(name, keys)["k"] == "new"
    assert shm.verify() == []


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("op", ["overwrite40k", "overwrite63k", "insert", "remove_slot",
                                "pop_probe", "grow_insert"])
@pytest.mark.parametrize("action", ["kill", "stop_then_kill"])
def test_a_writer_killed_at_each_step_of_a_flat_write(shm, name, op, step, action) -> None:
    """Old value (or absence) for every key while the writer is stopped and after it
    dies; verify() == [] once the next writer rolled back; the next writer proceeds."""
    base = {f"p{i}": make_value("bytes", f"p{i}", 50 + 300 * i) for i in range(6)}
    base["k"] = make_value("bytes", "k-old", 40_000)
    shm.update(base)
    shm["k"] = make_value("bytes", "k-room", INPLACE_MAX)  # room for the in-place writes
    shm["k"] = base["k"]
    expect_old = {k: whole(v) for k, v in base.items()}
    expect_old["fresh"] = None
    keys = list(expect_old)
    assert tags(shm, keys) == expect_old  # all cached in this process
    if op == "overwrite40k":
        ops = [("set", "k", base["k"]), ("set", "k", make_value("bytes", "k-new", 40_008))]
    elif op == "overwrite63k":
        ops = [("set", "k", base["k"]), ("set", "k", make_value("bytes", "k-new", INPLACE_MAX))]
    elif op == "insert":
        ops = [("set", "fresh", make_value("str", "fresh", 30_000))]
    elif op == "remove_slot":  # placed by the child: remove_flat's slot path
        ops = [("set", "k", base["k"]), ("pop", "k")]
    elif op == "pop_probe":  # not placed by the child: remove_flat's probe path
        ops = [("pop", "k")]
    else:  # the child's insert after it grew the table: the flat insert in a new generation
        ops = [("set", f"g{i}", "g") for i in range(40)] + [("pop", f"g{i}") for i in range(40)] \
            + [("set", "fresh", make_value("str", "fresh", 100))]
        expect_old.update({f"g{i}": None for i in range(40)})
        keys = list(expect_old)
    p, conn = run_hooked(name, step, "stop" if action.startswith("stop") else "kill", ops)
    if conn is None:  # (this op never reaches ``step``)
        return
    if action.startswith("stop"):
        try:
            assert tags(shm, keys) == expect_old
            assert fresh_read(name, keys) == expect_old
        finally:
            finish_stopped(p, conn, kill=True)
    assert tags(shm, keys) == expect_old, "read of a dead writer's table: the committed state"
    assert fresh_read(name, keys) == expect_old
    assert shm.verify() == []
    assert tags(shm, keys) == expect_old
    shm["k"] = make_value("bytes", "k-next", 30_000)  # the next writer proceeds
    shm["fresh2"] = "x"
    assert whole(shm["k"]) == "k-next" and shm.verify() == []


def _random_writer(name: str, seed: int, n: int, done, sizes) -> None:
    d = shareit.open(name, backend="shm")
    for i, op in enumerate(plan(seed, n, sizes)):
        _apply(d, op)
        done.value = i + 1


def plan(seed: int, n: int, sizes) -> list:
    rnd = random.Random(seed)
    ops = []
    for i in range(n):
        k = f"k{rnd.randrange(6)}"
        r = rnd.random()
        if r < 0.15:
            ops.append(("pop", k))
        else:
            kind = rnd.choice(["bytes", "str", "pickle"])
            ops.append(("set", k, make_value(kind, f"{seed}-{i}", rnd.choice(sizes))))
    return ops


def model(state: dict, ops) -> dict:
    s = dict(state)
    for op in ops:
        if op[0] == "set":
            s[op[1]] = whole(op[2])
        else:
            s.pop(op[1], None)
    return s


@pytest.mark.parametrize("sizes", [(40_000, 40_008, 39_000),
                                   (16, 4000, 16_384, INPLACE_MAX, 70_000)])
def test_sigkill_at_random_moments_leaves_old_or_new(shm, name, sizes) -> None:
    """A child loops over overwrites (large, in place), inserts, pops; the parent SIGKILLs
    it at random moments. The table is then the state after the last finished op or after
    the one in flight, whole, verify() == [], and the next writer proceeds."""
    rnd = random.Random(1234 + len(sizes))
    keys = [f"k{i}" for i in range(6)]
    state = dict.fromkeys(keys)
    for round_ in range(12):
        seed = rnd.randrange(1 << 30)
        n = 60
        ops = plan(seed, n, sizes)
        done = FORK.Value("l", 0, lock=False)
        p = FORK.Process(target=_random_writer, args=(name, seed, n, done, sizes))
        p.start()
        target = rnd.randrange(1, n - 1)
        end = time.monotonic() + DEADLINE
        while done.value < target and p.is_alive() and time.monotonic() < end:
            pass  # spin: the kill lands at a random instant of the next writes
        for _ in range(rnd.randrange(3000)):
            pass
        os.kill(p.pid, signal.SIGKILL)
        codes = join_all([p], DEADLINE)
        k_done = done.value
        before = model({k: v for k, v in state.items() if v}, ops[:k_done])
        after = model(before, ops[k_done : k_done + 1])
        now = {k: v for k, v in tags(shm, keys).items() if v is not None}
        assert now in (before, after), (round_, k_done, codes)
        assert fresh_read(name, keys) == {k: now.get(k) for k in keys}
        assert shm.verify() == []
        state = {k: now.get(k) for k in keys}
    shm["k0"] = make_value("bytes", "last", 20_000)
    assert whole(shm["k0"]) == "last" and shm.verify() == []


# ---------------------------------------------------------------------------- cached hits


def _stepper(name: str, conn) -> None:
    """Run the step functions the parent names, one at a time, acknowledging each."""
    d = shareit.open(name, backend="shm")
    while True:
        if not conn.poll(DEADLINE):
            return
        msg = conn.recv()
        if msg is None:
            break
        try:
            STEPPER_STEPS[msg](d)
            conn.send("ok")
        except Exception as exc:
            conn.send(f"{type(exc).__name__}: {exc}")
    d.close()


def _del_k_insert_same_gen(d) -> None:
    del d["K"]
    for i in range(3):
        d[f"n{i}"] = f"value-of-n{i}"


def _reinsert_k(d) -> None:
    d["K"] = "K-second"


def _grow(d) -> None:
    for i in range(200):
        d[f"g{i}"] = f"value-of-g{i}"


def _compact(d) -> None:
    for i in range(200):
        del d[f"g{i}"]


def _set_k_big(d) -> None:
    d["K"] = "K-big-" + "z" * 20_000


def _clear(d) -> None:
    d.clear()


STEPPER_STEPS = {"del_insert": _del_k_insert_same_gen, "reinsert": _reinsert_k,
                 "grow": _grow, "compact": _compact, "big": _set_k_big, "clear": _clear}


class Stepper:
    def __init__(self, name: str):
        self.conn, child = FORK.Pipe()
        self.p = FORK.Process(target=_stepper, args=(name, child))
        self.p.start()
        child.close()

    def __call__(self, step: str) -> None:
        self.conn.send(step)
        assert self.conn.poll(DEADLINE), f"step {step} hung"
        assert self.conn.recv() == "ok"

    def close(self) -> None:
        self.conn.send(None)
        assert join_all([self.p], DEADLINE) == [0]


def test_a_cached_key_deleted_and_replaced_by_other_keys_elsewhere(shm, name) -> None:
    """The reader cached K; another process deletes K, inserts other keys (same
    generation, then growth, then compaction, then clear): the reader never returns
    another key's value nor a stale one once the writer returned."""
    shm["K"] = "K-first"
    shm["x"] = 5
    assert shm["K"] == "K-first" and shm["x"] == 5  # cached
    s = Stepper(name)
    try:
        s("del_insert")
        with pytest.raises(KeyError):
            shm["K"]
        assert "K" not in shm and shm.get("K") is None
        assert [shm[f"n{i}"] for i in range(3)] == [f"value-of-n{i}" for i in range(3)]
        s("reinsert")
        assert shm["K"] == "K-second"
        gen = shm._t.c[L.C_GEN]
        s("grow")
        assert shm._t.c[L.C_GEN] > gen, "grown by the other process"
        assert shm._t.gen == gen, "this process still maps the old generation"
        assert shm["K"] == "K-second" and shm["x"] == 5
        s("big")
        assert shm["K"] == "K-big-" + "z" * 20_000
        s("compact")
        assert shm["K"] == "K-big-" + "z" * 20_000 and shm["x"] == 5
        with pytest.raises(KeyError):
            shm["g3"]
        s("clear")
        with pytest.raises(KeyError):
            shm["K"]
        assert len(shm) == 0
        s("reinsert")
        assert shm["K"] == "K-second"
    finally:
        s.close()
    assert shm.verify() == []


def test_slots_after_another_process_rebuilt(shm, name) -> None:
    """This process placed keys (its key -> entry cache); another process grows and then
    compacts the table (entries renumbered). This process's flat overwrite, insert and
    delete must then hit the right entries."""
    for i in range(10):
        shm[f"mine{i}"] = make_value("bytes", f"mine{i}", 200)
    shm["K"] = "K-first"
    s = Stepper(name)
    try:
        s("grow")
        s("del_insert")  # K gone, n0..n2 added
        s("compact")
    finally:
        s.close()
    for i in range(10):
        shm[f"mine{i}"] = make_value("bytes", f"mine{i}-2", 100)  # in place (room 200)
    del shm["mine3"]
    assert shm.pop("mine4") is not None
    shm["K"] = "K-mine"
    assert shm.snapshot() == {**{f"mine{i}": make_value("bytes", f"mine{i}-2", 100)
                                 for i in range(10) if i not in (3, 4)},
                              **{f"n{i}": f"value-of-n{i}" for i in range(3)}, "K": "K-mine"}
    assert shm.verify() == []


def _fork_child_writes(d, conn) -> None:
    d["mine"] = make_value("bytes", "child", 150)  # a key the parent placed
    d["childkey"] = "c"
    del d["gone"]
    conn.send(whole(d["mine"]))


def test_after_fork(shm) -> None:
    """The parent placed and cached keys; a forked child (slots cleared) overwrites,
    inserts, deletes; the parent's cached hits and flat writes follow."""
    shm["mine"] = make_value("bytes", "parent", 300)
    shm["gone"] = "g"
    assert whole(shm["mine"]) == "parent" and shm["gone"] == "g"
    a, b = FORK.Pipe()
    p = FORK.Process(target=_fork_child_writes, args=(shm, b))
    p.start()
    assert a.poll(DEADLINE) and a.recv() == "child"
    assert join_all([p], DEADLINE) == [0]
    assert whole(shm["mine"]) == "child"
    assert shm["childkey"] == "c" and "gone" not in shm
    shm["mine"] = make_value("bytes", "parent2", 280)
    shm["gone"] = "again"
    assert whole(shm["mine"]) == "parent2" and shm["gone"] == "again"
    assert shm.verify() == []


def _destroy_recreate(name: str, conn) -> None:
    shareit.destroy(name, backend="shm")
    d = shareit.open(name, backend="shm")
    d["K"] = "from the new table"
    conn.send("ok")
    assert conn.poll(DEADLINE)
    conn.recv()
    d.close()


def test_destroyed_and_recreated_while_a_reader_holds_a_cached_hit(name) -> None:
    d = shareit.open(name, backend="shm")
    try:
        d["K"] = "old table"
        d["n"] = 7
        assert d["K"] == "old table" and d["n"] == 7  # cached
        a, b = FORK.Pipe()
        p = FORK.Process(target=_destroy_recreate, args=(name, b))
        p.start()
        assert a.poll(DEADLINE) and a.recv() == "ok"
        try:
            for k in ("K", "n"):
                with pytest.raises((BackendDiedError, NotFoundError, KeyError)):
                    v = d[k]
                    raise AssertionError(f"stale {k}={v!r} from a destroyed table")
        finally:
            a.send("bye")
            assert join_all([p], DEADLINE) == [0]
    finally:
        try:
            d.close()
        except Exception:
            pass
        try:
            shareit.destroy(name, backend="shm")
        except Exception:
            pass


def test_rollback_of_a_killed_insert_then_the_entry_reused(shm, name) -> None:
    """A writer killed after writing an insert's entry (not committed) is rolled back; the
    next insert reuses the entry number. A reader that cached other keys, and read the
    killed key meanwhile, must see the rolled-back key absent and the new one right."""
    shm["A"] = "A-value"
    assert shm["A"] == "A-value"
    for step in ("after_write", "before_commit"):
        p, conn = run_hooked(name, step, "stop", [("set", "B", "B-never-committed")])
        try:
            with pytest.raises(KeyError):
                shm["B"]
            assert shm["A"] == "A-value"
        finally:
            finish_stopped(p, conn, kill=True)
        with pytest.raises(KeyError):
            shm["B"]
        shm["C" + step] = "C-value"  # rolls back, reuses the entry
        with pytest.raises(KeyError):
            shm["B"]
        assert shm["C" + step] == "C-value" and shm["A"] == "A-value"
        assert fresh_read(name, []) == {}
        assert shm.verify() == []


# ---------------------------------------------------------------------------- linearizability

MIXES = [
    (("get", 5), ("set", 4), ("del", 4), ("snapshot", 1)),
    (("get", 4), ("set", 2), ("del", 3), ("incr", 2), ("update", 2)),
]


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("seed", [11, 12])
def test_linearizable_with_a_killed_worker(name, mix, seed) -> None:
    d = shareit.open(name, backend="shm")
    try:
        d.update({"a": 1, "b": "x" * 20_000, "c": 3})  # a big value: its room is reused
        r = run_random_history(d, workers=3, ops_per_worker=50, kill=True, mix=mix, seed=seed,
                               timeout=60)
        assert r.ok, r.explain()
        assert d.verify() == []
    finally:
        d.close()


# ---------------------------------------------------------------------------- live races


def _hammer(name: str, n: int, done, started, sizes, go) -> None:
    """Overwrite ``k{j}`` in place (and now and then pop and re-insert, and grow and
    compact with filler keys); ``started``/``done`` count the writes begun / returned."""
    d = shareit.open(name, backend="shm")
    rnd = random.Random(7)
    go.wait(DEADLINE)
    for i in range(1, n + 1):
        j = i % 3
        kind = ("bytes", "str", "pickle")[i % 3]
        started.value = i
        if i % 37 == 0:
            d.pop(f"k{j}")
            d[f"k{j}"] = make_value(kind, f"k{j}-{i:06d}", rnd.choice(sizes))
        elif i % 53 == 0:
            for x in range(60):
                d[f"f{x}"] = x
            for x in range(60):
                del d[f"f{x}"]
            d[f"k{j}"] = make_value(kind, f"k{j}-{i:06d}", rnd.choice(sizes))
        else:
            d[f"k{j}"] = make_value(kind, f"k{j}-{i:06d}", rnd.choice(sizes))
        done.value = i


@pytest.mark.parametrize("sizes", [(0, 7, 16376, 16384, 16392),
                                   (INPLACE_MAX - 8, INPLACE_MAX, INPLACE_MAX + 8, 40_000)])
def test_readers_racing_in_place_overwrites_see_whole_committed_values(shm, name, sizes) -> None:
    """A writer rewrites three keys in place as fast as it can (and pops, re-inserts, grows
    and compacts now and then); this process reads them (through its cache: hits, rereads,
    misses) and checks every value is whole, is the key's own, and is never older than a
    write that had returned before the read began nor newer than one begun after it."""
    for j in range(3):
        shm[f"k{j}"] = make_value("bytes", f"k{j}-{0:06d}", INPLACE_MAX + 8)  # room
    n = 400
    done = FORK.Value("l", 0, lock=False)
    started = FORK.Value("l", 0, lock=False)
    go = FORK.Event()
    p = FORK.Process(target=_hammer, args=(name, n, done, started, sizes, go))
    p.start()
    last = {f"k{j}": 0 for j in range(3)}
    reads = 0
    try:
        go.set()
        end = time.monotonic() + DEADLINE
        while p.is_alive() and done.value < n and time.monotonic() < end:
            for j in range(3):
                k = f"k{j}"
                floor = done.value
                try:
                    v = shm[k]
                except KeyError:
                    continue  # popped and not yet re-inserted (checked below otherwise)
                ceiling = started.value
                tag = whole(v)
                key, i = tag.rsplit("-", 1)
                i = int(i)
                assert key == k, f"{k} read as another key's value {tag}"
                assert i <= ceiling, f"{k}: {i} read before it was begun ({ceiling})"
                newest_done_for_k = max((x for x in range(floor - 2, floor + 1) if x % 3 == j
                                         and x >= 1), default=0)
                assert i >= newest_done_for_k, f"{k}: stale {i} after {newest_done_for_k} returned"
                assert i >= last[k], f"{k}: went back from {last[k]} to {i}"
                last[k] = i
                reads += 1
    finally:
        assert join_all([p], DEADLINE) == [0]
    assert reads > 50
    assert shm.verify() == []
    for j in range(3):
        assert whole(shm[f"k{j}"]).startswith(f"k{j}-")


# ---------------------------------------------------------------------------- FINDING 2
# ``fastpath.overwrite`` and ``fastpath.insert`` run their whole transaction with no
# try/finally (``remove_flat`` has one; ``Table.set`` aborts and unlocks on BaseException).
# An exception delivered asynchronously inside them -- KeyboardInterrupt, or any signal
# handler that raises (alarm-based timeouts) -- leaves the recursive writer mutex locked by
# this process for good, tseq odd and jstate set: every other process's write times out
# until this process exits.

class Interrupted(Exception):
    pass


def _interrupted_writer(name: str, op: str, step: str, conn) -> None:
    d = shareit.open(name, backend="shm")
    d["k"] = "k" * 400  # placed: the flat overwrite applies; room for 400 bytes
    d["gone"] = "g"

    def handler(signum, frame):
        raise Interrupted

    signal.signal(signal.SIGUSR1, handler)

    def hook(s: str) -> None:
        if s == step:
            os.kill(os.getpid(), signal.SIGUSR1)  # delivered at the next bytecode: inside

    L.fault = hook
    L.FAULT = "hooked"
    try:
        if op == "overwrite":
            d["k"] = "n" * 300
        elif op == "insert":
            d["fresh"] = "f" * 100
        elif op == "remove":
            del d["gone"]
        elif op == "steps":  # a pickled value over a key not placed: Table.set's steps
            d["other"] = [1, 2]
        outcome = "completed"
    except Interrupted:
        outcome = "interrupted"
    L.FAULT = None
    conn.send(outcome)
    conn.poll(DEADLINE)  # stay alive (holding whatever we hold) until the parent is done
    d.close()


INTERRUPT_REASON = ("fastpath.overwrite/insert have no try/finally: an exception raised "
                    "inside (KeyboardInterrupt, a raising signal handler) leaves the "
                    "recursive writer mutex held by this process, tseq odd, jstate set")


@pytest.mark.parametrize("op, step", [
    ("overwrite", "mid_entry"),  # was INTERRUPT_REASON (fixed: fastpath._abandon)
    ("insert", "after_write"),  # was INTERRUPT_REASON (fixed)
    ("remove", "mid_entry"),  # guard: remove_flat unlocks in its finally; next writer rolls back
    ("steps", "mid_entry"),  # guard: Table.set aborts and unlocks
])
def test_an_exception_inside_a_flat_write_releases_the_lock(name, op, step) -> None:
    shm = shareit.open(name, backend="shm", capacity=1000)  # room: the flat insert applies
    shm["other"] = 1
    a, b = FORK.Pipe()
    p = FORK.Process(target=_interrupted_writer, args=(name, op, step, b))
    p.start()
    try:
        assert a.poll(DEADLINE)
        assert a.recv() == "interrupted", "the exception was delivered inside the write"
        other = shareit.open(name, backend="shm", timeout=2.0)
        try:
            other["after"] = "written by another process"  # LockTimeoutError if leaked
            assert other["after"] == "written by another process"
            assert other.verify() == []
            assert other["k"] == "k" * 400 and "fresh" not in other and other["gone"] == "g"
        finally:
            other.close()
    finally:
        a.send("bye")
        join_all([p], DEADLINE)
        shm.close()


# ---------------------------------------------------------------------------- FINDING 3
# A writer killed between the two stores of a commit (``jstate = 0``; ``tseq += 1``) leaves
# tseq odd with jstate 0: recovery will KEEP its write, readers meanwhile lay its journal
# over the data. The lock's next taker gets EOWNERDEAD, and the flat paths then do
# ``make_consistent(); unlock()`` and only afterwards re-take the lock to recover. In that
# gap the inline numeric store (``ShmMapping.__setitem__``'s hot path, ``store_number``)
# takes the lock by ``trylock`` and checks gen/jstate/grow -- but not tseq -- so it writes
# a key while readers still overlay the dead writer's pre-images: a read made after
# ``d[k] = 7`` returned gets the value from before the dead writer (stale; the overlay
# hides the new word) until someone recovers. (Every other flat path checks ``tseq & 1``.)

def _die_between_commit_stores(name: str) -> None:
    import zlib as _z

    from shareit.backends.shm.codec import encode_key, encode_value

    d = shareit.open(name, backend="shm")
    t = d._t
    t.wlock()
    kkind, kb = encode_key("K")
    t.journal.begin()
    t.put("K", kkind, kb, _z.crc32(kb, kkind), *encode_value(2))
    t.c[L.C_JSTATE] = 0  # Journal.commit's first store: committed for recovery...
    os.kill(os.getpid(), signal.SIGKILL)  # ...but tseq still odd


def _read_k(name: str, conn) -> None:
    d = shareit.open(name, backend="shm")
    conn.send(d["K"])
    d.close()


# Was a strict xfail: the inline numeric store did not check tseq & 1, so between
# EOWNERDEAD's unlock and the recovery it wrote under a dead writer's overlay (fixed).
def test_inline_store_in_the_gap_after_a_writer_died_mid_commit(name) -> None:
    d3 = shareit.open(name, backend="shm")
    d2 = None
    try:
        d3["K"] = 1
        d3["K"] = 1  # placed in d3's slots: the inline hot path applies
        p = FORK.Process(target=_die_between_commit_stores, args=(name,))
        p.start()
        assert join_all([p], DEADLINE) == [-signal.SIGKILL]
        # another process's flat write got EOWNERDEAD and made the mutex consistent; it is
        # about to re-take the lock and recover (what fastpath.insert/overwrite do first):
        d2 = shareit.open(name, backend="shm")
        lk = d2._t.lock
        lk.setup()
        assert lk.trylock() == 130  # EOWNERDEAD
        lk.mutex.make_consistent()
        lk.unlock()
        d3["K"] = 7  # the inline hot path: returns
        a, b = FORK.Pipe()
        r = FORK.Process(target=_read_k, args=(name, b))
        r.start()
        assert a.poll(DEADLINE)
        got = a.recv()
        assert join_all([r], DEADLINE) == [0]
        assert got == 7, f"read after d[K] = 7 returned: {got}"
    finally:
        if d2 is not None:
            d2.close()
        d3.close()


def test_own_compaction_and_growth_keep_slots_right(shm) -> None:
    """Guard: this process's own remove_flat compaction (rank path of _moved_slots) and its
    own growth with deleted entries present keep its key -> entry cache right."""
    for i in range(100):
        shm[f"a{i}"] = make_value("bytes", f"a{i}", 64)
    gen = shm._t.gen
    for i in range(100):
        if i % 4 != 3 or i == 99:
            del shm[f"a{i}"]
    assert shm._t.gen > gen, "compacted by remove_flat"
    keep = range(3, 99, 4)
    for i in keep:
        shm[f"a{i}"] = make_value("bytes", f"a{i}-2", 60)  # flat, in place
    del shm["a3"]  # a deleted entry before the growth: the rank path again
    gen = shm._t.gen
    for i in range(300):
        shm[f"b{i}"] = i  # growth
    assert shm._t.gen > gen
    for i in keep[1::2]:
        assert shm.pop(f"a{i}") == make_value("bytes", f"a{i}-2", 60)
    for i in keep[2::2]:
        shm[f"a{i}"] = make_value("bytes", f"a{i}-3", 56)
    expect = {f"a{i}": make_value("bytes", f"a{i}-3", 56) for i in keep[2::2]}
    expect.update({f"b{i}": i for i in range(300)})
    assert shm.snapshot() == expect
    assert shm.verify() == []


def test_update_of_two_big_in_place_values_overflows_the_journal_into_a_rebuild(shm, name) -> None:
    """Guard: two in-place rewrites of ~63 KB in one update() do not fit the journal
    (8,160 words): rolled back and done by a rebuild, atomically for readers."""
    for k in ("x", "y"):
        shm[k] = make_value("bytes", f"{k}-room", INPLACE_MAX)
    gen = shm._t.gen
    shm.update({"x": make_value("bytes", "x-new", INPLACE_MAX - 16),
                "y": make_value("bytes", "y-new", INPLACE_MAX - 24)})
    assert fresh_read(name, ["x", "y"]) == {"x": "x-new", "y": "y-new"}
    assert tags(shm, ["x", "y"]) == {"x": "x-new", "y": "y-new"}
    assert shm._t.gen > gen and shm.verify() == []


@pytest.mark.parametrize("new_kind, new_size", [("bytes", 29_000), ("pickle", 30_016)])
@pytest.mark.parametrize("key", [12345, b"bk", -7])
def test_stopped_overwrite_of_int_and_bytes_keys(shm, name, key, new_kind, new_size) -> None:
    """Guard: the same as for str keys (lookup(), not get_str(), serves these)."""
    shm[key] = make_value("bytes", "old", 30_000)
    shm[key + 1 if isinstance(key, int) else key + b"2"] = make_value("str", "other", 10)
    assert whole(shm[key]) == "old"
    p, conn = run_hooked(name, "after_write", "stop",
                         [("set", key, make_value("bytes", "old", 30_000)),
                          ("set", key, make_value(new_kind, "new", new_size))])
    assert conn is not None
    try:
        assert whole(shm[key]) == "old" and key in shm
        assert fresh_read(name, [key])[key] == "old"
        assert whole(shm.snapshot()[key]) == "old"
    finally:
        finish_stopped(p, conn, kill=False)
    assert whole(shm[key]) == "new" and fresh_read(name, [key])[key] == "new"
    assert shm.verify() == []
