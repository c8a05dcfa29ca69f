"""The bench's own behaviour: failures are rows with reasons, names say what ran, the
recommendation warns about slow writes, missing peers are one line each."""

from __future__ import annotations

import os
from typing import Any

import pytest

from shareit.bench import command, peers, present, runner, verdict
from shareit.bench.runner import Result
from shareit.bench.subjects import DictSubject, ManagerSubject, Subject
from shareit.bench.workloads import WORKLOADS, Params, count


class Broken(DictSubject):
    name = "broken"

    def make(self, n_hint: int = 0, **opts: Any) -> Any:
        raise BufferError("cannot close exported pointers exist")


def _quiet(i: int, cell: runner.Cell) -> None:
    pass


def test_a_failing_subject_is_one_row_with_its_reason() -> None:
    p = Params.make(quick=True, repeats=1)
    cells = runner.plan([WORKLOADS["get"], WORKLOADS["set"]], [DictSubject(), Broken()], p)
    results = runner.run(cells, p, _quiet)
    broken = [r for r in results if r.subject == "broken"]
    assert [r.title for r in broken] == ["get, hot key", "set, existing key, int"]
    assert all(r.value is None and r.failed == "BufferError: cannot close exported pointers exist"
               for r in broken)
    table = present.results_table(results, p.procs)
    assert table.count("FAILED: BufferError") == 2  # one row per failure, under its workload


def test_a_peer_whose_process_dies_is_one_row_with_the_reason() -> None:
    class Ghost(Subject):
        name = "no-such-peer"

    p = Params.make(quick=True, repeats=1)
    cell = runner.Cell(WORKLOADS["mixed"], Ghost(), 0, 2)
    worker = runner.PeerWorker("no-such-peer", timeout=60)
    try:
        r = worker.run(cell, p)
    finally:
        worker.stop()
    assert r.title == "90% get / 10% set, 2 processes" and r.value is None
    assert r.failed.startswith("no-such-peer's process exited with code 1"), r.failed
    assert "KeyError" in r.failed


def test_a_missing_peer_is_one_line_saying_what_to_install(monkeypatch) -> None:
    class Absent(peers.PeerSubject):
        name, module, install = "absentlib", "no_such_module_for_shareit", "absentlib"

    monkeypatch.setitem(peers.PEERS, "absentlib", Absent)
    monkeypatch.setattr(command, "PEERS", peers.PEERS)
    notes: list[str] = []
    found = command._peers(notes)
    assert "absentlib" not in [s.name for s in found]
    lines = [n for n in notes if "absentlib" in n]
    assert lines == ["peer absentlib: not installed — pip install absentlib "
                     "(or pip install 'shareit[bench]' for every peer)"]


@pytest.mark.parametrize("quick", [True, False])
def test_row_names_state_the_sizes_that_run(quick: bool) -> None:
    p = Params.make(quick=quick)
    subjects = [DictSubject(), ManagerSubject()]
    cells = runner.plan(list(WORKLOADS.values()), subjects, p)
    for c in cells:
        if WORKLOADS[c.workload.key].sizes:
            assert count(c.n) in c.title and c.n in (p.bulk_keys, *p.spread_keys)
    titles = " ".join(c.title for c in cells)
    if quick:
        assert "100k keys" in titles and "1M" not in titles and "snapshot of 20k" in titles
    else:
        assert "1M keys" in titles and "snapshot of 100k" in titles
    assert not any(k in titles for k in ("getN", "counters", "getdict"))


def _r(workload: str, subject: str, value: float) -> Result:
    w = WORKLOADS[workload]
    return Result(workload, w.title_for(0, 2), subject, w.unit, w.group, 0, 2, value)


def test_a_read_winner_with_slow_writes_is_recommended_with_that_caveat() -> None:
    results = [_r("get", "queue", 7e6), _r("get", "shm", 6e6),
               _r("get-dict", "queue", 2e6), _r("get-dict", "shm", 1e6),
               _r("set", "queue", 2e4), _r("set", "shm", 6e5),
               _r("del", "queue", 2e4), _r("del", "shm", 1e5)]
    vs = {v.group: v for v in verdict.verdicts(results, {"queue", "shm"}, 2)}
    assert vs["reads"].backend == "queue"
    assert "writes are" in vs["reads"].caveat and "changes rarely" in vs["reads"].caveat
    assert vs["writes"].backend == "shm" and vs["writes"].caveat == ""
    text = present.verdict_text(list(vs.values()), results, 2, {"queue", "shm"})
    assert "use queue" in text and "slower than shm" in text


def test_lossy_and_failed_results_are_shown_as_such_and_never_recommended() -> None:
    lossy = _r("incr", "Manager().dict() no lock", 9e4)
    lossy.exact = False
    base = _r("incr", "Manager().dict()", 1e4)
    value = _r("incr", "value", 3e5)
    value.exact = True
    failed = _r("incr", "shm", 0)
    failed.value, failed.failed = None, "BufferError: x"
    results = [base, lossy, value, failed]
    assert "LOST UPDATES" in present.remark(lossy) and not verdict.ok(lossy)
    vs = {v.group: v for v in verdict.verdicts(results, {"value", "shm"}, 2)}
    assert vs["counters"].backend == "value"


def test_a_peer_that_hangs_is_killed_after_the_timeout_with_the_reason() -> None:
    pytest.importorskip("lmdb")
    p = Params.make(quick=True, repeats=1)
    p.min_time = 60.0  # far longer than the timeout below
    cell = runner.Cell(WORKLOADS["mixed"], peers.PEERS["lmdb"](), 0, 2)
    worker = runner.PeerWorker("lmdb", timeout=2)
    try:
        r = worker.run(cell, p)
    finally:
        worker.stop()
    assert r.value is None and r.seconds < 10
    assert r.failed == "lmdb's process gave no result within 2 s and was killed"
    assert worker.tag and not [f for f in os.listdir("/dev/shm") if worker.tag in f]
