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
