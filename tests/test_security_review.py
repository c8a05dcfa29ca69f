"""Security review findings: each test fails on the code as reviewed and passes once fixed.

Tests that need a second real user reuse the pattern (and helpers) of
``test_security.py`` and are skipped unless run as root.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import shareit
from shareit import _runtime, cli
from shareit.errors import PermissionDeniedError, RecordError

sys.path.insert(0, os.path.dirname(__file__))
from test_security import _record, as_user

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates a second user and drops privileges to it"
)


# ---------------------------------------------------------- 1. server started with cwd on sys.path


def _plant_package(directory: str, marker: str) -> None:
    """As the attacker: a package named ``shareit`` in a directory anyone may write to."""
    pkg = os.path.join(directory, "shareit")
    os.mkdir(pkg)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write(f"open({marker!r}, 'w').write('pwned')\n")


@needs_root
@pytest.mark.parametrize("backend", ["manager", "queue"])
def test_server_never_imports_code_from_the_callers_cwd(attacker, backend, monkeypatch) -> None:
    """``python -m`` puts the cwd first on the server's sys.path: whoever can write to the
    caller's cwd (e.g. /tmp) runs code as the caller when a server starts."""
    shared = tempfile.mkdtemp(prefix="shareit-cwd-")
    os.chmod(shared, 0o1777)  # like /tmp
    marker_dir = tempfile.mkdtemp(prefix="shareit-mark-")
    os.chmod(marker_dir, 0o777)
    marker = os.path.join(marker_dir, "marker")
    before = set(os.listdir(_runtime.runtime_dir()))
    try:
        as_user(attacker, _plant_package, shared, marker)
        monkeypatch.chdir(shared)
        try:
            shareit.open(backend=backend, timeout=5).close()
        except shareit.ShareitError:
            pass  # the hijacked server may fail to start: what matters is the marker
        assert not os.path.exists(marker), "another user's code ran as the caller in its server"
    finally:
        monkeypatch.undo()
        for f in set(os.listdir(_runtime.runtime_dir())) - before:  # a failed start leaves STEM@seq
            os.unlink(os.path.join(_runtime.runtime_dir(), f))
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(marker_dir, ignore_errors=True)


# ------------------------------------------------ 2. redis: json is per handle, not per mapping


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def redis_url(tmp_path):
    pytest.importorskip("redis")
    from test_redis import start_server

    sock = str(tmp_path / "redis.sock")
    proc = start_server(sock)
    try:
        yield sock, f"unix://{sock}"
    finally:
        proc.kill()
        proc.wait()


def test_a_json_mapping_is_never_unpickled_by_an_attacher_that_did_not_repeat_it(redis_url,
                                                                                 tmp_path) -> None:
    """The creator chose serializer='json' because less trusted writers share the server.
    The serializer is not in the ``:meta`` record, so any other process that opens the
    mapping by name without repeating it gets the default, pickle, and runs their bytes."""
    import redis

    sock, url = redis_url
    marker = tmp_path / "marker"
    name = f"sess-{uuid.uuid4().hex[:6]}"
    creator = shareit.open(name, backend="redis", url=url, serializer="json")
    try:
        creator["user"] = {"id": 1}
        redis.Redis(unix_socket_path=sock).hset(f"shareit:{name}", "evil",
                                                pickle.dumps(_Payload(str(marker))))
        other = shareit.open(name, backend="redis", url=url)  # serializer not repeated
        try:
            with pytest.raises((ValueError, shareit.ConfigError)):
                other["evil"]
        finally:
            other.close()
        assert not marker.exists(), "a value written by another writer was unpickled"
    finally:
        creator.destroy()


# ------------------------------------------------------------------ 3. the runtime dir's base


def _symlink(target: str, link: str) -> None:
    os.symlink(target, link)


def _mkdir_open(path: str) -> None:
    os.mkdir(path)
    os.chmod(path, 0o777)


@needs_root
@pytest.mark.parametrize("how", ["base is another user's symlink",
                                 "base's parent is another user's"])
def test_a_base_another_user_can_swap_is_refused(attacker, how, monkeypatch) -> None:
    """README: 'its parent cannot be used to swap it'. The base is checked with stat(),
    which follows a symlink, and its ancestors are not checked at all: the other user
    can repoint the symlink (or rename the directory) at any moment between the check
    and the open()s, which resolve the path again."""
    sticky = tempfile.mkdtemp(prefix="shareit-base-")
    os.chmod(sticky, 0o1777)  # like /tmp
    good = tempfile.mkdtemp(prefix="shareit-good-")  # root's, 0700: passes the base check
    try:
        if how.startswith("base is"):
            base = os.path.join(sticky, "rt")
            as_user(attacker, _symlink, good, base)
        else:
            theirs = os.path.join(sticky, "theirs")
            as_user(attacker, _mkdir_open, theirs)
            base = os.path.join(theirs, "rt")  # does not exist: shareit creates it
        monkeypatch.setenv("SHAREIT_RUNTIME_DIR", base)
        with pytest.raises(PermissionDeniedError):
            shareit.open(f"x-{uuid.uuid4().hex[:6]}", backend="shm").destroy()
    finally:
        shutil.rmtree(sticky, ignore_errors=True)
        shutil.rmtree(good, ignore_errors=True)


