"""What one ``shareit.open`` costs in file-system work: the configuration file is read
once, and the runtime dir's ancestors are walked once per process (then one ``lstat``)."""

from __future__ import annotations

import collections
import uuid
from typing import Any

import pytest

import shareit
from shareit import _runtime, config
from shareit.testing import reference  # noqa: F401  (registers "reference")


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> collections.Counter[str]:
    """Count reads of the configuration file and walks of the runtime dir's ancestors,
    with a shareit.toml in the working directory and no walk done yet in this process."""
    (tmp_path / "shareit.toml").write_text("[defaults]\ntimeout = 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SHAREIT_CONFIG", raising=False)
    monkeypatch.delenv("SHAREIT_BACKEND", raising=False)
    monkeypatch.setattr(_runtime, "_bases_checked", {})
    seen: collections.Counter[str] = collections.Counter()
    for module, fn in ((config, "_load_toml"), (_runtime, "_check_base"),
                       (_runtime, "runtime_dir")):
        real = getattr(module, fn)

        def counted(*args: Any, _real: Any = real, _fn: str = fn) -> Any:
            seen[_fn] += 1
            return _real(*args)

        monkeypatch.setattr(module, fn, counted)
    return seen


@pytest.mark.parametrize("backend,options", [
    ("shm", {}), ("manager", {}), ("value", {"keys": ["a"]}), ("reference", {}),
])
@pytest.mark.parametrize("named", [True, False], ids=["named", "anonymous"])
def test_one_open_reads_the_config_once_and_walks_the_runtime_dir_once(
        counts: collections.Counter[str], backend: str, options: dict[str, Any],
        named: bool) -> None:
    opened = []
    try:
        for i in range(3):
            counts.clear()
            name = f"oc-{uuid.uuid4().hex[:8]}" if named else None
            d = shareit.open(name, backend=backend, **options)
            opened.append(d)
            assert d.config.timeout == 7.0  # the file was read, and applied
            assert counts["_load_toml"] == 1, f"open #{i + 1} read the config file " \
                                              f"{counts['_load_toml']} times"
            walks = counts["_check_base"]
            assert walks <= (1 if i == 0 else 0), f"open #{i + 1} walked the runtime dir's " \
                                                  f"ancestors {walks} times"
    finally:
        for d in opened:
            d.close()


def test_a_runtime_dir_removed_meanwhile_is_made_and_checked_again(
        counts: collections.Counter[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import shutil

    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    monkeypatch.setenv("SHAREIT_RUNTIME_DIR", str(base))  # (not the session's dir)
    d = shareit.open(backend="shm")
    d.close()
    rdir = _runtime.runtime_dir()
    assert rdir.startswith(str(base)) and counts["_check_base"] == 1
    shutil.rmtree(rdir)
    d = shareit.open(backend="shm")
    d.close()
    assert counts["_check_base"] == 2, "a missing runtime dir must be made and checked again"
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)  # another base: checked on its own, and refused
    monkeypatch.setenv("SHAREIT_RUNTIME_DIR", str(loose))
    with pytest.raises(shareit.PermissionDeniedError, match="not sticky"):
        shareit.open(backend="shm")


@pytest.mark.parametrize("named", [True, False], ids=["named", "anonymous"])
def test_shm_open_maps_each_segment_once(monkeypatch: pytest.MonkeyPatch, named: bool) -> None:
    """Creating a shm mapping maps its control segment and its first generation once each
    (#14: the generation was created, unmapped and mapped again), and so does attaching;
    real segment files, every mapping counted at ``segments.map_fd``."""
    from shareit.backends.shm import segments

    sizes: list[int] = []
    real = segments.map_fd

    def counted(fd: int, size: int) -> Any:
        sizes.append(size)
        return real(fd, size)

    monkeypatch.setattr(segments, "map_fd", counted)
    name = f"oc-{uuid.uuid4().hex[:8]}" if named else None
    d = shareit.open(name, backend="shm")
    try:
        assert len(sizes) == 2, f"create mapped {len(sizes)} segments: {sizes}"
        d["k"] = "v"
        sizes.clear()
        other = shareit.open(name, backend="shm") if named else d.__reduce__()[0](
            *d.__reduce__()[1])
        try:
            assert len(sizes) == 2, f"attach mapped {len(sizes)} segments: {sizes}"
            assert other["k"] == "v"
        finally:
            other.close()
    finally:
        d.close()
