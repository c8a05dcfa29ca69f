"""The command line: every subcommand runs and its output parses; gc spares the living."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import uuid

import pytest

import shareit
from shareit import _runtime
from shareit.testing import shareit_files


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shareit", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_bench_quick_subset_writes_parsable_results(tmp_path) -> None:
    out = tmp_path / "r.json"
    proc = run_cli("bench", "--quick", "--workloads", "get,incr,snapshot", "--backends",
                   "manager,shm", "--no-peers", "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Recommendation" in proc.stdout and "use shm" in proc.stdout
    data = json.loads(out.read_text())
    rows = {(r["title"], r["subject"]): r for r in data["results"]}
    assert rows[("get, hot key", "manager")]["value"] > 0
    assert rows[("incr, one key, 2 processes", "manager")]["exact"] is True
    assert rows[("incr, one key, 2 processes", "Manager().dict()")]["exact"] is True
    # --quick names the size that ran: 20,000 keys, not "100k"
    snap = rows[("snapshot of 20k keys, other process", "shm")]
    assert snap["n"] == 20_000 and "100k" not in proc.stdout
    assert data["machine"]["cpus"] == os.cpu_count()
    # every result cell carries its unit
    for r in data["results"]:
        if r["value"] is not None:
            assert f" {r['unit']}" in proc.stdout
    # --no-peers: no word about peers; only the chart may lack its library (a test-only venv)
    assert "--no-peers" not in proc.stderr
    missing = [ln for ln in proc.stdout.splitlines() if "not installed" in ln]
    assert all("matplotlib" in ln for ln in missing), missing


def test_bench_says_once_that_a_server_backend_has_no_server() -> None:
    proc = run_cli("bench", "--quick", "--workloads", "get", "--backends", "redis", "--no-peers",
                   "--repeats", "1", "--url", "redis://127.0.0.1:1/0")
    assert proc.returncode == 0, proc.stderr
    said = (proc.stdout + proc.stderr).count("redis: not run")
    assert said == 1 and "pass --url URL" in proc.stdout
    assert "get, hot key" in proc.stdout  # the baselines still ran


def test_bench_rejects_unknown_names_with_valid_ones() -> None:
    proc = run_cli("bench", "--backends", "manger")
    assert proc.returncode == 2 and "Did you mean 'manager'" in proc.stderr
    proc = run_cli("bench", "--workloads", "gett")
    assert proc.returncode == 2 and "Did you mean 'get'" in proc.stderr
    assert "snapshot" in proc.stderr


def _own_and_die(name: str, conn) -> None:
    m = shareit.open(name, backend="manager")
    m["a"] = 1
    conn.send("ready")
    conn.recv()


def test_ls_inspect_and_gc_spare_the_living(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHAREIT_RUNTIME_DIR", str(tmp_path))
    live_name, dead_name = f"live-{uuid.uuid4().hex[:6]}", f"dead-{uuid.uuid4().hex[:6]}"
    live = shareit.open(live_name, backend="manager")
    live.update(a=1, b=2)
    # a dead owner's record, left as SIGKILL leaves it (its server exits by itself)
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    owner = ctx.Process(target=_own_and_die, args=(dead_name, child_end))
    owner.start()
    assert parent_end.poll(60)
    record = _runtime.read_meta(dead_name)
    os.kill(owner.pid, signal.SIGSTOP)  # keep its record: a stopped owner is alive...
    try:
        os.kill(record["fields"]["server_pid"], signal.SIGKILL)
    finally:
        os.kill(owner.pid, signal.SIGKILL)  # ...then dies without any cleanup
        owner.join(60)
    try:
        proc = run_cli("ls", "--json")
        assert proc.returncode == 0, proc.stderr
        rows = {r["name"]: r for r in json.loads(proc.stdout)}
        assert rows[live_name]["users"] == 1 and rows[live_name]["keys"] == 2
        assert rows[live_name]["creator_pid"] == os.getpid()
        assert rows[dead_name]["users"] == 0 and rows[dead_name]["stale"] is True
        assert live_name in run_cli("ls").stdout

        proc = run_cli("inspect", live_name)
        info = json.loads(proc.stdout)
        assert info["backend"] == "manager" and info["backend_info"]["lock_held"] is False
        assert "authkey" not in proc.stdout
        assert run_cli("inspect", "no-such").returncode == 1

        proc = run_cli("gc", "--dry-run")
        assert f"would remove {dead_name}" in proc.stdout and live_name not in proc.stdout
        assert shareit_files(dead_name) != []
        proc = run_cli("gc")
        assert f"removed {dead_name}" in proc.stdout and live_name not in proc.stdout
        assert shareit_files(dead_name) == [] and shareit_files(live_name) != []
        assert live["a"] == 1
    finally:
        live.close()


def test_inspect_shows_the_lock_holder(tmp_path, monkeypatch) -> None:
    name = f"lk-{uuid.uuid4().hex[:6]}"
    d = shareit.open(name, backend="manager")
    try:
        with d.lock():
            info = json.loads(run_cli("inspect", name).stdout)
        assert info["backend_info"]["lock_held"] is True
        assert info["backend_info"]["lock_holder"] == os.getpid()
    finally:
        d.close()


def test_inspect_shows_the_shm_lock_holder() -> None:
    name = f"lk-{uuid.uuid4().hex[:6]}"
    d = shareit.open(name, backend="shm")
    try:
        d["a"] = 1
        with d.lock():
            info = json.loads(run_cli("inspect", name).stdout)
        assert info["backend"] == "shm" and info["keys"] == 1
        assert info["backend_info"]["lock_held"] is True
        assert info["backend_info"]["lock_holder"] == os.getpid()
        info = json.loads(run_cli("inspect", name).stdout)
        assert info["backend_info"]["lock_held"] is False
        assert info["backend_info"]["lock_holder"] is None
    finally:
        d.close()


def test_persistent_mappings_are_listed_kept_by_gc_and_removed_by_rm(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHAREIT_RUNTIME_DIR", str(tmp_path))
    names = [f"keep-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    for n, backend in zip(names, ["shm", "manager", "queue"]):
        m = shareit.open(n, backend=backend, persist=True)
        m["x"] = 1
        m.close()  # its last user leaves: a persistent mapping stays
    rows = {r["name"]: r for r in json.loads(run_cli("ls", "--json").stdout)}
    assert all(rows[n]["persist"] and rows[n]["users"] == 0 and rows[n]["keys"] == 1 for n in names)
    assert "nothing to remove" in run_cli("gc").stdout
    assert all(shareit_files(n) for n in names)
    proc = run_cli("rm", names[0], "no-such-mapping")
    assert proc.returncode == 1 and f"removed {names[0]}" in proc.stdout
    assert "no mapping named 'no-such-mapping'" in proc.stderr
    assert shareit_files(names[0]) == []
    proc = run_cli("gc", "--persistent")
    assert proc.returncode == 0 and all(f"removed {n}" in proc.stdout for n in names[1:])
    assert all(shareit_files(n) == [] for n in names)
    assert os.listdir(tmp_path / f"shareit-{os.geteuid()}") == []


def test_gc_removes_orphan_files_and_keeps_live_ones(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHAREIT_RUNTIME_DIR", str(tmp_path))
    rdir = _runtime.runtime_dir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphans = ["gone@ctl", "gone@g3", "gone@seq", "lonely@lock", f"+anon-{dead}-0123456789ab@ctl",
               f"alive@meta.tmp-{dead}-1", f"#{'a' * 24}@sock"]
    live = shareit.open("alive")
    anon = shareit.open(backend="shm")
    try:
        live["x"] = 1
        anon["y"] = 2
        for f in orphans:
            fd = _runtime.open_private(os.path.join(rdir, f), os.O_WRONLY, create=True)
            os.close(fd)
        kept = sorted(set(os.listdir(rdir)) - set(orphans))
        proc = run_cli("gc", "--dry-run")
        assert all(f"would remove {f}" in proc.stdout for f in orphans), proc.stdout
        assert sorted(os.listdir(rdir)) == sorted(kept + orphans)
        proc = run_cli("gc")
        assert all(f"removed {f}" in proc.stdout for f in orphans), proc.stdout
        assert sorted(os.listdir(rdir)) == kept, "gc removed a live mapping's file"
        assert live["x"] == 1 and anon["y"] == 2
    finally:
        live.close()
        anon.close()
    assert os.listdir(rdir) == []


def test_cli_alone_prints_help_and_version_works() -> None:
    proc = run_cli()
    assert proc.returncode == 0 and "usage: shareit" in proc.stdout and "bench" in proc.stdout
    assert "``" not in proc.stdout, "raw reST in the help"
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("shareit ")


def test_an_unknown_backend_from_the_environment_says_so(monkeypatch) -> None:
    monkeypatch.setenv("SHAREIT_BACKEND", "bogus")
    with pytest.raises(shareit.UnknownBackendError, match="environment SHAREIT_BACKEND"):
        shareit.open("x")
