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


def wait_stopped(pid: int, timeout: float = DEADLINE) -> None:
    """Poll /proc until ``pid`` is stopped (SIGSTOP: ``kill()`` returns before it is)."""
    wait_until(lambda: proc_state(pid) in (b"T", b"t"), f"process {pid} stopped", timeout)


# ------------------------------------------------ shm: the flat paths against the steps


def shm_state(d) -> tuple[bytes, bytes]:
    """The control segment (but the mutex's bytes) and the data segment of a shm mapping,
    as bytes."""
    from shareit.backends.shm import layout as L

    t = d._t
    ctl = bytes(t.cmv)
    return ctl[: L.MUTEX_OFFSET] + ctl[L.MUTEX_OFFSET + 64 :], bytes(t.g.mv)


def apply_op(d, op: tuple) -> object:
    """``("set", k, v)``, ``("pop", k)`` or ``("del", k)`` on ``d``; "absent" for none."""
    if op[0] == "set":
        d[op[1]] = op[2]
        return None
    if op[0] == "pop":
        return d.pop(op[1], "absent")
    try:
        del d[op[1]]
    except KeyError:
        return "absent"
    return None


def by_steps(d, op: tuple) -> object:
    """:func:`apply_op` with every flat path of shm's ``fastpath`` turned off: the
    Table's steps."""
    import pytest

    from shareit.backends.shm import fastpath
    from shareit.backends.shm import mapping as M

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(M, "insert", lambda *a: False)
        mp_.setattr(M, "overwrite", lambda *a: False)
        mp_.setattr(M, "write_flat", lambda *a: False)
        mp_.setattr(M, "remove_flat", lambda *a, **k: fastpath.NOT_FLAT)
        return apply_op(d, op)
