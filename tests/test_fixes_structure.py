"""Guards for the fixes of the structure review (tests/test_review_structure.py): the
edges those attacks do not reach."""

from __future__ import annotations

import os

import pytest

from shareit._locks import FileLock


@pytest.mark.timeout(30)
def test_a_child_forked_while_a_file_lock_is_held_neither_keeps_nor_releases_it(tmp_path) -> None:
    """The child closes its inherited descriptor at once; leaving the parent's hold there
    (a ``with`` block the fork happened in) is a no-op, and the parent still holds it."""
    lock = FileLock(str(tmp_path / "l"))
    assert lock.acquire(1.0)
    assert lock.acquire(1.0)  # depth 2: the child unwinds both
    pid = os.fork()
    if pid == 0:  # pragma: no cover - in the child
        code = 3
        try:
            lock.release()
            lock.release()
            code = 0 if not lock.acquire(0.05) else 1  # the parent holds it still
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    lock.release()
    lock.release()
    lock.close()


@pytest.mark.timeout(60)
def test_reads_after_listing_keys_ask_the_server(monkeypatch) -> None:
    """No read is served from the snapshot that listed the keys (the prefetch for
    ``dict(d)`` is gone: it could not tell dict's reads from a later one at the same call
    site): every ``d[k]`` is a request of its own, and ``dict(d)`` is still right."""
    import shareit
    from shareit.backends.manager import ManagerMapping

    d = shareit.open(backend="manager", timeout=5.0)
    try:
        d.update({i: i * 10 for i in range(20)})
        calls = []
        real = ManagerMapping._call

        def counted(self, *req):
            calls.append(req[0])
            return real(self, *req)

        monkeypatch.setattr(ManagerMapping, "_call", counted)
        assert dict(d) == {i: i * 10 for i in range(20)}
        assert {**d} == {i: i * 10 for i in range(20)}
        assert calls.count("get") == 40
        calls.clear()
        for _ in d.keys():
            pass
        assert d[0] == 0 and d[1] == 10
        assert calls[-2:] == ["get", "get"]
    finally:
        monkeypatch.undo()
        d.close()


def _attach_then_leave(handle: bytes, conn) -> None:
    import pickle

    m = pickle.loads(handle)
    conn.send("attached")
    conn.recv()
    m.close()
    conn.send("closed")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["manager", "queue"])
def test_a_server_that_exited_by_itself_is_reaped_at_the_next_close(name, backend) -> None:
    """No thread and no SIGCHLD handler reaps it; the next open, close or destroy of a
    manager/queue handle in its starter does (one waitpid(WNOHANG) per started server)."""
    import multiprocessing as mp
    import pickle

    import shareit
    from helpers import proc_state, wait_until

    fork = mp.get_context("fork")
    m = shareit.open(name, backend=backend, timeout=5.0)
    other = shareit.open(f"{name}-2", backend=backend, timeout=5.0)  # (its close reaps)
    pid = m._proc.pid
    parent_end, child_end = fork.Pipe()
    p = fork.Process(target=_attach_then_leave, args=(pickle.dumps(m), child_end))
    p.start()
    try:
        assert parent_end.poll(30) and parent_end.recv() == "attached"
        m.close()
        parent_end.send("go")
        assert parent_end.poll(30) and parent_end.recv() == "closed"
    finally:
        p.join(30)
    assert p.exitcode == 0
    wait_until(lambda: proc_state(pid) in (b"Z", b"X"), what="the server exited")
    # (a thread group's leader shows Z while its other threads are still exiting: wait
    # until it can be reaped, without reaping it)
    wait_until(lambda: os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
               is not None, what="the server reapable")
    assert proc_state(pid) == b"Z"  # no thread, no SIGCHLD handler: nothing reaped it yet
    other.close()
    assert proc_state(pid) == b"X", "the exited server is still a zombie of its starter"
