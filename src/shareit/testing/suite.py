"""The conformance suite: dict behaviour, atomic operations, bad input, processes."""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

import shareit
from shareit import _runtime, registry
from shareit.base import SharedMapping

from . import _workers, linearizability
from .stateful import mapping_state_machine

START_METHODS = ("fork", "spawn", "forkserver")
#: Bound on any wait for a child process: a deadlock fails the test, never hangs CI.
CHILD_TIMEOUT = 60.0
KEYS = ["a", "b", "c", "d", "e", "f", "g", "h", "n", "cfg", "k"]


def shareit_files(name: str) -> list[str]:
    """Files in the runtime dir that belong to mapping ``name``."""
    return sorted(os.path.basename(p) for p in _runtime.files_of(name))


def run_children(
    method: str, target: Callable[..., Any], arglists: list[tuple[Any, ...]],
    timeout: float = CHILD_TIMEOUT
) -> None:
    """Run ``target(*args)`` in one child per args under ``method``; all must exit 0 in time."""
    ctx: Any = mp.get_context(method)
    procs = [ctx.Process(target=target, args=args) for args in arglists]
    for p in procs:
        p.start()
    codes = join_all(procs, timeout)
    assert codes == [0] * len(procs), f"child exit codes {codes} (see the child's traceback above)"


def _raised(fn: Callable[[Any], Any], m: Any) -> type | None:
    """The type of the exception ``fn(m)`` raises, or None."""
    try:
        fn(m)
    except Exception as exc:
        return type(exc)
    return None


def _constant(value: Any, _: Any) -> Any:
    return value


def join_all(procs: list[Any], timeout: float = CHILD_TIMEOUT) -> list[Any]:
    """Join every process within ``timeout``, killing any that hang (then failing); exit codes."""
    return linearizability.join_all(procs, timeout)


