"""Runs the bench: a plan of cells (workload × size × processes × subject), each measured
once, in this process or — for peers — in a subprocess of the peer's own.

A peer's subprocess lives for the whole run and takes one cell at a time over a
pipe (one start-up per peer, not per cell); if it dies or stalls, that cell
becomes a failure row with the reason and the next cell starts a new one.
Every failure is one :class:`Result` with ``failed`` set; the run goes on.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from .peers import PEERS, remove_tagged
from .subjects import Cap, Subject
from .workloads import WORKLOADS, Params, Workload, count


@dataclass
class Result:
    workload: str        # the workload's key
    title: str           # what ran, sizes included
    subject: str
    unit: str
    group: str
    n: int = 0
    procs: int = 1
    value: float | None = None
    exact: bool | None = None
    failed: str = ""     # why there is no value: it failed
    skipped: str = ""    # why there is no value: it was not run
    note: str = ""
    samples: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time this cell took


@dataclass
class Cell:
    workload: Workload
    subject: Subject
    n: int
    procs: int

    @property
    def title(self) -> str:
        return self.workload.title_for(self.n, self.procs)

    def result(self, **kw: Any) -> Result:
        w = self.workload
        return Result(w.key, self.title, self.subject.name, w.unit, w.group, self.n, self.procs,
                      **kw)


def plan(workloads: list[Workload], subjects: list[Subject], p: Params) -> list[Cell]:
    """Workload by workload, so the subjects of one row are measured close together in time."""
    return [Cell(w, s, n, procs) for w in workloads for n, procs in w.variants(p)
            for s in subjects if w.applies(s)]


def _reason(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:160]


def measure(cell: Cell, p: Params) -> Result:
    """One cell in this process; an exception becomes the row's reason."""
    t0 = time.perf_counter()
    gc.collect()
    gc.disable()  # as timeit does: a collection over a 1M-key build would land in one subject's
    try:          # figures and not another's
        m = cell.workload.fn(cell.subject, p, cell.n, cell.procs)
    except Exception as exc:
        return cell.result(failed=_reason(exc), seconds=time.perf_counter() - t0)
    finally:
        gc.enable()
    return cell.result(value=m.value, exact=m.exact, note=m.note, samples=m.samples,
                       seconds=time.perf_counter() - t0)


class PeerWorker:
    """A peer's own subprocess, fed one cell at a time."""

    MARK = b"@@result "

    def __init__(self, name: str, timeout: float) -> None:
        self.name, self.timeout = name, timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.err: IO[bytes] | None = None
        self.buf = b""
        self.tag = ""

    def _start(self) -> subprocess.Popen[bytes]:
        self.err = tempfile.TemporaryFile()
        self.buf = b""
        self.tag = f"shareit-bench-{os.getpid()}-{id(self):x}-{time.monotonic_ns()}-"
        self.proc = subprocess.Popen([sys.executable, "-m", "shareit.bench.runner", self.name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, start_new_session=True,
                                     env={**os.environ, "SHAREIT_BENCH_TAG": self.tag})
        return self.proc

    def run(self, cell: Cell, p: Params) -> Result:
        t0 = time.perf_counter()
        proc = self.proc if self.proc and self.proc.poll() is None else self._start()
        request = {"workload": cell.workload.key, "n": cell.n, "procs": cell.procs,
                   "params": asdict(p)}
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
            line = self._read_line(proc, t0 + self.timeout)
        except (OSError, EOFError, TimeoutError) as exc:
            why = self._why_died(exc)
            self.stop()
            return cell.result(failed=why, seconds=time.perf_counter() - t0)
        return Result(**{**json.loads(line), "seconds": time.perf_counter() - t0})

    def _read_line(self, proc: subprocess.Popen[bytes], deadline: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.startswith(self.MARK):
                    return line[len(self.MARK):]
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"no result within {self.timeout:.0f} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise EOFError("exited")
                self.buf += chunk

    def _why_died(self, exc: BaseException) -> str:
        proc = self.proc
        if proc is not None and isinstance(exc, TimeoutError):
            self._kill_group(proc)
        code = proc.wait(5) if proc else None
        tail = ""
        if self.err is not None:
            self.err.seek(0)
            lines = self.err.read().decode(errors="replace").strip().splitlines()
            tail = lines[-1].strip() if lines else ""
        if isinstance(exc, TimeoutError):
            how = f"gave {exc} and was killed"
        elif code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        return f"{self.name}'s process {how}" + (f": {tail[:120]}" if tail else "")

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        """The peer's process and every child it forked (a hung parallel run leaves some)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.close()  # its loop ends when its stdin does
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
            self._kill_group(self.proc)  # and any child it left behind
            self.proc.wait()
            self.proc = None
            remove_tagged(self.tag)  # and whatever files a killed one could not remove


def run(cells: list[Cell], p: Params, progress: Callable[[int, Cell], None],
        timeout: float = 300) -> list[Result]:
    workers: dict[str, PeerWorker] = {}
    results = []
    try:
        for i, cell in enumerate(cells):
            progress(i, cell)
            limit = cell.subject.max_keys
            if limit is not None and cell.n > limit:
                results.append(cell.result(skipped=f"{count(cell.n)} keys: "
                                                   f"{cell.subject.max_keys_why}"))
            elif Cap.PEER in cell.subject.caps:
                name = cell.subject.name
                worker = workers.setdefault(name, PeerWorker(name, timeout))
                results.append(worker.run(cell, p))
            else:
                results.append(measure(cell, p))
    finally:
        for w in workers.values():
            w.stop()
        for s in dict.fromkeys(c.subject for c in cells):
            s.finish()
    return results


def _peer_main(name: str) -> None:
    """``python -m shareit.bench.runner PEER``: cells on one peer, one JSON line each."""
    subject = PEERS[name]()
    out = sys.stdout.buffer
    for line in sys.stdin:
        req = json.loads(line)
        params = Params(**req["params"])
        cell = Cell(WORKLOADS[req["workload"]], subject, req["n"], req["procs"])
        result = measure(cell, params)
        out.write(PeerWorker.MARK + json.dumps(asdict(result)).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _peer_main(sys.argv[1])
