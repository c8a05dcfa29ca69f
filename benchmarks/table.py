"""Render benchmarks/results/bench.json as the markdown table in README.md.

    python benchmarks/table.py [benchmarks/results/bench.json]
"""

from __future__ import annotations

import json
import sys

BASELINES = ("dict", "Manager().dict()", "Manager().dict() no lock", "Value+get_lock")


def fmt(x: float | None) -> str:
    if not x:
        return "-"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def main(path: str) -> None:
    data = json.load(open(path))
    rows = data["results"]
    subjects = list(dict.fromkeys(r["subject"] for r in rows
                                  if r["subject"] != "Manager().dict() no lock"))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    by = {(r["workload"], r["subject"]): r for r in rows}
    print("| workload | " + " | ".join(subjects) + " |")
    print("|---" * (len(subjects) + 1) + "|")
    for w in workloads:
        cells = []
        base = by.get((w, "Manager().dict()"), {}).get("ops_per_s")
        for s in subjects:
            r = by.get((w, s))
            if not r or not r.get("ops_per_s"):
                cells.append("")
                continue
            cell = fmt(r["ops_per_s"])
            if base and s not in BASELINES:
                cell += f" ({r['ops_per_s'] / base:.3g}×)"
            if r.get("exact") is False:
                cell += " LOST UPDATES"
            cells.append(cell)
        print(f"| {w} | " + " | ".join(cells) + " |")
    m = data["machine"]
    print(f"\nops/s, median of {data['params']['repeats']}; (N×) = times raw `Manager().dict()` "
          f"in the same run. {m['cpus']} cores, Python {m['python']}, {m['platform']}, "
          f"{m['when']}. Command: `{data['command']}`.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/bench.json")
