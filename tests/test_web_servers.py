"""Real uvicorn and gunicorn workers sharing one mapping, with workers killed and restarted.

The app module opens ``shareit.open(NAME)`` at import, as web apps do: without
``--preload`` each worker does it on its own (the first creates, the others
attach); with it, the master does and the workers inherit it. Every request
increments one counter and answers the new value, so any lost update, any
restart from zero and any split into two copies shows as a missing or
repeated number.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid

import pytest

from helpers import wait_until
from shareit import _runtime, cli
from shareit.testing import shareit_files

pytest.importorskip("uvicorn", reason="the test extra installs uvicorn")
pytest.importorskip("gunicorn", reason="the test extra installs gunicorn")

APP = textwrap.dedent("""
    import os
    import shareit

    hits = shareit.open(os.environ["HITS_NAME"])

    def wsgi(environ, start_response):
        n = hits.incr("n")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{n} {os.getpid()}".encode()]

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        n = hits.incr("n")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": f"{n} {os.getpid()}".encode()})
""")
DEADLINE = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, argv: list[str], cwd: str, env: dict, port: int):
        self.port = port
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)

    def get(self) -> tuple[int, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=10) as r:
            n, pid = r.read().split()
        return int(n), int(pid)

    def wait_serving(self) -> None:
        deadline = time.monotonic() + DEADLINE
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                return self.get_quiet()
            except OSError:
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.05)  # polling a port with a deadline

    def get_quiet(self) -> None:
        self.seen.append(self.get())

    seen: list

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _workers(master: int) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[1]) == master and fields[0] != b"Z":
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
                if b"_manager_server" not in cmd and b"resource_tracker" not in cmd:
                    out.append(int(pid))
    return out


@pytest.fixture
def app_dir(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    return str(tmp_path)


def _serve(kind: str, app_dir: str, name: str, backend: str, preload: bool) -> Server:
    port = _free_port()
    env = {**os.environ, "HITS_NAME": name, "SHAREIT_BACKEND": backend,
           "PYTHONPATH": app_dir}
    if kind == "gunicorn":
        argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}",
                "--graceful-timeout", "5"] + (["--preload"] if preload else []) + ["app:wsgi"]
    else:
        argv = [sys.executable, "-m", "uvicorn", "--workers", "2", "--port", str(port),
                "--log-level", "warning", "app:asgi"]
    s = Server(argv, app_dir, env, port)
    s.seen = []
    s.wait_serving()
    return s


def _requests(s: Server, n: int) -> None:
    for _ in range(n):
        s.seen.append(s.get())


def _until_both_workers_answered(s: Server) -> None:
    deadline = time.monotonic() + DEADLINE
    while len({pid for _, pid in s.seen[-50:]}) < 2:
        assert time.monotonic() < deadline, "only one worker ever answered"
        _requests(s, 10)


CASES = [("gunicorn", False), ("gunicorn", True), ("uvicorn", False)]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", ["shm", "manager", "queue"])
@pytest.mark.parametrize("kind,preload", CASES, ids=["gunicorn", "gunicorn-preload", "uvicorn"])
def test_workers_killed_and_restarted_keep_one_count(app_dir, kind, preload, backend) -> None:
    name = f"hits-{uuid.uuid4().hex[:8]}"
    s = _serve(kind, app_dir, name, backend, preload)
    try:
        _requests(s, 150)
        _until_both_workers_answered(s)
        creator = _runtime.read_meta(name)["owner_pid"]
        victim = creator if creator in _workers(s.proc.pid) else _workers(s.proc.pid)[0]
        os.kill(victim, signal.SIGKILL)  # the worker that created it, if a worker did
        wait_until(lambda: victim not in _workers(s.proc.pid) and len(_workers(s.proc.pid)) == 2,
                   "the dead worker replaced", timeout=DEADLINE)
        _requests(s, 150)
        if kind == "gunicorn":
            old = set(_workers(s.proc.pid))  # (before the signal: the reload may be quick)
            os.kill(s.proc.pid, signal.SIGHUP)  # graceful reload: every worker replaced
            wait_until(lambda: not old & set(_workers(s.proc.pid))
                       and len(_workers(s.proc.pid)) == 2, "workers reloaded", timeout=DEADLINE)
            s.wait_serving()
            _requests(s, 100)
        counts = sorted(n for n, _ in s.seen)
        assert counts == list(range(1, len(counts) + 1)), (
            "a count was lost, repeated or restarted: the data split or vanished "
            f"(first gap near {next((i + 1 for i, c in enumerate(counts) if c != i + 1), None)})")
    finally:
        s.stop()
    # Every user is gone. gunicorn's workers exit through their exit hooks; uvicorn's
    # re-raise SIGTERM and leave their registration behind: then gc removes what is left.
    if shareit_files(name):
        wait_until(lambda: _runtime.record_is_stale(_runtime.read_meta_quiet(name),
                                                    _runtime.meta_path(name))
                   or not shareit_files(name), "every user seen gone", timeout=DEADLINE)
        cli.main(["gc"])
    wait_until(lambda: shareit_files(name) == [], "nothing left of the mapping", timeout=DEADLINE)