# ------------------------------------------------------------- 4. records that are not RecordError


def _plant_record(name: str, content: bytes) -> str:
    path = _runtime.meta_path(name)
    fd = _runtime.open_private(path, os.O_WRONLY, create=True)
    os.write(fd, content)
    os.close(fd)
    return path


def test_a_deeply_nested_record_is_a_record_error_and_gc_removes_it(capfd) -> None:
    """json.loads raises RecursionError (not ValueError) on deep nesting: read_meta lets it
    through, so open() crashes with it and `shareit ls`/`gc` -- which the error tells the
    user to run -- crash too, leaving the record in place."""
    name = f"bad-{uuid.uuid4().hex[:6]}"
    path = _plant_record(name, b"[" * 100_000)
    try:
        with pytest.raises(RecordError):
            shareit.open(name, backend="shm")
        assert cli.main(["ls"]) == 0
        assert cli.main(["gc"]) == 0
        capfd.readouterr()
        assert not os.path.exists(path), "`shareit gc` left the malformed record"
    finally:
        if os.path.lexists(path):
            os.unlink(path)


@pytest.mark.parametrize("created", [float("nan"), float("inf"), 1e300],
                         ids=["nan", "inf", "1e300"])
def test_a_record_with_an_absurd_creation_time_does_not_crash_ls_or_gc(created, capfd) -> None:
    """'created' is only type-checked; json.loads accepts NaN/Infinity, and
    time.localtime() then raises ValueError/OverflowError out of `shareit ls` and `gc`."""
    name = f"bad-{uuid.uuid4().hex[:6]}"
    path = _plant_record(name, json.dumps({**_record(backend="shm"), "created": created}).encode())
    try:
        assert cli.main(["ls"]) == 0
        assert cli.main(["gc"]) == 0
        capfd.readouterr()
    finally:
        if os.path.lexists(path):
            os.unlink(path)


# -------------------------------------------------------------- 5. a FIFO where a record is opened


def test_a_fifo_in_place_of_a_record_is_refused_not_waited_on(tmp_path) -> None:
    """open_private() checks the file type *after* os.open(); O_RDONLY on a FIFO blocks
    until a writer appears, so open() / `shareit ls` hang forever instead of refusing."""
    name = f"fifo-{uuid.uuid4().hex[:6]}"
    path = _runtime.meta_path(name)
    os.mkfifo(path, 0o600)
    try:
        code = (f"import shareit\ntry:\n    shareit.open({name!r}, backend='shm')\n"
                f"except shareit.PermissionDeniedError:\n    print('refused')\n")
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=15, env=dict(os.environ))
        except subprocess.TimeoutExpired:
            pytest.fail("open() blocked on a FIFO planted as the record")
        assert proc.stdout.strip() == "refused", proc.stderr
    finally:
        for p in _runtime.files_of(name):  # the FIFO, and the lock of the refused open
            os.unlink(p)


# ------------------------------------------------------ 6. another user floods the server's socket


def _flood(address: str, seconds: float) -> int:
    import socket

    n, stop = 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(address)
            n += 1
        except OSError:
            pass
        s.close()
    return n


@needs_root
def test_another_users_connect_flood_does_not_lock_us_out(attacker) -> None:
    """The abstract address is in world-readable /proc/net/unix. Foreign connections are
    closed at once, but only after the single accept loop took them from a 128-deep
    backlog: a few unprivileged connect() loops keep it full and every new connection of
    the owner (attach by name, a new thread, a forked child) times out."""
    import threading

    d = shareit.open(f"flood-{uuid.uuid4().hex[:6]}", backend="manager", timeout=2)
    try:
        floods = [threading.Thread(target=as_user, args=(attacker, _flood, d._address, 4.0))
                  for _ in range(3)]
        for t in floods:
            t.start()
        opened = 0
        try:
            while any(t.is_alive() for t in floods):  # (they flood for 4 s)
                m = shareit.open(d.name, backend="manager", create=False, timeout=2)
                len(m)
                m.close()
                opened += 1
        finally:
            for t in floods:
                t.join()
        assert opened >= 5, "the owner could hardly open its mapping during the flood"
    finally:
        d.destroy()
