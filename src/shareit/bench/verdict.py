"""What the bench recommends: one shareit backend per class of use, from this run's figures.

Within a class (reads, writes, counters, bulk, latency) each backend scores the
geometric mean, over the class's rows, of its result relative to the best
shareit backend's in that row; a backend must have a correct result in every
row of the class to be a candidate. A winner whose writes are slow is named
with that caveat, so a read-mostly winner is never recommended for data that
changes often.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from .runner import Result
from .workloads import WORKLOADS

#: class of use -> what a user would call it (the README's "Which backend?" rows)
GROUPS = {
    "reads": "read-mostly data (config, flags, lookups)",
    "writes": "reads and writes from many processes, any values",
    "counters": "counters and gauges",
    "bulk": "numeric tables and bulk copies",
    "latency": "seeing another process's change; attaching by name",
}
WRITES_SLOW = 0.2  # a winner below this share of the best writer gets the caveat


def ok(r: Result | None) -> bool:
    return r is not None and r.value is not None and r.value > 0 and not r.failed \
        and not r.skipped and r.exact is not False


def ratio(r: Result, base: Result | None) -> float | None:
    """How many times better than ``base`` (>1 is better, whatever the unit)."""
    if not ok(r) or base is None or not ok(base):
        return None
    assert r.value is not None and base.value is not None
    return r.value / base.value if WORKLOADS[r.workload].higher_is_better else base.value / r.value


def baseline_of(r: Result, results: list[Result]) -> Result | None:
    name = WORKLOADS[r.workload].baseline
    return next((b for b in results if b.title == r.title and b.subject == name), None)


@dataclass
class Verdict:
    group: str
    label: str
    backend: str | None
    why: str          # one sentence: how it compares, with the figures
    caveat: str = ""


def _scores(rows: dict[str, list[Result]], shareit: set[str]) -> dict[str, float]:
    """backend -> geometric mean of (its result / the best shareit result) over ``rows``."""
    rel: dict[str, list[float]] = defaultdict(list)
    need = 0
    for rs in rows.values():
        best = _best(rs, shareit)
        if best is None:
            continue
        need += 1
        for r in rs:
            if r.subject in shareit and ok(r):
                rel[r.subject].append(ratio(r, best) or 0.0)
    return {b: _geomean(xs) or 0.0 for b, xs in rel.items() if len(xs) == need and all(xs)}


def verdicts(results: list[Result], shareit: set[str], main_procs: int) -> list[Verdict]:
    by_group: dict[str, dict[str, list[Result]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if WORKLOADS[r.workload].scales and r.procs != main_procs:
            continue
        by_group[r.group][r.title].append(r)
    scores = {g: _scores(rows, shareit) for g, rows in by_group.items()}
    out = []
    for g, label in GROUPS.items():
        if g not in by_group:
            continue  # not measured in this run (--workloads)
        sc = scores.get(g, {})
        if not sc:
            out.append(Verdict(g, label, None, "no shareit backend ran all of its workloads"))
            continue
        ranked = sorted(sc, key=lambda b: -sc[b])
        win, rows = ranked[0], by_group[g]
        mine = [r for rs in rows.values() for r in rs if r.subject == win]
        firsts = sum(1 for r in mine if ratio(r, _best(rows[r.title], shareit)) == 1.0)
        vs_base = _geomean([x for r in mine if (x := ratio(r, baseline_of(r, results)))])
        why = f"fastest shareit backend on {firsts} of {len(mine)} workloads"
        if vs_base:
            why += f", {vs_base:.3g}× the baselines on average"
        if len(ranked) > 1:
            why += f"; next best: {ranked[1]}, {sc[win] / sc[ranked[1]]:.2g}× slower on average"
        out.append(Verdict(g, label, win, why, _caveat(win, g, by_group.get("writes", {}),
                                                         scores.get("writes", {}))))
    return out


def _best(rs: list[Result], shareit: set[str]) -> Result | None:
    ours = [r for r in rs if r.subject in shareit and ok(r)]
    if not ours:
        return None
    pick = max if WORKLOADS[ours[0].workload].higher_is_better else min
    return pick(ours, key=lambda r: r.value or 0.0)


def _geomean(xs: list[float]) -> float | None:
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def _caveat(backend: str, group: str, writes: dict[str, list[Result]],
            write_scores: dict[str, float]) -> str:
    if group == "writes" or write_scores.get(backend, 1.0) >= WRITES_SLOW:
        return ""  # (a backend the writes do not apply to, such as value, has no score)
    best = max(write_scores, key=lambda b: write_scores[b])
    sets = next((rs for t, rs in writes.items() if rs and rs[0].workload == "set"), [])
    mine = next((r for r in sets if r.subject == backend and ok(r)), None)
    theirs = next((r for r in sets if r.subject == best and ok(r)), None)
    detail = ""
    if mine and theirs and mine.value and theirs.value:
        detail = f" ({mine.title}: {mine.value:,.0f} ops/s against {best}'s {theirs.value:,.0f})"
    return (f"but its writes are {1 / write_scores[backend]:.0f}× slower than {best}'s{detail}: "
            "use it only for data that changes rarely")
