"""Configuration: vocabulary, validation, resolution order, files, immutability."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

import shareit
from shareit import config
from shareit.errors import ConfigError, UnknownBackendError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SHAREIT_BACKEND", raising=False)
    monkeypatch.delenv("SHAREIT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no shareit.toml / pyproject.toml unless a test writes one


def test_defaults() -> None:
    cfg = config.resolve("x", {})
    assert cfg.backend == config.DEFAULT_BACKEND and cfg.timeout == 10.0 and cfg.persist is False
    assert cfg.keys is None and cfg.value_type is None
    assert cfg.sources["timeout"] == "default"


def test_unknown_option_names_it_suggests_and_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        shareit.open(backend="manager", timout=3)
    msg = str(err.value)
    assert "'timout'" in msg and "Did you mean 'timeout'?" in msg and "value_type" in msg


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("timeout", "3", "seconds"),
        ("timeout", -1, "seconds"),
        ("timeout", True, "seconds"),
        ("capacity", 1.5, "int"),
        ("capacity", 0, "int"),
        ("persist", "yes", "true or false"),
        ("keys", "abc", "list of keys"),
        ("keys", [[1]], "unhashable"),
        ("keys", [], "at least one"),
        ("value_type", "complex128", "not supported"),
        ("serializer", "yaml", "'pickle' or 'json'"),
        ("url", 5, "string"),
    ],
)
def test_wrong_option_types_are_config_errors(option, value, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        shareit.open(backend="manager", **{option: value})


def test_unknown_backend_lists_valid_names_with_did_you_mean() -> None:
    with pytest.raises(UnknownBackendError) as err:
        shareit.open(backend="manger")
    msg = str(err.value)
    assert "Did you mean 'manager'?" in msg and "Valid backends: " in msg and "manager" in msg
    assert isinstance(err.value, LookupError) and isinstance(err.value, ValueError)


def test_value_type_spellings() -> None:
    for spec, name in [("int64", "int64"), (int, "int64"), (float, "float64"),
                       (np.float64, "float64"), (np.dtype("int32"), "int32"),
                       ("double", "float64")]:
        assert config.resolve(None, {"value_type": spec}).value_type == name


def test_keys_are_deduplicated_in_order_and_frozen() -> None:
    cfg = config.resolve(None, {"keys": ["b", "a", "b", ("t", 1)]})
    assert cfg.keys == ("b", "a", ("t", 1))


def test_callers_options_are_never_mutated() -> None:
    opts = {"backend": "manager", "keys": ["a", "b"], "timeout": 3}
    before = copy.deepcopy(opts)
    d = shareit.open(**opts)
    try:
        assert opts == before
        assert d.config.keys == ("a", "b") and d.config.timeout == 3.0
        with pytest.raises(AttributeError, match="frozen"):
            d.config.timeout = 1
    finally:
        d.close()


def test_resolution_order(tmp_path, monkeypatch) -> None:
    (tmp_path / "shareit.toml").write_text(
        '[defaults]\nbackend = "manager"\ntimeout = 4\ncapacity = 7\n'
        '[mappings.hits]\ntimeout = 5\n'
    )
    assert config.resolve("other", {}).timeout == 4.0
    hits = config.resolve("hits", {})
    assert hits.timeout == 5.0 and hits.capacity == 7
    assert "[mappings.hits]" in hits.sources["timeout"] and "[defaults]" in hits.sources["capacity"]
    assert config.resolve("hits", {"timeout": 6}).timeout == 6.0
    monkeypatch.setenv("SHAREIT_BACKEND", "fromenv")
    assert config.pick_backend("hits", {}) == "fromenv", "environment beats the file"
    assert config.pick_backend("hits", {"backend": "kw"}) == "kw", "keywords beat the environment"


def test_shareit_config_env_beats_local_file(tmp_path, monkeypatch) -> None:
    (tmp_path / "shareit.toml").write_text("[defaults]\ntimeout = 4\n")
    other = tmp_path / "elsewhere.toml"
    other.write_text("[defaults]\ntimeout = 9\n")
    monkeypatch.setenv("SHAREIT_CONFIG", str(other))
    assert config.resolve(None, {}).timeout == 9.0
    monkeypatch.setenv("SHAREIT_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        config.resolve(None, {})


def test_pyproject_tool_table(tmp_path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n[tool.shareit.defaults]\ntimeout = 3\n'
        '[tool.shareit.mappings.jobs]\npersist = true\n'
    )
    assert config.resolve(None, {}).timeout == 3.0
    assert config.resolve("jobs", {}).persist is True


def test_bad_files_are_config_errors(tmp_path) -> None:
    path = tmp_path / "shareit.toml"
    path.write_text("[defaults\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.resolve(None, {})
    path.write_text("[mapping.x]\ntimeout = 1\n")
    with pytest.raises(ConfigError, match="unknown table"):
        config.resolve(None, {})
    path.write_text("[defaults]\ntimeuot = 1\n")
    with pytest.raises(ConfigError, match=r"shareit\.toml") as err:
        config.resolve(None, {})
    assert "Did you mean 'timeout'" in str(err.value)


def test_open_uses_file_config(tmp_path) -> None:
    (tmp_path / "shareit.toml").write_text(
        '[mappings.cfgtest]\nbackend = "manager"\nvalue_type = "int64"\n'
    )
    name = "cfgtest"
    d = shareit.open(name)
    try:
        assert d.backend == "manager" and d.config.value_type == "int64"
        with pytest.raises(TypeError, match="int64"):
            d["a"] = "x"
    finally:
        d.close()


@pytest.mark.parametrize("bad", ["", "a/b", "-x", ".x", "x" * 121, 5, "sp ace"])
def test_bad_names_are_config_errors(bad) -> None:
    with pytest.raises(ConfigError, match="invalid mapping name"):
        shareit.open(bad, backend="manager")


def test_create_false_without_name_is_an_error() -> None:
    with pytest.raises(ConfigError, match="needs a name"):
        shareit.open(backend="manager", create=False)


def test_attach_keeps_creators_structure() -> None:
    name = f"c-{uuid.uuid4().hex[:8]}"
    owner = shareit.open(name, backend="manager", value_type="float64")
    try:
        other = shareit.open(name, backend="manager")  # says nothing about value_type
        assert other.config.value_type == "float64" and not other._owner
        other["a"] = 1
        assert owner["a"] == 1.0
        other.close()
    finally:
        owner.close()


def test_import_shareit_imports_no_backend_and_no_numpy() -> None:
    code = (
        "import sys, shareit\n"
        "bad = [m for m in sys.modules if m.startswith(('shareit.backends.', 'numpy', 'redis', "
        "'hypothesis', 'pytest'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_backends_lists_names_and_capabilities() -> None:
    import shareit.backends.manager

    info = shareit.backends()
    m = info["manager"]
    assert m["available"] and m["attach_by_name"] is True and m["cross_machine"] is False
    assert "fork" in m["start_methods"]


def test_register_a_third_party_backend_by_string(tmp_path) -> None:
    shareit.register("manager-alias", "shareit.backends.manager:ManagerMapping")
    d = shareit.open(backend="manager-alias")
    try:
        d["a"] = 1
        assert d["a"] == 1
    finally:
        d.close()


def test_errors_inherit_matching_builtins() -> None:
    e = shareit
    assert issubclass(e.ConfigError, ValueError) and issubclass(e.UnknownBackendError, LookupError)
    assert issubclass(e.BackendUnavailableError, ImportError)
    assert issubclass(e.BackendDiedError, ConnectionError)
    assert issubclass(e.LockTimeoutError, TimeoutError) and issubclass(e.ClosedError, ValueError)
    assert issubclass(e.NotFoundError, FileNotFoundError)
    assert issubclass(e.PermissionDeniedError, PermissionError)
    assert issubclass(e.RecordError, ValueError)
    for cls in (e.ConfigError, e.BackendUnavailableError, e.BackendDiedError, e.LockTimeoutError,
                e.CapacityError, e.ClosedError, e.NotFoundError, e.PermissionDeniedError,
                e.RecordError):
        assert issubclass(cls, e.ShareitError)


def test_runtime_dir_override(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHAREIT_RUNTIME_DIR", str(tmp_path))
    d = shareit.open("rt-test", backend="manager")
    try:
        assert os.path.exists(tmp_path / f"shareit-{os.geteuid()}" / "rt-test@meta")
    finally:
        d.close()
    assert not os.path.exists(tmp_path / f"shareit-{os.geteuid()}" / "rt-test@meta")
