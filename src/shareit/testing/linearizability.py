"""Record histories of concurrent operations from real processes, and check them.

A history is linearizable when every operation can be given one instant
between its invocation and its return such that, in the order of those
instants, each result is what a plain ``dict`` would have answered. This
module checks that with the Wing–Gong–Lowe search (as Knossos and Porcupine
do), per group of keys that no operation spans (P-compositionality: a group
is a key, or keys joined by an ``update`` or a ``snapshot``).

Recording (:class:`Recorder`): each process appends one line per invocation
and per return to a file of its own with a single ``write`` on an
``O_APPEND`` descriptor, stamped with ``time.monotonic_ns()`` (the system-wide
monotonic clock), so a process SIGKILLed at any instant loses nothing it had
written. An operation whose process died before its return was recorded, or
that failed with anything but a clean rejection, may have taken effect at any
later time, or never: the checker treats it so.

Checking (:func:`check`, :func:`check_dir`) returns a :class:`Result`; on a
violation ``result.explain()`` prints what a person needs: the key group, the
operations around the one that cannot be placed, with times in microseconds,
and the states the store could have been in.

Use it on your own backend::

    from shareit.testing.linearizability import run_random_history
    result = run_random_history(d, workers=3, ops_per_worker=60)
    assert result.ok, result.explain()
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
    from multiprocessing.process import BaseProcess
    from multiprocessing.synchronize import Event

__all__ = [
    "Recorder", "Op", "Result", "load_dir", "check", "check_dir", "run_random_history",
    "run_token_ring", "TRANSFORMS",
]

ABSENT = "<absent>"  # what a read of a missing key returns (KeyError), in histories
INF = float("inf")

#: The model's store: what a plain ``dict`` would hold.
State: TypeAlias = dict[Hashable, Any]


class Target(Protocol):
    """What a history runs on: a :class:`~shareit.SharedMapping`, or any mapping with these
    (the workers receive it pickled)."""

    def __getitem__(self, key: Any, /) -> Any: ...

    def __setitem__(self, key: Any, value: Any, /) -> None: ...

    def __delitem__(self, key: Any, /) -> None: ...

    def incr(self, key: Any, delta: Any = ..., /) -> Any: ...

    def transform(self, key: Any, fn: Callable[[Any], Any], /, default: Any = ...) -> Any: ...

    def update(self, other: Any, /) -> None: ...

    def snapshot(self) -> Mapping[Any, Any]: ...

#: Functions a recorded ``transform`` may apply, by name (histories hold names, not code).
TRANSFORMS: dict[str, Callable[[Any, Any], Any]] = {
    "add": lambda v, a: v + a,
    "double": lambda v, a: v * 2,
}


# --------------------------------------------------------------------------- recording


class Recorder:
    """Appends a process's operations to ``<directory>/<worker>.log`` (see module doc)."""

    def __init__(self, directory: str, worker: str):
        self.worker = worker
        self._fd = os.open(os.path.join(directory, f"{worker}.log"),
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._n = 0

    def _line(self, obj: dict[str, object]) -> None:
        os.write(self._fd, (json.dumps(obj, separators=(",", ":")) + "\n").encode())

    def run(self, d: Target, op: str, key: Any = None, arg: Any = None) -> Any:
        """Perform ``op`` on mapping ``d``, recording its invocation and its outcome."""
        self._n += 1
        n = self._n
        self._line({"w": self.worker, "n": n, "e": "inv", "t": time.monotonic_ns(), "op": op,
                    "k": key, "a": arg})
        try:
            result = _perform(d, op, key, arg)
        except KeyError:
            if op not in ("get", "del"):
                self._line({"w": self.worker, "n": n, "e": "unk", "t": time.monotonic_ns()})
                raise
            result = ABSENT
        except (TypeError, ValueError) as exc:  # a clean rejection: nothing changed
            self._line({"w": self.worker, "n": n, "e": "rej", "t": time.monotonic_ns(),
                        "x": type(exc).__name__})
            raise
        except BaseException as exc:  # a timeout, a dead backend: it may have happened
            self._line({"w": self.worker, "n": n, "e": "unk", "t": time.monotonic_ns(),
                        "x": type(exc).__name__})
            raise
        self._line({"w": self.worker, "n": n, "e": "ret", "t": time.monotonic_ns(), "r": result})
        return result

    def close(self) -> None:
        os.close(self._fd)


def _perform(d: Target, op: str, key: Any, arg: Any) -> Any:
    if op == "get":
        return d[key]
    if op == "set":
        d[key] = arg
        return None
    if op == "del":
        del d[key]
        return True
    if op == "incr":
        return d.incr(key, arg)
    if op == "transform":
        name, a = arg
        fn = TRANSFORMS[name]
        return d.transform(key, lambda v: fn(v, a), default=0)
    if op == "update":
        d.update(arg)
        return None
    if op == "snapshot":
        return sorted(([k, v] for k, v in d.snapshot().items()), key=repr)
    raise ValueError(f"unknown operation {op!r}")


@dataclass
class Op:
    """One operation of a history. ``ret`` is ``inf`` when it may still take effect."""

    worker: str
    n: int
    op: str
    key: Any
    arg: Any
    invoke: float
    ret: float = INF
    result: Any = None
    known: bool = False  # the result was observed (else: may have happened, result unknown)

    def keys(self) -> tuple[Any, ...]:
        if self.op == "update":
            return tuple(self.arg)
        if self.op == "snapshot":
            return ()
        return (self.key,)

    def describe(self, t0: float) -> str:
        if self.op in ("get", "del"):
            args = repr(self.key)
        elif self.op in ("set", "incr"):
            args = f"{self.key!r}, {self.arg!r}"
        elif self.op == "transform":
            args = f"{self.key!r}, {self.arg[0]}({self.arg[1]!r})"
        elif self.op == "update":
            args = repr(self.arg)
        else:
            args = ""
        res = repr(self.result) if self.known else "?"
        end = "never returned" if self.ret == INF else f"{(self.ret - t0) / 1e3:9.1f}"
        return (f"{self.worker:>6} {(self.invoke - t0) / 1e3:9.1f} .. {end:>9} µs  "
                f"{self.op}({args}) -> {res}")


def load_dir(directory: str) -> list[Op]:
    """Every operation recorded in ``directory`` (rejected ones left out: they changed nothing)."""
    ops: dict[tuple[str, int], Op] = {}
    for fname in sorted(os.listdir(directory)):
        if not fname.endswith(".log"):
            continue
        with open(os.path.join(directory, fname), "rb") as f:
            lines = f.read().split(b"\n")
        for raw in lines:
            if not raw:
                continue
            try:
                ev = json.loads(raw)
            except ValueError:
                continue  # the last line of a process killed mid-write
            k = (ev["w"], ev["n"])
            if ev["e"] == "inv":
                ops[k] = Op(ev["w"], ev["n"], ev["op"], ev["k"], ev["a"], ev["t"])
            elif k in ops:
                o = ops[k]
                if ev["e"] == "ret":
                    o.ret, o.result, o.known = ev["t"], ev["r"], True
                elif ev["e"] == "rej":
                    del ops[k]
                # "unk": it may have happened at any later time: ret stays inf, result unknown
    for o in ops.values():
        if o.op == "update" and isinstance(o.arg, dict):
            o.arg = dict(o.arg)
    return sorted(ops.values(), key=lambda o: o.invoke)


# --------------------------------------------------------------------------- the model


def _step(state: State, o: Op) -> tuple[bool, State]:
    """Apply ``o`` to ``state`` (a dict); (whether its observed result fits, the new state)."""
    op, k = o.op, o.key
    if op == "get":
        return (not o.known or _same(state.get(k, ABSENT), o.result)), state
    if op == "snapshot":
        return (not o.known or _same_state(state, o.result)), state
    if op == "set":
        return True, {**state, k: o.arg}
    if op == "update":
        return True, {**state, **o.arg}
    if op == "del":
        present = k in state
        if o.known and (o.result is True) != present:
            return False, state
        if not present:
            return True, state
        new = dict(state)
        del new[k]
        return True, new
    if op in ("incr", "transform"):
        cur = state.get(k, 0)
        if op == "incr":
            new_v = cur + o.arg
        else:
            new_v = TRANSFORMS[o.arg[0]](cur, o.arg[1])
        if o.known and not _same(new_v, o.result):
            return False, state
        return True, {**state, k: new_v}
    raise ValueError(f"unknown operation {op!r}")


def _same(a: object, b: object) -> bool:
    """Equal as a dict would hold them -- but True is not 1 (a store must not turn one
    into the other), while 5.0 may be 5 (a declared float value_type stores ints so)."""
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def _same_state(state: State, pairs: object) -> bool:
    """``state`` against a recorded snapshot: ``[key, value]`` pairs (JSON keeps the keys'
    types, unlike a JSON object's string keys)."""
    if isinstance(pairs, dict):  # (a hand-written history)
        pairs = [[k, v] for k, v in pairs.items()]
    if not isinstance(pairs, list) or len(pairs) != len(state):
        return False
    for k, v in pairs:
        k = tuple(k) if isinstance(k, list) else k
        if k not in state or not _same(state[k], v):
            return False
    return True


def _freeze(state: State) -> tuple[tuple[Hashable, Any], ...]:
    return tuple(sorted(state.items(), key=repr))


# --------------------------------------------------------------------------- the search


class _Entry:
    """An invocation or a return of ``ops[op]`` in the search's doubly linked list."""

    __slots__ = ("op", "is_call", "time", "prev", "next", "match")

    prev: _Entry  # set when linked in (the head's is never read)
    match: _Entry  # an invocation's return (a return's is never read)

    def __init__(self, op: int, is_call: bool, time: float) -> None:
        self.op, self.is_call, self.time = op, is_call, time
        self.next: _Entry | None = None


@dataclass
class _Deepest:
    """The deepest point the search reached: what a person reads when it fails."""

    depth: int = -1
    order: list[int] = field(default_factory=list)  # indexes of the ops placed, in order
    state: State = field(default_factory=dict)  # the model's state after them
    blocked: int | None = None  # the index of the op that fits nowhere after them


@dataclass
class Result:
    """The verdict on a history; ``explain()`` for a person."""

    ok: bool
    ops: int
    groups: int
    failure: str = ""

    def explain(self) -> str:
        if self.ok:
            return f"linearizable: {self.ops} operations in {self.groups} key group(s)"
        return self.failure

    def __bool__(self) -> bool:
        return self.ok


def _groups(ops: list[Op]) -> list[list[Op]]:
    """Split by key groups no operation spans (P-compositionality)."""
    if any(o.op == "snapshot" for o in ops):
        return [ops]
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for o in ops:
        ks = [json.dumps(k) for k in o.keys()]
        for a in ks[1:]:
            parent[find(a)] = find(ks[0])
        for a in ks:
            find(a)
    out: dict[str | None, list[Op]] = {}
    for o in ops:
        keys = o.keys()
        out.setdefault(find(json.dumps(keys[0])) if keys else None, []).append(o)
    return list(out.values())


def _search(ops: list[Op], initial: State) -> tuple[bool, _Deepest]:
    """Wing–Gong–Lowe with a cache of (linearized set, state); diagnostics on failure."""
    entries: list[_Entry] = []
    for i, o in enumerate(ops):
        call = _Entry(i, True, o.invoke)
        ret = _Entry(i, False, o.ret)
        call.match = ret
        entries += [call, ret]
    entries.sort(key=lambda e: (e.time, not e.is_call))
    head = _Entry(-1, True, -INF)
    prev = head
    for e in entries:
        prev.next, e.prev = e, prev
        prev = e
    finite = sum(1 for o in ops if o.ret != INF)

    def lift(e: _Entry) -> None:
        for x in (e, e.match):
            x.prev.next = x.next
            if x.next is not None:
                x.next.prev = x.prev

    def unlift(e: _Entry) -> None:
        for x in (e.match, e):
            x.prev.next = x
            if x.next is not None:
                x.next.prev = x

    state, linearized = initial, 0
    cache: set[tuple[int, tuple[tuple[Hashable, Any], ...]]] = set()
    stack: list[tuple[_Entry, State]] = []
    best = _Deepest()
    entry = head.next
    while finite:
        if entry is None:  # only calls of ops that may never happen are left, none fits
            break
        if entry.is_call:
            o = ops[entry.op]
            ok, new = _step(state, o)
            if ok:
                key = (linearized | (1 << entry.op), _freeze(new))
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    state, linearized = new, key[0]
                    lift(entry)
                    finite -= o.ret != INF
                    entry = head.next
                    continue
            entry = entry.next
            continue
        if len(stack) > best.depth:  # the deepest point reached: what a person reads
            best = _Deepest(len(stack), [e.op for e, _ in stack], state, entry.op)
        if not stack:
            return False, best
        entry, state = stack.pop()
        linearized &= ~(1 << entry.op)
        unlift(entry)
        finite += ops[entry.op].ret != INF
        entry = entry.next
    return finite == 0, best


def check(ops: Iterable[Op], initial: Mapping[Hashable, Any] | None = None) -> Result:
    """Whether the history ``ops`` is linearizable against a plain ``dict`` model."""
    ops = list(ops)
    groups = _groups(ops)
    for group in groups:
        group.sort(key=lambda o: o.invoke)
        ok, best = _search(group, dict(initial or {}))
        if not ok:
            return Result(False, len(ops), len(groups), _explain(group, best))
    return Result(True, len(ops), len(groups))


def check_dir(directory: str, initial: Mapping[Hashable, Any] | None = None) -> Result:
    return check(load_dir(directory), initial)


def _explain(group: list[Op], best: _Deepest) -> str:
    t0 = min(o.invoke for o in group)
    lines = ["NOT linearizable."]
    if best.blocked is None:
        lines.append("No order of these operations explains their results:")
        lines += ["  " + o.describe(t0) for o in group[:40]]
        return "\n".join(lines)
    blocked = group[best.blocked]
    order = best.order
    lines.append(
        "The operation below marked '>>' cannot take effect anywhere: every order of the "
        "operations that completed before it leaves the store in a state that contradicts "
        "its result (or the result of an operation it must follow)."
    )
    window = [o for o in group if o.invoke <= blocked.ret and o.ret >= blocked.invoke - 2e6]
    placed = {id(group[i]) for i in order}
    lines.append("Operations around it (times in µs from the first; '+' = placed by the search):")
    for o in sorted(window, key=lambda o: o.invoke)[-30:]:
        mark = ">>" if o is blocked else (" +" if id(o) in placed else "  ")
        lines.append(f" {mark} {o.describe(t0)}")
    lines.append(f"State after the longest order found ({len(order)} operations): "
                 f"{dict(sorted(best.state.items(), key=repr))!r:.300}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- workloads


def _random_worker(d: Target, directory: str, worker: str, n: int, keys: Sequence[Hashable],
                   seed: int, mix: Sequence[tuple[str, float]], start: Event | None) -> None:
    rnd = random.Random(seed)
    rec = Recorder(directory, worker)
    if start is not None:
        start.wait(60)
    ops, weights = zip(*mix)
    for _ in range(n):
        op = rnd.choices(ops, weights)[0]
        k = rnd.choice(keys)
        try:
            if op == "set":
                rec.run(d, "set", k, rnd.randrange(1000))
            elif op == "incr":
                rec.run(d, "incr", k, rnd.randrange(1, 5))
            elif op == "transform":
                rec.run(d, "transform", k, rnd.choice([("add", 7), ("double", None)]))
            elif op == "update":
                ks = rnd.sample(keys, min(2, len(keys)))
                rec.run(d, "update", None, {x: rnd.randrange(1000) for x in ks})
            elif op in ("get", "del"):
                rec.run(d, op, k)
            elif op == "snapshot":
                rec.run(d, "snapshot")
        except KeyError:
            pass
        except Exception:
            pass  # recorded as "may have happened"; the checker decides
    rec.close()


#: The default operation mix: (name, weight).
DEFAULT_MIX: tuple[tuple[str, float], ...] = (
    ("get", 5), ("set", 3), ("incr", 2), ("del", 1), ("transform", 1), ("update", 1),
    ("snapshot", 1),
)


def run_random_history(d: Target, workers: int = 3, ops_per_worker: int = 60,
                       keys: Sequence[Hashable] | None = None, method: str = "fork",
                       kill: bool = False, seed: int | None = None,
                       mix: Sequence[tuple[str, float]] = DEFAULT_MIX, timeout: float = 60.0,
                       keep: str | None = None) -> Result:
    """Run random operations on ``d`` from ``workers`` processes, then check the history.

    ``d``'s contents when called are the initial state. With ``kill``, one worker is
    SIGKILLed after it has done some operations. ``keep`` names a directory to keep the
    logs in.
    """
    keys = keys or ["a", "b", "c"]
    seed = random.randrange(1 << 30) if seed is None else seed
    initial = dict(d.snapshot())
    directory = keep or tempfile.mkdtemp(prefix="shareit-history-")
    os.makedirs(directory, exist_ok=True)
    ctx = _context(method)
    start = ctx.Event()
    procs = [ctx.Process(target=_random_worker,
                         args=(d, directory, f"p{i}", ops_per_worker, keys, seed + i, mix, start))
             for i in range(workers)]
    result: Result | None = None
    try:
        for p in procs:
            p.start()
        start.set()
        if kill:
            victim = procs[seed % workers]
            log = os.path.join(directory, f"p{seed % workers}.log")
            deadline = time.monotonic() + timeout
            want = random.Random(seed).randrange(4, 2 * ops_per_worker)
            while victim.is_alive() and time.monotonic() < deadline:
                if os.path.exists(log) and os.path.getsize(log) and _lines(log) >= want:
                    break
                time.sleep(0.0005)  # polling the victim's own log with a deadline
            if victim.pid is not None:
                try:
                    os.kill(victim.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        join_all(procs, timeout)
        result = check_dir(directory, initial)
        if not result.ok:
            result.failure += (f"\n(seed {seed}, {workers} workers, method {method}, "
                               f"logs in {directory})")
        return result
    finally:
        if keep is None and (result is None or result.ok):  # a failed history keeps its logs
            shutil.rmtree(directory, ignore_errors=True)


def _context(method: str) -> ForkContext | SpawnContext | ForkServerContext:
    """The ``multiprocessing`` context of start ``method`` (ValueError for another name)."""
    # (typeshed types get_context(str) as BaseContext, which has no Process: every start
    # method's own context has one)
    return cast("ForkContext | SpawnContext | ForkServerContext", mp.get_context(method))


def _lines(path: str) -> int:
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def join_all(procs: Sequence[BaseProcess], timeout: float = 60.0) -> list[int | None]:
    """Join every process within ``timeout``, killing any that hang (then failing); exit codes."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    if hung:  # (not an assert: python -O must not let a deadlock pass)
        raise AssertionError(
            f"{len(hung)} child process(es) still running after {timeout:g} s (deadlock?)")
    return [p.exitcode for p in procs]


def _ring_worker(d: Target, directory: str, i: int, n: int, rounds: int, recv: Connection,
                 send: Connection, key: Hashable) -> None:
    """Token ring: wait for the token, read what the previous process wrote, write, pass on."""
    rec = Recorder(directory, f"r{i}")
    for r in range(rounds):
        if not (i == 0 and r == 0):
            if not recv.poll(60):
                raise AssertionError("the token did not come back within 60 s")
            recv.recv()
            rec.run(d, "get", key)
        rec.run(d, "set", key, r * n + i)
        send.send(None)
    rec.close()


def run_token_ring(d: Target, workers: int = 3, rounds: int = 30, method: str = "fork",
                   timeout: float = 60.0, key: Hashable = "tok") -> Result:
    """Each process reads right after another's write returned, then writes: a stale read
    (a replica or cache that lags behind a completed write) is a violation."""
    directory = tempfile.mkdtemp(prefix="shareit-ring-")
    initial = dict(d.snapshot())
    ctx = _context(method)
    pipes = [ctx.Pipe(duplex=False) for _ in range(workers)]  # pipe i: worker i-1 -> worker i
    procs = [ctx.Process(target=_ring_worker,
                         args=(d, directory, i, workers, rounds, pipes[i][0],
                               pipes[(i + 1) % workers][1], key))
             for i in range(workers)]
    result = None
    try:
        for p in procs:
            p.start()
        join_all(procs, timeout)
        result = check_dir(directory, initial)
        if not result.ok:
            result.failure += (f"\n(token ring, {workers} workers, method {method}, "
                               f"logs in {directory})")
        return result
    finally:
        if result is None or result.ok:
            shutil.rmtree(directory, ignore_errors=True)
