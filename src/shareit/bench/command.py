"""``shareit bench``: choose what runs, run it, show it, save it.

The subjects that cannot run here are said once each, before the results: a
peer that is not installed (with what to install), a backend whose server is
not reachable (with how to point the bench at one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Any

from ..config import did_you_mean, redact_url
from . import present, runner, verdict
from .peers import PEERS, peer_available
from .subjects import Cap, ShareitSubject, Subject, baselines
from .workloads import WORKLOADS, Params

INSTALL_ALL = "pip install 'shareit[bench]'"


def _pick(kind: str, given: str | None, valid: list[str]) -> list[str] | None:
    names = given.split(",") if given else valid
    for name in names:
        if name not in valid:
            print(f"shareit bench: unknown {kind} {name!r}.{did_you_mean(name, valid)} "
                  f"Valid: {', '.join(valid)}", file=sys.stderr)
            return None
    return names


def _usable(backends: list[str], url: str | None, notes: list[str]) -> list[ShareitSubject]:
    from ..api import backends as info_of

    info, out = info_of(), []
    for b in backends:
        if not info[b]["available"]:
            notes.append(f"{b}: not run — {info[b]['reason']}")
            continue
        s = ShareitSubject(b, url)
        if Cap.NEEDS_SERVER in s.caps:  # one open tells whether its server is there
            try:
                s.close(s.make(timeout=2.0))
            except Exception as exc:
                where = redact_url(url) if url else "its default url"
                notes.append(f"{b}: not run — no server reachable at {where} "
                              f"({type(exc).__name__}); start one, or pass --url URL")
                continue
        out.append(s)
    return out


def _peers(notes: list[str]) -> list[Subject]:
    out: list[Subject] = []
    for cls in PEERS.values():
        if peer_available(cls):
            out.append(cls())
        else:
            notes.append(f"peer {cls.name}: not installed — pip install {cls.install} "
                         f"(or {INSTALL_ALL} for every peer)")
    return out


def run(args: argparse.Namespace) -> int:
    from ..api import backends as info_of

    t_start = time.perf_counter()
    backends = _pick("backend", args.backends, sorted(info_of()))
    keys = _pick("workload", args.workloads, list(WORKLOADS))
    if backends is None or keys is None:
        return 2
    p = Params.make(args.quick, args.procs, args.repeats)
    notes: list[str] = []
    ours = _usable(backends, args.url, notes)
    subjects: list[Subject] = baselines() + ([] if args.no_peers else _peers(notes)) + list(ours)
    cells = runner.plan([WORKLOADS[k] for k in keys], subjects, p)
    if notes:  # said once, before the run, on stdout with the results
        print("Not run here:\n" + "\n".join(f"  {n}" for n in notes) + "\n", flush=True)
    print(f"shareit bench{' --quick' if p.quick else ''}: {len(cells)} measurements on "
          f"{os.cpu_count()} cores, median of {p.repeats} each", file=sys.stderr)
    progress = present.Progress(len(cells))
    try:
        results = runner.run(cells, p, progress, timeout=20 if p.quick else 120)
    finally:
        progress.close()

    shareit = {s.name for s in ours}
    vs = verdict.verdicts(results, shareit, p.procs)
    print(present.results_table(results, p.procs))
    scaling = present.scaling_table(results)
    if scaling:
        print("\n" + scaling)
    elif p.quick:
        print(f"\n(Scaling with {', '.join(map(str, Params.make(False).scale_procs))} processes: "
              "in the full run, shareit bench without --quick.)")
    print("\n" + present.verdict_text(vs, results, p.procs, shareit))
    _save(args, p, notes, results, vs)
    png = present.chart(results, vs, p.procs, os.path.splitext(args.out)[0] + ".png")
    print(f"\nresults written to {args.out}" + (f", chart to {png}" if png else
                                                 " (no chart: matplotlib is not installed)"))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


def _save(args: argparse.Namespace, p: Params, notes: list[str], results: list[runner.Result],
          vs: list[verdict.Verdict]) -> None:
    payload: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M:%S")},
        "params": asdict(p), "not_run": notes, "command": " ".join(["shareit"] + sys.argv[1:]),
        "results": [asdict(r) for r in results],
        "recommendations": [asdict(v) for v in vs],
    }
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
