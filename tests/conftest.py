"""Session-wide leak checks: no shareit files left in the runtime dir, no server left running."""

from __future__ import annotations

import os
import uuid

import pytest

from shareit import _runtime


def _our_files() -> set[str]:
    d = _runtime.runtime_dir()
    return {f for f in os.listdir(d) if f.startswith(_runtime.PREFIX)}


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
    before = _our_files()
    yield
    left = sorted(_our_files() - before)
    assert not left, f"the test session left these in {_runtime.runtime_dir()}: {left}"
    running = _children_running()
    assert not running, f"the test session left these processes running: {running}"


@pytest.fixture
def name() -> str:
    """A fresh mapping name for one test."""
    return f"ft-{uuid.uuid4().hex[:10]}"
