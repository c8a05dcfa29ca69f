"""Render a ``shareit bench`` results file as the markdown tables in README.md.

    python benchmarks/table.py [benchmarks/results/bench.json]

One row per workload (sizes as they ran), one column per subject; each cell is
the median with its unit and, in brackets, the ratio to that row's baseline
(higher is better whatever the unit), measured in the same run.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from shareit.bench.present import number, times
from shareit.bench.runner import Result
from shareit.bench.verdict import baseline_of, ratio
from shareit.bench.workloads import WORKLOADS


def _cell(r: Result | None, results: list[Result]) -> str:
    if r is None:
        return ""
    if r.failed:
        return "failed"
    if r.skipped:
        return "not run"
    if r.value is None:
        return ""
    text = number(r.value)
    if r.exact is False:
        return text + " LOST UPDATES"
    if r.subject == WORKLOADS[r.workload].baseline:
        return text + " (base)"
    x = ratio(r, baseline_of(r, results))
    return text + (f" ({times(x)})" if x else "")


def main(path: str) -> None:
    data: dict[str, Any] = json.load(open(path))
    results = [Result(**r) for r in data["results"]]
    main_procs = data["params"]["procs"]
    rows = [r for r in results if not WORKLOADS[r.workload].scales or r.procs == main_procs]
    subjects = list(dict.fromkeys(r.subject for r in rows))
    by = {(r.title, r.subject): r for r in results}
    print("| workload | unit | " + " | ".join(subjects) + " |")
    print("|---" * (len(subjects) + 2) + "|")
    for title in dict.fromkeys(r.title for r in rows):
        unit = next(r.unit for r in rows if r.title == title)
        cells = [_cell(by.get((title, s)), results) for s in subjects]
        print(f"| {title} | {unit} | " + " | ".join(cells) + " |")
    scaled = [r for r in results if WORKLOADS[r.workload].scales]
    procs = sorted({r.procs for r in scaled})
    if len(procs) > 1:
        print("\n| scaling (ops/s, all processes) | subject | "
              + " | ".join(f"{q} proc" for q in procs) + " |")
        print("|---" * (len(procs) + 2) + "|")
        for key in dict.fromkeys(r.workload for r in scaled):
            for s in dict.fromkeys(r.subject for r in scaled if r.workload == key):
                cells = [_cell(next((r for r in scaled if r.workload == key and r.subject == s
                                     and r.procs == q), None), results) for q in procs]
                name = WORKLOADS[key].title.replace(", {procs}", "")
                print(f"| {name} | {s} | " + " | ".join(cells) + " |")
    m = data["machine"]
    print(f"\nMedian of {data['params']['repeats']}; (N×) = times the row's baseline in the same "
          f"run ((base)), higher is better. {m['cpus']} cores, Python {m['python']}, "
          f"{m['when']}. Command: `{data['command']}`.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/bench.json")
