"""The backend contract: checked when a backend loads, kept by every built-in one, and the
base class's generic bulk writes all-or-nothing when their writer is killed."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from typing import Any

import pytest

import shareit
from helpers import DEADLINE
from shareit import _runtime, registry
from shareit._opening import InheritOnly, RuntimeRecords
from shareit.base import SharedMapping, check_backend
from shareit.errors import BackendUnavailableError
from shareit.testing import reference


class Incomplete(SharedMapping):
    """Has the five methods and nothing else of the contract."""

    backend = "incomplete"

    def __getitem__(self, key: Any) -> Any:
        raise KeyError(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __delitem__(self, key: Any) -> None:
        raise KeyError(key)

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


class OwnLockGenericBulk(reference.ReferenceMapping):
    """Replaces the lock but keeps the generic bulk writes, which need the default lock."""

    def _lock_acquire(self, timeout: float) -> bool:
        return super()._lock_acquire(timeout)


class AttachMismatch(reference.ReferenceMapping):
    opener = InheritOnly()  # but capabilities say attach_by_name=True


def test_an_incomplete_backend_is_refused_at_load_naming_what_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._registry, "incomplete", f"{__name__}:Incomplete")
    with pytest.raises(BackendUnavailableError, match="breaks the backend contract") as err:
        registry.load("incomplete")
    for hook in ("_attach_record", "_create", "_from_handle", "_handle"):
        assert hook in str(err.value)
    with pytest.raises(BackendUnavailableError):
        shareit.open(backend="incomplete")
    assert shareit.backends()["incomplete"]["available"] is False


def test_rules_beyond_abstract_methods_are_checked() -> None:
    assert "replaces the lock but not _update_items and clear" in " ".join(
        check_backend(OwnLockGenericBulk))
    assert "disagrees with capabilities.attach_by_name=True" in " ".join(
        check_backend(AttachMismatch))


@pytest.mark.parametrize("name", ["shm", "manager", "queue", "value", "redis", "reference"])
def test_every_backend_keeps_the_contract_and_none_overrides_open(name: str) -> None:
    cls = registry.load(name)
    assert check_backend(cls) == []
    assert not any("_open" in vars(k) for k in cls.__mro__ if k is not SharedMapping), \
        "a backend replaced _open: its open protocol belongs in an open strategy"
    assert isinstance(cls.opener, RuntimeRecords) == (name in ("shm", "manager", "queue",
                                                                "reference"))


class _Killer:
    """Kills the process that pickles it: a writer dying in the middle of update()."""

    def __reduce__(self) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def _update_and_die(d: SharedMapping) -> None:
    d.update({"a": 10, "new": 11, "b": _Killer()})


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_generic_update_killed_half_way_is_rolled_back_by_the_next_locker(method: str) -> None:
    d = shareit.open(backend="reference")
    try:
        d.update(a=1, b=2)
        p = mp.get_context(method).Process(target=_update_and_die, args=(d,))
        p.start()
        p.join(DEADLINE * 6)
        assert p.exitcode == -signal.SIGKILL
        assert d._stem is not None
        assert os.path.exists(d._journal_path()), "the child did not die mid-update"
        assert dict(d) == {"a": 1, "b": 2}, "a half-done update() was seen"
        assert not os.path.exists(d._journal_path())
        d.update(a=3)  # and the lock works on
        assert d.incr("a") == 4
    finally:
        d.close()


def test_a_generic_update_that_fails_changes_nothing() -> None:
    d = shareit.open(backend="reference")
    try:
        d.update(a=1, b=2)
        with pytest.raises(TypeError, match="pickle"):
            d.update({"c": 3, "d": lambda: 1})
        assert dict(d) == {"a": 1, "b": 2}
        d.clear()
        assert dict(d) == {}
    finally:
        d.close()


def test_a_handle_used_after_destroy_leaves_no_lock_file_behind(name: str) -> None:
    d = shareit.open(name, backend="reference")
    e = shareit.open(name, backend="reference")
    e.destroy()
    with pytest.raises(shareit.BackendDiedError):
        d["a"] = 1
    with pytest.raises(shareit.BackendDiedError):
        d["a"]
    d.close()
    assert _runtime.files_of(name) == []
