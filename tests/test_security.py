"""The trust boundary, attacked: a second, unprivileged user on the same machine.

Each test reproduces an attack that worked before the runtime dir became
per-user and records became validated JSON, and asserts that the planted
payload never runs, nothing foreign is killed or unlinked, and the victim's
data is neither read nor written by the other user.

The attacker is a real second user: created with ``useradd`` for the session,
it runs as a forked child of the test process that drops its privileges
(``setresuid``) before doing anything. That needs root, which CI has; as
another user these tests are skipped with that reason.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import multiprocessing as mp
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import uuid

import pytest

import shareit
from helpers import ATTACKER
from shareit import _runtime, cli
from shareit.errors import NotFoundError, PermissionDeniedError, RecordError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates a second user and drops privileges to it"
)

CHILD_TIMEOUT = 60.0


class Payload:
    """Unpickling this creates ``marker``: proof that someone ran the attacker's code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path: str) -> None:
    with open(path, "w") as f:
        f.write("pwned")


@pytest.fixture
def shared_base(monkeypatch):
    """A base runtime dir like /dev/shm (mode 1777): every user may create entries in it."""
    base = tempfile.mkdtemp(prefix="shareit-sec-",
                            dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.chmod(base, 0o1777)
    monkeypatch.setenv("SHAREIT_RUNTIME_DIR", base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def marker(tmp_path):
    """Where a payload that ran would leave its mark (root's own, private tmp dir)."""
    path = tmp_path / "marker"
    os.chmod(tmp_path, 0o777)  # so that the payload could write there as whichever user ran it
    yield str(path)
    assert not path.exists(), "the attacker's payload ran"


def _as_user(uid: int, gid: int, fn, args: tuple, conn) -> None:
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        conn.send(("ok", fn(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _preload() -> None:
    """Import now what the attacker's child will need: once it is another user it cannot
    read root's Python installation (under /root, mode 0700)."""
    from shareit import _locks

    _locks.robust_mutex_available()
    shareit.backends()


def as_user(user: tuple, fn, *args):
    """Run ``fn(*args)`` in a forked child that is ``user`` (uid, gid); return its result."""
    _preload()
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_as_user, args=(user[0], user[1], fn, args, child_end))
    p.start()
    child_end.close()
    try:
        assert parent_end.poll(CHILD_TIMEOUT), "the attacker process did not answer in time"
        kind, value = parent_end.recv()
    finally:
        p.join(CHILD_TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join()
    assert kind == "ok", f"the attacker process failed:\n{value}"
    return value


def _record(**fields) -> dict:
    me = [os.getpid(), _runtime.proc_start_time(os.getpid())]
    rec = {"version": 3, "backend": "manager", "persist": False, "owner_pid": me[0],
           "owner_start": me[1], "created": time.time(), "users": [me],
           "options": {"value_type": None, "keys": None, "capacity": None, "persist": False}}
    rec.update(fields)
    return rec


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shareit", *args], capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT, env=dict(os.environ))


# ---------------------------------------------------------------------------- the runtime dir


def _plant_dir(base: str, victim_uid: int, marker: str, symlink_to: str | None) -> None:
    """As the attacker: make the victim's runtime dir, full of records that run code."""
    victim_dir = os.path.join(base, f"shareit-{victim_uid}")
    if symlink_to is not None:
        os.makedirs(symlink_to, exist_ok=True)
        os.symlink(symlink_to, victim_dir)
        victim_dir = symlink_to
    else:
        os.mkdir(victim_dir, 0o777)
        os.chmod(victim_dir, 0o777)
    evil = base64.b64encode(pickle.dumps(Payload(marker))).decode()
    for name in ("hits", "jobs"):
        path = os.path.join(victim_dir, f"{name}@meta")
        with open(path, "w") as f:
            json.dump(_record(options=evil, address="\0evil", authkey="00" * 32,
                              server_pid=1, server_start=None), f)
        os.chmod(path, 0o666)


@pytest.mark.parametrize("how", ["directory", "symlink"])
def test_a_runtime_dir_made_by_another_user_is_refused(attacker, shared_base, marker, how) -> None:
    target = os.path.join(shared_base, "attacker-own") if how == "symlink" else None
    as_user(attacker, _plant_dir, shared_base, os.geteuid(), marker, target)
    for backend in ("shm", "manager", "queue"):
        with pytest.raises(PermissionDeniedError, match=r"refusing to use .*shareit-0") as err:
            shareit.open("hits", backend=backend)
        assert ("symlink" in str(err.value)) if how == "symlink" else (ATTACKER in str(err.value))
    with pytest.raises(PermissionDeniedError):
        shareit.destroy("jobs")
    for cmd in ("ls", "gc", "inspect hits"):
        proc = run_cli(*cmd.split())
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "refusing to use" in proc.stderr
    planted = os.path.join(target or os.path.join(shared_base, "shareit-0"), "hits@meta")
    assert os.path.exists(planted), "root removed a file of the other user's"


def test_a_runtime_dir_base_others_can_swap_is_refused(shared_base, monkeypatch, tmp_path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)  # writable by all, not sticky: another user could rename our dir away
    monkeypatch.setenv("SHAREIT_RUNTIME_DIR", str(loose))
    with pytest.raises(PermissionDeniedError, match="not sticky"):
        shareit.open("x")


# ---------------------------------------------------------------------------- squatting a name


def _squat(name: str, marker: str) -> list:
    d = shareit.open(name, backend="shm", persist=True)
    d["planted"] = Payload(marker)
    d["counter"] = 1000
    return sorted(os.listdir(_runtime.runtime_dir()))


def _look(name: str) -> dict:
    d = shareit.open(name, backend="shm", persist=True)
    try:
        return {"keys": sorted(d), "counter": d["counter"]}  # (never reads its own payload)
    finally:
        d.close()


def _remove(name: str) -> None:
    shareit.destroy(name)


def test_another_users_mapping_of_the_same_name_is_never_attached(attacker, shared_base,
                                                                  marker) -> None:
    files = as_user(attacker, _squat, "hits", marker)
    assert "hits@meta" in files
    try:
        mine = shareit.open("hits", backend="shm")
        try:
            assert len(mine) == 0, "root attached to the other user's mapping"
            mine["secret"] = "root's"
            mine.incr("counter")
            assert dict(mine) == {"secret": "root's", "counter": 1}
            theirs = as_user(attacker, _look, "hits")
            assert theirs == {"keys": ["counter", "planted"], "counter": 1000}, \
                "the other user saw root's writes"
        finally:
            mine.close()
        with pytest.raises(NotFoundError):
            shareit.open("hits", create=False)
    finally:
        as_user(attacker, _remove, "hits")


def _read_victim_files(victim_dir: str) -> str:
    try:
        os.listdir(victim_dir)
    except PermissionError:
        return "denied"
    return "listed"


def test_another_user_cannot_reach_the_files_of_a_mapping(attacker, shared_base) -> None:
    d = shareit.open("private", backend="shm")
    try:
        d["secret"] = "root's"
        rdir = _runtime.runtime_dir()
        assert stat.S_IMODE(os.lstat(rdir).st_mode) == 0o700
        for f in os.listdir(rdir):
            assert stat.S_IMODE(os.lstat(os.path.join(rdir, f)).st_mode) == 0o600, f
        assert as_user(attacker, _read_victim_files, rdir) == "denied"
    finally:
        d.close()


# ---------------------------------------------------------------------------- records are data


def _victim() -> subprocess.Popen:
    """A process of ours that a planted record names as a 'server' to kill."""
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)


def test_a_stale_record_never_gets_a_pid_signalled_nor_a_path_unlinked(tmp_path) -> None:
    victim = _victim()
    victim_file = tmp_path / "victim.txt"
    victim_file.write_text("keep me")
    rdir = _runtime.runtime_dir()
    outside = os.path.relpath(str(victim_file), rdir)
    name = f"stale-{uuid.uuid4().hex[:6]}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    rec = _record(owner_pid=int(dead.stdout), owner_start=1, users=[[int(dead.stdout), 1]],
                  address="\0x", authkey="00" * 32,
                  server_pid=victim.pid, server_start=_runtime.proc_start_time(victim.pid),
                  segment=outside, seq_path=str(victim_file), hub=True)
    try:
        for backend in ("manager", "queue", "shm"):
            _runtime.publish(name, {**rec, "backend": backend})
            proc = run_cli("gc")
            assert proc.returncode == 0 and f"removed {name}" in proc.stdout, proc
            assert victim.poll() is None, "gc killed a process named by a record"
            _runtime.publish(name, {**rec, "backend": backend})
            d = shareit.open(name, backend=backend)  # finds the stale record, replaces it
            d.close()
            assert victim.poll() is None, "open() killed a process named by a record"
            assert victim_file.read_text() == "keep me"
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("content", [
    b"{}", b"[1]", b"null", b"not json", b'{"version": 3}',
    json.dumps(_record(options="gASVIAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAR0cnVllIWUUpQu")).encode(),
    json.dumps(_record(owner_pid="1")).encode(),
    json.dumps(_record(options={"value_type": "evil", "keys": None})).encode(),
])
def test_a_malformed_record_is_an_error_never_code_and_ls_gc_skip_it(content: bytes, capfd) -> None:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    good = shareit.open(f"good-{uuid.uuid4().hex[:6]}", backend="shm")
    path = _runtime.meta_path(name)
    fd = _runtime.open_private(path, os.O_WRONLY, create=True)
    os.write(fd, content)
    os.close(fd)
    try:
        with pytest.raises(RecordError, match="shareit gc"):
            shareit.open(name, backend="shm")
        assert cli.main(["ls"]) == 0
        out, err = capfd.readouterr()
        assert good.name in out and f"skipping {name}" in err and len(err.splitlines()) == 1
        assert cli.main(["gc"]) == 0
        out, _ = capfd.readouterr()
        assert f"removed {name}: its record is malformed" in out
        assert not os.path.exists(path) and good.name in _runtime.list_names()
    finally:
        good.close()


# ---------------------------------------------------------------------------- planted files


@pytest.mark.parametrize("kind,backend", [("ctl", "shm"), ("g1", "shm"), ("seq", "queue"),
                                          ("meta", "shm"), ("meta", "manager")])
def test_a_symlink_in_place_of_a_file_is_never_followed(tmp_path, kind, backend) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    name = f"sym-{uuid.uuid4().hex[:6]}"
    link = _runtime.path(name, kind)
    os.symlink(victim, link)
    try:
        if kind == "meta":  # the record: refused, never read through the link
            with pytest.raises(PermissionDeniedError, match="symlink"):
                shareit.open(name, backend=backend)
        else:  # a segment of a mapping being created: the link is replaced, exclusively
            d = shareit.open(name, backend=backend)
            try:
                d["a"] = 1
                assert stat.S_ISREG(os.lstat(link).st_mode)
            finally:
                d.close()
        assert victim.read_bytes() == b"keep me"
    finally:
        for p in _runtime.files_of(name):  # the link, and the lock of the refused open
            os.unlink(p)


def test_a_file_others_can_access_is_refused() -> None:
    name = f"loose-{uuid.uuid4().hex[:6]}"
    d = shareit.open(name, backend="shm")
    try:
        d["a"] = 1
        os.chmod(_runtime.path(name, "ctl"), 0o666)
        with pytest.raises(PermissionDeniedError, match="0666"):
            shareit.open(name, create=False)
        os.chmod(_runtime.path(name, "ctl"), 0o600)
        with shareit.open(name, create=False) as again:
            assert again["a"] == 1
    finally:
        d.close()


# ------------------------------------------------------------------------ several users, one CLI


def _own_mappings(n: int) -> list:
    out = []
    for i in range(n):
        m = shareit.open(f"theirs-{i}", backend="shm", persist=True)
        m["x"] = i
        m.close()
        out.append(m.name)
    return sorted(os.listdir(_runtime.runtime_dir()))


def _cli_as_user(cmd: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(cmd.split())
    return rc, out.getvalue(), err.getvalue()


def test_ls_and_gc_show_and_touch_only_the_callers_mappings(attacker, shared_base) -> None:
    theirs = as_user(attacker, _own_mappings, 2)
    mine = shareit.open("mine", backend="shm")
    try:
        for cmd in ("ls", "gc"):
            proc = run_cli(cmd)
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
            assert "theirs" not in proc.stdout and "1 other user(s)" in proc.stdout
        assert "mine" in run_cli("ls").stdout
        rc, out, err = as_user(attacker, _cli_as_user, "ls")
        assert rc == 0 and "mine" not in out and "theirs-0" in out and "1 other user(s)" in out, err
        rc, out, err = as_user(attacker, _cli_as_user, "gc")
        assert rc == 0 and "mine" not in out, err
        assert mine.name in _runtime.list_names()
        assert as_user(attacker, _own_mappings, 0) == theirs, "root's gc touched the other user's"
    finally:
        mine.close()


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("other", ["foo.g1", "foo.meta", "foo.seq", "foo.lock", "foo.ctl"])
def test_no_name_reaches_another_names_files(other) -> None:
    stem = f"foo{uuid.uuid4().hex[:6]}"
    d = shareit.open(stem, backend="shm")
    try:
        d["a"] = 1
        before = sorted(os.path.basename(p) for p in _runtime.files_of(stem))
        o = shareit.open(stem + other[3:], backend="shm")
        o["b"] = 2
        o.destroy()
        assert sorted(os.path.basename(p) for p in _runtime.files_of(stem)) == before
        assert dict(d) == {"a": 1}
    finally:
        d.close()


@pytest.mark.parametrize("bad", ["x\n", "a/b", "../x", ".x", "-x", "a@meta", "+anon-1-abcdef12",
                                 "", "x" * 121, "a\0b", "é"])
def test_bad_names_are_rejected_before_anything_is_touched(bad) -> None:
    before = sorted(os.listdir(_runtime.runtime_dir()))
    with pytest.raises(shareit.ConfigError, match="invalid mapping name"):
        shareit.open(bad)
    assert sorted(os.listdir(_runtime.runtime_dir())) == before


@pytest.mark.parametrize("backend", ["shm", "manager", "queue"])
def test_a_handle_never_carries_a_path(tmp_path, backend) -> None:
    d = shareit.open(backend=backend)
    try:
        d["k"] = 1
        *rest, stem = d._handle()
        assert stem.startswith("+anon-") and not any(
            isinstance(x, str) and os.sep in x for x in d._handle()), d._handle()
        evil = (*rest, "../../" + str(tmp_path / "x"))
        with pytest.raises(shareit.ConfigError, match="invalid shared object stem"):
            type(d)._from_handle(evil)
        assert pickle.loads(pickle.dumps(d))["k"] == 1  # the address follows from the stem
    finally:
        d.close()

