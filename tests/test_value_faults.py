"""The value backend beyond the suite: crash repair, sharing rules, options."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import uuid

import numpy as np
import pytest

import shareit
from shareit.backends import value as V

FORK = mp.get_context("fork")


@pytest.fixture
def d():
    m = shareit.open(backend="value", keys=["a", "b", "c"])
    yield m
    m.close()


def die_inside_bulk_write(d, op: str) -> None:
    V.FAULT = "mid_update"  # SIGKILLs this process after the first slot it writes
    if op == "update":
        d.update(a=999, b=998, c=997)
    else:
        d.clear()
    os._exit(3)  # the fault point was not reached


@pytest.mark.parametrize("op", ["update", "clear"])
def test_holder_killed_mid_bulk_write_is_rolled_back(d, op: str) -> None:
    d.update(a=1, b=2, c=3)
    p = FORK.Process(target=die_inside_bulk_write, args=(d, op))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    assert d == {"a": 1, "b": 2, "c": 3}, "readers see the old values until the repair"
    assert d.incr("a") == 2, "the next writer got the lock and undid the half write"
    assert d.snapshot() == {"a": 2, "b": 2, "c": 3}


def hold_lock_and_die(d, ready) -> None:
    with d.lock():
        d["a"] = 5
        ready.set()
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_dead_holder_never_deadlocks(d, method) -> None:
    ctx = mp.get_context(method)
    ready = ctx.Event()
    p = ctx.Process(target=hold_lock_and_die, args=(d, ready))
    p.start()
    p.join(60)
    assert ready.is_set() and p.exitcode == -signal.SIGKILL
    assert d.incr("a") == 6 and d["a"] == 6


def test_declared_keys_start_present_at_zero_or_absent() -> None:
    zero = shareit.open(backend="value", keys=["ok", "error"])
    absent = shareit.open(backend="value", keys=["ok", "error"], initial="absent")
    try:
        assert zero == {"ok": 0, "error": 0} and zero.incr("ok") == 1
        assert absent == {} and absent.incr("ok") == 1 and absent == {"ok": 1}
        with pytest.raises(shareit.ConfigError, match="'zero' or 'absent'"):
            shareit.open(backend="value", keys=["ok"], initial="none")
    finally:
        zero.close()
        absent.close()


def test_keys_are_required_and_values_numeric() -> None:
    with pytest.raises(shareit.ConfigError, match="keys declared up front"):
        shareit.open(backend="value")
    d = shareit.open(backend="value", keys=["a"])
    try:
        assert d.config.value_type == "int64"
        with pytest.raises(TypeError, match="int64"):
            d["a"] = "text"
        with pytest.raises(KeyError, match=r"declared keys .*\['a'\]"):
            d["zzz"] = 1
        assert d == {"a": 0}
    finally:
        d.close()


def test_pickling_outside_process_start_names_the_initializer_pattern(d) -> None:
    with pytest.raises(shareit.ShareitError, match=r"initializer=init, initargs=\(d,\)"):
        pickle.dumps(d)
    with pytest.raises(shareit.ConfigError, match="cannot attach by name"):
        shareit.open("x", backend="value", keys=["a"], create=False)


def test_a_named_value_mapping_cannot_be_opened_twice() -> None:
    name = f"v-{uuid.uuid4().hex[:8]}"
    d = shareit.open(name, backend="value", keys=["a"])
    try:
        with pytest.raises(shareit.ShareitError, match="cannot be attached by name"):
            shareit.open(name, backend="value", keys=["a"])
    finally:
        d.close()
    again = shareit.open(name, backend="value", keys=["a"])  # free once its owner closed it
    again.close()


def read_after_destroy(d, read_once, destroyed, out) -> None:
    assert d["a"] == 0
    read_once.set()
    destroyed.wait(60)
    try:
        d["a"]
    except shareit.BackendDiedError:
        out.value = 1


def test_destroy_reaches_inheriting_processes(d) -> None:
    out, read_once, destroyed = FORK.Value("i", 0), FORK.Event(), FORK.Event()
    p = FORK.Process(target=read_after_destroy, args=(d, read_once, destroyed, out))
    p.start()
    assert read_once.wait(60)
    d.destroy()
    destroyed.set()
    p.join(60)
    assert p.exitcode == 0 and out.value == 1


def test_values_array(d) -> None:
    d.update(a=5, b=7)
    del d["b"]
    np.testing.assert_array_equal(d.values_array(), [5, 0])
    assert d.keys_list() == ["a", "c"]
    f = shareit.open(backend="value", keys=["x", "y"], value_type="float32")
    try:
        f["x"] = 1.5
        arr = f.values_array()
        assert arr.dtype == np.float32 and arr.tolist() == [1.5, 0.0]
    finally:
        f.close()