class SharedMappingSuite:
    """Subclass as ``TestX`` and set ``backend`` (and ``options``) to test a backend."""

    backend: str = ""
    options: dict[str, Any] = {}  # noqa: RUF012  (a glue file's class attribute, read only)

    # ------------------------------------------------------------------ helpers

    @property
    def caps(self) -> shareit.Capabilities:
        return registry.load(self.backend).capabilities

    def opts(self, **extra: Any) -> dict[str, Any]:
        opts = dict(self.options)
        if self.caps.fixed_keys and "keys" not in extra and "keys" not in opts:
            opts["keys"] = KEYS
        if "any" not in self.caps.value_kinds and "value_type" not in opts:
            opts["value_type"] = "int64"
        opts.update(extra)
        return opts

    @property
    def any_values(self) -> bool:
        """Can this suite store arbitrary objects with its options?"""
        return "any" in self.caps.value_kinds and not self.opts().get("value_type")

    def val(self, i: int) -> Any:
        """A storable value, distinct per ``i``."""
        return [i, f"v{i}"] if self.any_values else i

    def need(self, flag: str, why: str) -> None:
        if not getattr(self.caps, flag):
            pytest.skip(f"backend {self.backend!r}: {why} (capability {flag}=False)")

    def need_any_values(self) -> None:
        if not self.any_values:
            pytest.skip(f"backend {self.backend!r} stores only numbers with these options "
                        f"(value_type or serializer)")

    def need_method(self, method: str) -> None:
        if method not in self.caps.start_methods:
            pytest.skip(f"backend {self.backend!r} does not support start method {method!r}")

    @pytest.fixture
    def make(self) -> Any:
        made: list[SharedMapping] = []
        names: list[str] = []

        def make(name: str | None = None, **extra: Any) -> SharedMapping:
            name = name or f"t-{uuid.uuid4().hex[:12]}"
            names.append(name)
            d = shareit.open(name, backend=self.backend, **self.opts(**extra))
            made.append(d)  # before anything else can fail: it is closed at teardown
            if d._owner:
                d.clear()
            return d

        yield make
        for d in made:
            if not d.closed:
                d.close()
        for name in names:  # (a server whose other users just died removes it within 0.5 s)
            deadline = time.monotonic() + 5.0
            while shareit_files(name) and time.monotonic() < deadline:
                time.sleep(0.01)  # polling our own view, with a deadline
            assert shareit_files(name) == [], f"left behind after close: {shareit_files(name)}"

    @pytest.fixture
    def d(self, make: Callable[..., SharedMapping]) -> SharedMapping:
        return make()

    # ------------------------------------------------------------------ dict behaviour

    def test_set_get_len_contains(self, d: SharedMapping) -> None:
        assert len(d) == 0 and not d and "a" not in d
        d["a"] = self.val(1)
        d["b"] = self.val(2)
        assert d["a"] == self.val(1) and len(d) == 2 and "a" in d and bool(d)
        d["a"] = self.val(3)
        assert d["a"] == self.val(3) and len(d) == 2
        assert d.get("c") is None and d.get("c", 5) == 5

    def test_missing_key_raises_keyerror(self, d: SharedMapping) -> None:
        with pytest.raises(KeyError):
            d["a"]
        with pytest.raises(KeyError):
            del d["a"]

    def test_delete(self, d: SharedMapping) -> None:
        d.update(a=self.val(1), b=self.val(2))
        del d["a"]
        assert "a" not in d and dict(d) == {"b": self.val(2)}

    def test_iteration_and_views(self, d: SharedMapping) -> None:
        data = {k: self.val(i) for i, k in enumerate("abcde")}
        d.update(data)
        assert sorted(d) == sorted(data)
        assert sorted(d.keys()) == sorted(data)
        assert sorted(map(repr, d.values())) == sorted(repr(d._coerce(v)) for v in data.values())
        assert sorted(d.items(), key=repr) == sorted(data.items(), key=repr)
        assert ("a", self.val(0)) in d.items() and ("a", "nope") not in d.items()
        assert list(reversed(d)) == list(reversed(list(d)))
        if self.caps.ordered:
            assert list(d) == list(data)

    def test_reads_after_keys_are_fresh(self, d: SharedMapping) -> None:
        d.update(a=self.val(1), b=self.val(2))
        keys = list(d.keys())  # may take a snapshot for dict(d); it must not outlive other calls
        d[keys[0]] = self.val(9)
        assert d[keys[0]] == self.val(9), "a read after keys() and a write returned the old value"
        other = self.val(2) if keys[1] == "b" else self.val(1)
        assert dict(d) == {keys[0]: self.val(9), keys[1]: other}

    def test_equality_with_any_mapping(self, d: SharedMapping) -> None:
        d.update(a=self.val(1), b=self.val(2))
        assert d == {"a": self.val(1), "b": self.val(2)}
        assert d != {"a": self.val(1)}
        assert not (d == [("a", self.val(1))])
        from types import MappingProxyType

        assert d == MappingProxyType({"a": self.val(1), "b": self.val(2)})

    def test_or_ior_ror(self, d: SharedMapping) -> None:
        d["a"] = self.val(1)
        merged = d | {"b": self.val(2)}
        assert type(merged) is dict and merged == {"a": self.val(1), "b": self.val(2)}
        assert "b" not in d
        assert ({"a": self.val(0), "c": self.val(3)} | d) == {"a": self.val(1), "c": self.val(3)}
        d |= {"c": self.val(3)}
        assert isinstance(d, SharedMapping) and d["c"] == self.val(3)

    def test_copy_and_snapshot_are_detached_dicts(self, d: SharedMapping) -> None:
        d["a"] = self.val(1)
        c = d.copy()
        assert type(c) is dict and c == {"a": self.val(1)}
        c["a"] = self.val(9)
        assert d["a"] == self.val(1)
        assert type(d.snapshot()) is dict and dict(d) == {"a": self.val(1)}

    def test_values_are_stored_by_value(self, d: SharedMapping) -> None:
        self.need_any_values()
        d["a"] = {"x": [1]}
        got = d["a"]
        got["x"].append(2)
        assert d["a"] == {"x": [1]}, "mutating a read value must not change the shared one"

    def test_pop_popitem_setdefault(self, d: SharedMapping) -> None:
        d.update(a=self.val(1), b=self.val(2))
        assert d.pop("a") == self.val(1) and "a" not in d
        assert d.pop("a", "dflt") == "dflt"
        with pytest.raises(KeyError):
            d.pop("a")
        assert d.setdefault("b", self.val(5)) == self.val(2)
        assert d.setdefault("c", self.val(5)) == self.val(5) and d["c"] == self.val(5)
        k, v = d.popitem()
        if self.caps.ordered:
            assert (k, v) == ("c", self.val(5))
        assert k not in d and len(d) == 1
        d.clear()
        with pytest.raises(KeyError):
            d.popitem()

    def test_update_forms_and_clear(self, d: SharedMapping) -> None:
        d.update({"a": self.val(1)})
        d.update([("b", self.val(2))])
        d.update(c=self.val(3))
        d.update({"d": self.val(4)}, e=self.val(5))
        assert dict(d) == {k: self.val(i) for i, k in enumerate("abcde", 1)}
        d.clear()
        assert len(d) == 0 and dict(d) == {}

    def test_repr_shows_backend_and_preview(self, d: SharedMapping) -> None:
        d["a"] = self.val(1)
        r = repr(d)
        assert self.backend in r and "'a'" in r
        d.close()
        assert "closed" in repr(d)

    def test_name_backend_config(self, d: SharedMapping) -> None:
        assert d.backend == self.backend and d.name is not None and d.name.startswith("t-")
        assert d.config.backend == self.backend and d.config["timeout"] > 0
        with pytest.raises(AttributeError):
            d.config.timeout = 1

    # ------------------------------------------------------------------ atomic operations

    def test_incr(self, d: SharedMapping) -> None:
        assert d.incr("n") == 1 and d["n"] == 1
        assert d.incr("n", 5) == 6
        assert d.incr("k", default=10) == 11
        if self.opts().get("value_type", "float64").startswith("float") or self.any_values:
            assert d.incr("n", 0.5) == 6.5

    def test_incr_of_non_number_raises_and_changes_nothing(self, d: SharedMapping) -> None:
        self.need_any_values()
        d["a"] = "text"
        with pytest.raises(TypeError, match="transform"):
            d.incr("a")
        with pytest.raises(TypeError):
            d.incr("n", "1")
        assert dict(d) == {"a": "text"}

    def test_transform(self, d: SharedMapping) -> None:
        d["n"] = self.val(2) if self.any_values else 2
        fn: Callable[[Any], Any] = (lambda v: v + [0]) if self.any_values else (lambda v: v * 2)
        expected = fn(d["n"])
        assert d.transform("n", fn) == expected and d["n"] == expected
        with pytest.raises(KeyError):
            d.transform("k", fn)
        assert d.transform("k", lambda v: v + 1, default=0) == 1

    def test_transform_that_raises_changes_nothing(self, d: SharedMapping) -> None:
        d["n"] = self.val(1)

        def boom(v: Any) -> Any:
            raise ZeroDivisionError

        with pytest.raises(ZeroDivisionError):
            d.transform("n", boom)
        assert d["n"] == self.val(1)
        d["n"] = self.val(2)  # the lock was released
        assert d["n"] == self.val(2)

    def test_edit_writes_back_nested_changes(self, d: SharedMapping) -> None:
        self.need_any_values()
        with d.edit("cfg", default={}) as cfg:
            cfg["x"] = 1
        with d.edit("cfg") as cfg:
            cfg.setdefault("l", []).append(2)
        assert d["cfg"] == {"x": 1, "l": [2]}
        with pytest.raises(KeyError):
            with d.edit("missing"):
                pass

    def test_edit_that_raises_writes_nothing(self, d: SharedMapping) -> None:
        self.need_any_values()
        d["cfg"] = {"x": 1}
        with pytest.raises(RuntimeError):
            with d.edit("cfg") as cfg:
                cfg["x"] = 2
                raise RuntimeError
        assert d["cfg"] == {"x": 1}
        d["cfg"] = {"x": 3}  # the lock was released
        assert d["cfg"] == {"x": 3}

    def test_lock_is_reentrant_and_usable(self, d: SharedMapping) -> None:
        with d.lock() as m:
            assert m is d
            with d.lock():
                d["a"] = self.val(1)
            d.incr("n")
            assert d["n"] == 1
        assert d["a"] == self.val(1)

    def test_lock_excludes_other_threads(self, d: SharedMapping) -> None:
        d["n"] = 0
        inside = threading.Event()
        with d.lock():
            def incr_once() -> None:
                inside.set()
                d.incr("n")

            t = threading.Thread(target=incr_once)
            t.start()
            inside.wait(10)
            assert not self._joined(t, 0.2), "another thread's incr ran while lock() was held"
            assert d["n"] == 0
        assert self._joined(t, 10) and d["n"] == 1

    @staticmethod
    def _joined(t: threading.Thread, timeout: float) -> bool:
        t.join(timeout)
        return not t.is_alive()

    # ------------------------------------------------------------------ bad input

    def test_misuse_raises_what_dict_raises(self, d: SharedMapping) -> None:
        """Every misuse raises the exception type a plain dict raises, and changes nothing."""
        d["a"] = self.val(1)
        misuses: list[tuple[str, Callable[[Any], Any]]] = [
            ("update(non-iterable)", lambda m: m.update(5)),
            ("update(element not a sequence)", lambda m: m.update([1])),
            ("update(element of length 3)", lambda m: m.update([("a", 2, 3)])),
            ("update(element of length 1)", lambda m: m.update(["x"])),
            ("update(two positional)", lambda m: m.update({}, {})),
            ("d[unhashable]", lambda m: m[["x"]]),
            ("d[unhashable] = v", lambda m: m.__setitem__(["x"], 1)),
            ("del d[unhashable]", lambda m: m.__delitem__(["x"])),
            ("unhashable in d", lambda m: ["x"] in m),
            ("get(unhashable)", lambda m: m.get(["x"])),
            ("del d[missing]", lambda m: m.__delitem__("zz")),
            ("d[missing]", lambda m: m["zz"]),
            ("pop(missing)", lambda m: m.pop("zz")),
            ("pop()", lambda m: m.pop()),
            ("d | 5", lambda m: m | 5),
            ("5 | d", lambda m: 5 | m),
            ("d |= 5", lambda m: m.__ior__(5)),
        ]
        before = d.snapshot()
        for what, misuse in misuses:
            expected = _raised(misuse, {"a": self.val(1)})
            got = _raised(misuse, d)
            assert expected is not None, what
            assert got is not None and issubclass(got, expected), (
                f"{what}: a dict raises {expected.__name__}, backend {self.backend!r} raised "
                f"{got.__name__ if got else 'nothing'}")
            assert d.snapshot() == before, f"{what} changed the mapping"
        empty: dict[str, Any] = {}
        assert _raised(lambda m: m.popitem(), empty) is KeyError
        d.clear()
        assert _raised(lambda m: m.popitem(), d) is KeyError

    def test_unhashable_key_raises_typeerror(self, d: SharedMapping) -> None:
        d["a"] = self.val(1)
        for op in (lambda: d.__setitem__([1], 1), lambda: d[[1]], lambda: [1] in d,
                   lambda: d.incr({1: 2})):
            with pytest.raises(TypeError, match="unhashable"):
                op()
        assert dict(d) == {"a": self.val(1)}

    def test_unsupported_key_type_raises_typeerror(self, d: SharedMapping) -> None:
        if self.caps.key_types is None:
            pytest.skip(f"backend {self.backend!r} takes any hashable key")
        with pytest.raises(TypeError, match="keys of type"):
            d[frozenset({1})] = self.val(1)
        assert len(d) == 0

    def test_key_equal_to_a_stored_one_but_of_a_refused_type(self, d: SharedMapping) -> None:
        """1.0, True and numpy's 1 equal 1 (and hash alike); a backend that refuses their
        types refuses them even once 1 has been read and written (no cache answers)."""
        import numpy as np

        allowed = self.caps.key_types
        if allowed is None or int not in allowed:
            pytest.skip(f"backend {self.backend!r} takes any hashable key, or no int keys")
        d[1] = 5
        assert d[1] == 5
        d[1] = 6  # (a repeated write of a number may take a fast path)
        assert d[1] == 6
        bad: list[Any] = [1.0, True, np.int64(1)]
        if tuple in allowed:
            d[(1, "a")] = 7
            assert d[(1, "a")] == 7
            bad.append((1.0, "a"))
        before = dict(d)
        for key in bad:
            with pytest.raises(TypeError, match="keys of type"):
                d[key]
            with pytest.raises(TypeError, match="keys of type"):
                d[key] = 8
            with pytest.raises(TypeError, match="keys of type"):
                d[key] = 8.5
        assert dict(d) == before

    def test_unpicklable_value_raises_and_changes_nothing(self, d: SharedMapping) -> None:
        self.need_any_values()
        d["a"] = 1
        unpicklable: list[Any] = [threading.Lock(), lambda: 1]
        for bad in unpicklable:
            with pytest.raises(TypeError, match="pickle"):
                d["a"] = bad
            with pytest.raises(TypeError, match="pickle"):
                d.update({"b": 2, "c": bad})
            with pytest.raises(TypeError, match="pickle"):
                d.transform("a", functools.partial(_constant, bad))
        assert dict(d) == {"a": 1}

    def test_declared_value_type_is_enforced(self, make: Callable[..., SharedMapping]) -> None:
        d = make(value_type="int64")
        d["a"] = 1
        for bad in ("x", 1.5, None, [1], True):
            with pytest.raises(TypeError, match="int64"):
                d["a"] = bad
            with pytest.raises(TypeError, match="int64"):
                d.update({"b": 2, "c": bad})
        with pytest.raises(ValueError, match="does not fit"):
            d["a"] = 2**70
        with pytest.raises(TypeError):
            d.incr("a", 0.5)
        assert dict(d) == {"a": 1}
        f = make(value_type="float64")
        f["a"] = 1
        assert f["a"] == 1.0 and type(f["a"]) is float
        assert f.incr("a", 1) == 2.0

    def test_declared_keys_are_enforced(self, make: Callable[..., SharedMapping]) -> None:
        d = make(keys=["a", "b"])
        d["a"] = self.val(1)
        with pytest.raises(KeyError, match="declared keys"):
            d["z"] = self.val(2)
        with pytest.raises(KeyError, match="declared keys"):
            d.update({"b": self.val(2), "z": self.val(3)})
        with pytest.raises(KeyError):
            d["z"]
        assert "z" not in d and d.get("z") is None
        assert dict(d) == {"a": self.val(1)}

    def test_use_after_close_raises_closederror(self, d: SharedMapping) -> None:
        d["a"] = self.val(1)
        d.close()
        d.close()  # idempotent
        for op in (lambda: d["a"], lambda: d.__setitem__("a", 1), lambda: len(d),
                   lambda: d.snapshot(), lambda: d.incr("a"), lambda: d.lock().acquire(),
                   lambda: pickle.dumps(d)):
            with pytest.raises(shareit.ClosedError, match="closed"):
                op()

    def test_context_manager_closes(self, make: Callable[..., SharedMapping]) -> None:
        with make() as d:
            d["a"] = self.val(1)
        assert d.closed

    # ------------------------------------------------------------------ handles and names

    def test_pickle_round_trip_reaches_same_data(self, d: SharedMapping) -> None:
        self.need("pickle_anytime", "handles pickle only while a child process starts")
        d["a"] = self.val(1)
        e = pickle.loads(pickle.dumps(d))
        assert e["a"] == self.val(1)
        e["b"] = self.val(2)
        self._sync(d)
        assert d["b"] == self.val(2)
        e.close()
        assert d["a"] == self.val(1), "closing an attached handle must not destroy the data"

    def test_attach_by_name(self, d: SharedMapping) -> None:
        self.need("attach_by_name", "cannot attach by name")
        d["a"] = self.val(1)
        e = shareit.open(d.name, backend=self.backend, create=False, **self.options)
        assert e["a"] == self.val(1) and not e._owner
        e.close()
        with pytest.raises(shareit.NotFoundError):
            shareit.open(f"nope-{uuid.uuid4().hex[:8]}", backend=self.backend, create=False,
                         **self.options)

    def test_attach_with_conflicting_options_is_refused(self, d: SharedMapping) -> None:
        self.need("attach_by_name", "cannot attach by name")
        other = "int32" if d.config.value_type == "float64" else "float64"
        with pytest.raises(shareit.ConfigError, match="value_type"):
            shareit.open(d.name, backend=self.backend, **{**self.options, "value_type": other})

    def test_destroy_by_another_handle(self, d: SharedMapping) -> None:
        self.need("attach_by_name", "cannot attach by name")
        d["a"] = self.val(1)
        assert d.name is not None
        shareit.destroy(d.name, backend=self.backend, **self.options)
        assert shareit_files(d.name) == []
        with pytest.raises(shareit.BackendDiedError):
            d["a"]

    def _sync(self, d: SharedMapping) -> None:
        if not self.caps.fresh_reads:
            d.sync()  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ processes

    @pytest.mark.parametrize("method", START_METHODS)
    def test_child_reads_parent_writes_and_parent_reads_child_writes(
        self, d: SharedMapping, method: str
    ) -> None:
        self.need_method(method)
        d.update(a=self.val(1), b=self.val(2))
        run_children(method, _workers.read_then_write,
                     [(d, {"a": self.val(1)}, {"c": self.val(3)})])
        self._sync(d)
        assert dict(d) == {"a": self.val(1), "b": self.val(2), "c": self.val(3)}

    @pytest.mark.parametrize("method", START_METHODS)
    def test_pool_task_argument(self, d: SharedMapping, method: str) -> None:
        self.need_method(method)
        d["n"] = 0
        ctx = mp.get_context(method)
        if not self.caps.pickle_anytime:
            with ctx.Pool(1) as pool:
                with pytest.raises(shareit.ShareitError, match="initializer"):
                    pool.map(_workers.pool_task, [(d, "n")], chunksize=1)
            return
        with ctx.Pool(2) as pool:
            results = pool.map_async(_workers.pool_task, [(d, "n")] * 6).get(CHILD_TIMEOUT)
        assert sorted(results) == [1, 2, 3, 4, 5, 6] and d["n"] == 6

    @pytest.mark.parametrize("method", START_METHODS)
    def test_pool_initializer(self, d: SharedMapping, method: str) -> None:
        self.need_method(method)
        d["n"] = 0
        ctx = mp.get_context(method)
        with ctx.Pool(2, initializer=_workers.pool_init, initargs=(d,)) as pool:
            results = pool.map_async(_workers.pool_task_inherited, ["n"] * 6).get(CHILD_TIMEOUT)
        assert sorted(results) == [1, 2, 3, 4, 5, 6] and d["n"] == 6

    def test_unrelated_interpreter_by_pickle(self, d: SharedMapping) -> None:
        self.need("pickle_anytime", "handles pickle only while a child process starts")
        d["a"] = self.val(1)
        payload = pickle.dumps((d, {"a": self.val(1)}, {"b": self.val(2)}))
        self._run_python(_workers.SUBPROCESS_SCRIPT, payload)
        self._sync(d)
        assert dict(d) == {"a": self.val(1), "b": self.val(2)}

    def test_unrelated_interpreter_by_name(self, d: SharedMapping) -> None:
        self.need("attach_by_name", "cannot attach by name")
        d["a"] = self.val(1)
        payload = pickle.dumps((d.name, self.backend, dict(self.options), {"a": self.val(1)},
                                {"b": self.val(2)}))
        self._run_python(_workers.ATTACH_SCRIPT, payload)
        self._sync(d)
        assert dict(d) == {"a": self.val(1), "b": self.val(2)}

    def _run_python(self, script: str, payload: bytes) -> str:
        proc = subprocess.run([sys.executable, "-c", script], input=payload,
                              capture_output=True, timeout=CHILD_TIMEOUT)
        assert proc.returncode == 0, proc.stderr.decode()
        assert b"resource_tracker" not in proc.stderr and b"Warning" not in proc.stderr, proc.stderr
        return proc.stdout.decode()

    def test_concurrent_incr_is_exact(self, d: SharedMapping) -> None:
        procs, times = 4, 250
        d["n"] = 0
        start = mp.get_context("fork").Event()
        start_all = threading.Timer(0, start.set)
        start_all.start()
        run_children("fork", _workers.incr_many, [(d, "n", times, start)] * procs)
        assert d["n"] == procs * times

    @pytest.mark.parametrize("method", ["spawn", "forkserver"])
    def test_concurrent_incr_is_exact_under(self, d: SharedMapping, method: str) -> None:
        self.need_method(method)
        d["n"] = 0
        run_children(method, _workers.incr_many, [(d, "n", 100)] * 2)
        assert d["n"] == 200

    def test_concurrent_transform_is_exact(self, d: SharedMapping) -> None:
        d["n"] = 0
        run_children("fork", _workers.transform_many, [(d, "n", 100)] * 3)
        assert d["n"] == 300, "a transform was lost: it is not atomic across processes"

    def test_lock_gives_mutual_exclusion_across_processes(self, d: SharedMapping) -> None:
        d["n"] = 0
        run_children("fork", _workers.locked_read_modify_write, [(d, "n", 150)] * 3)
        assert d["n"] == 450

    def test_nested_edits_from_processes_all_land(self, d: SharedMapping) -> None:
        self.need_any_values()
        run_children("fork", _workers.edit_append, [(d, "cfg", tag, 30) for tag in range(3)])
        items = d["cfg"]["items"]
        assert len(items) == 90 and sorted(map(tuple, items)) == sorted(
            (t, i) for t in range(3) for i in range(30)
        )

    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_killed_lock_holder_does_not_block_others(self, d: SharedMapping, method: str) -> None:
        self.need_method(method)
        d["n"] = 0
        ctx: Any = mp.get_context(method)
        acquired, never = ctx.Event(), ctx.Event()
        child = ctx.Process(target=_workers.hold_lock_forever, args=(d, acquired, never))
        child.start()
        try:
            assert acquired.wait(CHILD_TIMEOUT), "child never took the lock"
            with pytest.raises(shareit.LockTimeoutError):
                with d.lock(timeout=0.2):
                    pass
            os.kill(child.pid, signal.SIGKILL)
            child.join(CHILD_TIMEOUT)
            started = time.monotonic()
            with d.lock(timeout=5):
                d["n"] = 1
            assert d.incr("n") == 2
            assert time.monotonic() - started < 5
        finally:
            if child.is_alive():
                child.kill()
                child.join()

    def test_killed_writer_leaves_consistent_data(self, d: SharedMapping) -> None:
        d["a"] = self.val(1)
        run_children_killed = mp.get_context("fork").Process(
            target=_workers.write_then_die, args=(d, "b", self.val(2)))
        run_children_killed.start()
        run_children_killed.join(CHILD_TIMEOUT)
        assert run_children_killed.exitcode == -signal.SIGKILL
        self._sync(d)
        assert dict(d) == {"a": self.val(1), "b": self.val(2)}
        d["c"] = self.val(3)
        assert d.incr("n") == 1

    # ------------------------------------------------------------------ linearizability

    @pytest.mark.parametrize("kill", [False, True], ids=["all-finish", "one-killed"])
    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_history_is_linearizable(self, d: SharedMapping, method: str, kill: bool) -> None:
        """Random gets, sets, deletes, incr, transform, update and snapshot from three
        processes, one of them SIGKILLed at a random point, recorded and checked."""
        self.need_method(method)
        result = linearizability.run_random_history(d, workers=3, ops_per_worker=50,
                                                    keys=["a", "b", "c"], method=method,
                                                    kill=kill, timeout=CHILD_TIMEOUT)
        assert result.ok, result.explain()

    @pytest.mark.parametrize("method", ["fork", "spawn"])
    def test_a_read_right_after_another_process_wrote_sees_it(self, d: SharedMapping,
                                                              method: str) -> None:
        """A token ring: each process reads right after the previous one's write returned."""
        self.need_method(method)
        result = linearizability.run_token_ring(d, workers=3, rounds=20, method=method,
                                                timeout=CHILD_TIMEOUT, key="a")
        assert result.ok, result.explain()

    # ------------------------------------------------------------------ the state machine

    def test_behaves_like_a_dict(self, d: SharedMapping) -> None:
        machine = mapping_state_machine(d, KEYS[:4])
        run_state_machine_as_test(
            machine,
            settings=settings(max_examples=40, stateful_step_count=25, deadline=None,
                              suppress_health_check=list(HealthCheck)),
        )
