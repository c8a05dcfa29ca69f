"""Functions that run in child processes of the conformance suite.

They live in an importable module (not in a test file) so that ``spawn`` and
``forkserver`` children can import them. Each one raises on a failed
expectation, so the child's exit code tells the parent.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (a spawned child imports this module: only what it needs at run time)
    from multiprocessing.synchronize import Event

    from ..base import SharedMapping


def read_then_write(d: SharedMapping, expected: Mapping[Hashable, Any],
                    writes: Mapping[Hashable, Any]) -> None:
    got = d.snapshot()
    for k, v in expected.items():
        if got.get(k) != v:
            raise AssertionError(f"child read {k!r} = {got.get(k)!r}, parent wrote {v!r}")
    d.update(writes)


def incr_many(d: SharedMapping, key: Hashable, times: int, start: Event | None = None) -> None:
    if start is not None:
        start.wait(60)
    for _ in range(times):
        d.incr(key)


def transform_many(d: SharedMapping, key: Hashable, times: int) -> None:
    for _ in range(times):
        d.transform(key, _plus_one)


def _plus_one(v: Any) -> Any:
    return v + 1


def locked_read_modify_write(d: SharedMapping, key: Hashable, times: int,
                             start: Event | None = None) -> None:
    """Not atomic unless lock() really excludes the other processes."""
    if start is not None:
        start.wait(60)
    for _ in range(times):
        with d.lock():
            d[key] = d[key] + 1


def edit_append(d: SharedMapping, key: Hashable, tag: object, times: int) -> None:
    for i in range(times):
        with d.edit(key, default={"items": []}) as value:
            value["items"].append([tag, i])


def hold_lock_forever(d: SharedMapping, acquired: Event, never: Event) -> None:
    with d.lock():
        acquired.set()
        never.wait()  # the parent SIGKILLs us while we hold the lock


def write_then_die(d: SharedMapping, key: Hashable, value: object) -> None:
    d[key] = value
    os.kill(os.getpid(), signal.SIGKILL)


def pool_task(args: tuple[SharedMapping, Hashable]) -> Any:
    d, key = args
    return d.incr(key)


def pool_init(d: SharedMapping) -> None:
    global _pool_mapping
    _pool_mapping = d


_pool_mapping: SharedMapping | None = None


def pool_task_inherited(key: Hashable) -> Any:
    if _pool_mapping is None:
        raise AssertionError("pool_task_inherited runs in a pool whose initializer is pool_init")
    return _pool_mapping.incr(key)


#: Run by ``python -c`` in an unrelated interpreter: a pickled (handle, expected,
#: writes) arrives on stdin; it checks, writes, and prints the snapshot as repr.
SUBPROCESS_SCRIPT = """
import pickle, sys
from shareit.testing._workers import read_then_write
d, expected, writes = pickle.loads(sys.stdin.buffer.read())
read_then_write(d, expected, writes)
print(repr(sorted(d.snapshot().items(), key=repr)))
d.close()
"""

#: The same, attaching by name with ``shareit.open(name, create=False)``.
ATTACH_SCRIPT = """
import pickle, sys, shareit
from shareit.testing._workers import read_then_write
name, backend, options, expected, writes = pickle.loads(sys.stdin.buffer.read())
d = shareit.open(name, backend=backend, create=False, **options)
read_then_write(d, expected, writes)
print(repr(sorted(d.snapshot().items(), key=repr)))
d.close()
"""


