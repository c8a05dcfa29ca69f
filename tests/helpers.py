"""Small helpers the fault tests share: waiting with a deadline, process states, joining."""

from __future__ import annotations

import time

DEADLINE = 10.0

#: The second user the security tests create (see ``conftest.attacker``).
ATTACKER = "shareit-attacker"


def wait_until(pred, what: str = "condition", timeout: float = DEADLINE) -> None:
    """Poll our own view of ``pred`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.005)  # polling with a deadline, not waiting on another process's timing


def proc_state(pid: int) -> bytes:
    """The kernel's one-letter state of ``pid`` (b"X" when it no longer exists)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return b"X"
    return data[data.rindex(b")") + 2 :].split()[0]


def gone(pid: int) -> bool:
    """Dead: reaped, or a zombie waiting for its parent."""
    return proc_state(pid) in (b"Z", b"X")


def reading(pid: int, fd: int) -> bool:
    """Whether the main thread of ``pid`` is blocked in read(2) on its descriptor ``fd``
    (a reply it waits for on that connection; not a read of anything else)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == "0" and int(fields[1], 16) == fd
