"""Session-wide setup and leak checks.

Each test session uses a private runtime dir of its own (``SHAREIT_RUNTIME_DIR``,
inherited by every child process), so the leak check counts only what this
session created: another test run, or an application using shareit on the same
machine, can neither fail it nor be disturbed by it.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from helpers import ATTACKER
from shareit import _runtime

_SESSION_DIR = tempfile.mkdtemp(
    prefix="shareit-tests-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
)
os.environ["SHAREIT_RUNTIME_DIR"] = _SESSION_DIR
_PID = os.getpid()


@atexit.register
def _remove_empty_session_dir() -> None:
    """A session that never ran (a usage error, ``--collect-only``) leaves nothing: its
    directories go if empty (a leak's files stay, for the report). Only in the process
    that made them: a forked child exiting through ``sys.exit`` runs this too."""
    if os.getpid() != _PID:
        return
    for root, _, _ in sorted(os.walk(_SESSION_DIR), key=lambda x: -len(x[0])):
        try:
            os.rmdir(root)
        except OSError:
            pass


def _our_files() -> set[str]:
    return set(os.listdir(_runtime.runtime_dir()))


def _children_running() -> list[str]:
    """shareit server processes whose parent is this test process."""
    me, out = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == me and fields[0] != b"Z" and "shareit" in cmd:
            out.append(f"{pid}: {cmd}")
    return out


@pytest.fixture(scope="session", autouse=True)
def no_leaks_after_session():
    assert _runtime.runtime_dir().startswith(_SESSION_DIR)
    yield
    # A server whose last user died exits by itself within its check interval (0.5 s):
    # give it a bounded moment before calling it a leak (generous: a loaded machine).
    deadline = time.monotonic() + 30.0
    while (_our_files() or _children_running()) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling our own view, with a deadline
    left = sorted(_our_files())
    running = _children_running()
    if not left and not running:
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)
    assert not left, f"the test session left these in {_runtime.runtime_dir()}: {left}"
    assert not running, f"the test session left these processes running: {running}"


@pytest.fixture
def name() -> str:
    """A fresh mapping name for one test."""
    return f"ft-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def attacker():
    """(uid, gid) of a second user, made for this module and removed after it."""
    created = False
    try:
        pw = pwd.getpwnam(ATTACKER)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            pytest.skip("useradd is not installed: cannot create a second user")
        subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        ATTACKER], check=True, capture_output=True)
        created = True
        pw = pwd.getpwnam(ATTACKER)
    yield pw.pw_uid, pw.pw_gid
    if created:
        subprocess.run(["userdel", ATTACKER], capture_output=True)
