"""Everything ``shareit bench`` shows: progress bar, tables, recommendations, chart.

``rich`` (in the ``bench`` extra) draws the progress bar and the tables when
the output is a terminal; without it, or when the output is a file or a pipe,
plain text with columns sized to their contents is printed instead (stable,
greppable, pasteable), and progress is a line per tenth of the run.
matplotlib draws the chart when installed. Each is imported only when used.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from .runner import Cell, Result
from .verdict import Verdict, baseline_of, ok, ratio
from .workloads import WORKLOADS


def _rich() -> Any | None:
    try:
        import rich
    except ImportError:
        return None
    return rich


# --------------------------------------------------------------------------- progress


class Progress:
    """A progress bar on a terminal (rich's, or a plain one), a line per tenth otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty() or os.environ.get("SHAREIT_PROGRESS") == "1"
        self._bar: Any = None
        rich = _rich() if self.tty else None
        if rich is not None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.description}"), console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("", total=total)
            self._bar.start()

    def __call__(self, i: int, cell: Cell) -> None:
        label = f"{cell.title} · {cell.subject.name}"
        if self._bar is not None:
            self._bar.update(self._task, completed=i, description=label)
        elif self.tty:
            width = 30
            fill = width * i // max(self.total, 1)
            sys.stderr.write(f"\r  [{'#' * fill}{'.' * (width - fill)}] {i}/{self.total} "
                             f"{label[:50]:<50}")
            sys.stderr.flush()
        elif i * 10 // self.total != (i - 1) * 10 // self.total:
            print(f"  [{i}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.total)
            self._bar.stop()
        elif self.tty:
            sys.stderr.write("\n")
        print(f"  [{self.total}/{self.total}] done", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- cells


def number(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def cell(r: Result) -> str:
    """The result with its unit: "6.56M ops/s", "12 µs"."""
    if r.value is None:
        return "—"
    return f"{number(r.value)} {r.unit}"


def times(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.3g}×" if x < 1000 else f"{x:,.0f}×"


def remark(r: Result) -> str:
    if r.failed:
        return f"FAILED: {r.failed}"
    if r.skipped:
        return f"not run: {r.skipped}"
    if r.exact is False:
        return "LOST UPDATES (lossy): the total is wrong"
    return r.note


# --------------------------------------------------------------------------- tables


def render(title: str, headers: Sequence[str], sections: list[list[list[str]]],
           right: Sequence[int] = ()) -> str:
    """A table, rich's on a terminal when installed, else plain text sized to its cells."""
    rich = _rich() if sys.stdout.isatty() else None
    if rich is not None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, title_justify="left")
        for i, h in enumerate(headers):
            t.add_column(h, justify="right" if i in right else "left", overflow="fold")
        for sec in sections:
            for j, row in enumerate(sec):
                t.add_row(*row, end_section=j == len(sec) - 1)
        console = Console(record=True, width=max(100, Console().width))
        with console.capture() as cap:
            console.print(t)
        return str(cap.get()).rstrip()
    rows = [list(headers)] + [r for sec in sections for r in sec]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    out = [title, line(headers), line(["-" * w for w in widths])]
    for sec in sections:
        out += [line(r) for r in sec] + [""]
    return "\n".join(out).rstrip()


def results_table(results: list[Result], main_procs: int) -> str:
    sections = []
    for title in dict.fromkeys(r.title for r in results if _main(r, main_procs)):
        rows = [r for r in results if r.title == title]
        base_name = WORKLOADS[rows[0].workload].baseline
        sec = []
        for i, r in enumerate(rows):
            base = baseline_of(r, results)
            vs = "baseline" if r.subject == base_name else times(ratio(r, base))
            sec.append([title if i == 0 else "", r.subject, cell(r), vs, remark(r)])
        sections.append(sec)
    return render("Results: median of the repeats; '× base' = times better than the row's "
                  "baseline in this run (higher is better, whatever the unit)",
                  ["workload", "subject", "result", "× base", "notes"], sections, right=(2, 3))


def _main(r: Result, main_procs: int) -> bool:
    return not WORKLOADS[r.workload].scales or r.procs == main_procs


def scaling_table(results: list[Result]) -> str | None:
    scaled = [r for r in results if WORKLOADS[r.workload].scales]
    procs = sorted({r.procs for r in scaled})
    if len(procs) < 2:
        return None
    sections = []
    for key in dict.fromkeys(r.workload for r in scaled):
        w = WORKLOADS[key]
        sec: list[list[str]] = []
        for subject in dict.fromkeys(r.subject for r in scaled if r.workload == key):
            row = [w.title.replace(", {procs}", "") if not sec else "", subject]
            for q in procs:
                r = next((x for x in scaled if x.workload == key and x.subject == subject
                          and x.procs == q), None)
                if r is None:
                    row.append("")
                elif not ok(r):
                    row.append("failed" if r.failed else "not run" if r.skipped
                               else f"{number(r.value or 0)} LOSSY")
                else:
                    x = ratio(r, baseline_of(r, results))
                    row.append(cell(r) + (f" ({times(x)})" if x else ""))
            sec.append(row)
        sections.append(sec)
    return render(f"Scaling: all processes together, 1 to {procs[-1]} of them on {os.cpu_count()} "
                  f"cores; (N×) = times raw Manager().dict() with as many processes",
                  ["workload", "subject"] + [f"{q} proc{'s' if q > 1 else ''}" for q in procs],
                  sections, right=tuple(range(2, 2 + len(procs))))


def verdict_text(vs: list[Verdict], results: list[Result], main_procs: int,
                 shareit: set[str]) -> str:
    lines = ["Recommendation (shareit backends; correct results only):"]
    for v in vs:
        if v.backend is None:
            lines.append(f"  {v.label}: none ({v.why})")
            continue
        peer = _fastest_other(v, results, main_procs, shareit)
        lines.append(f"  {v.label}: use {v.backend}")
        lines += [f"      {x[0].upper()}{x[1:]}." for x in (v.why, v.caveat, peer) if x]
    return "\n".join(lines)


def _fastest_other(v: Verdict, results: list[Result], main_procs: int,
                   shareit: set[str]) -> str:
    """The non-shareit subject that beats the recommendation on most of the class's rows."""
    wins: dict[str, int] = {}
    rows = [r for r in results if r.group == v.group and _main(r, main_procs)]
    for title in dict.fromkeys(r.title for r in rows):
        mine = next((r for r in rows if r.title == title and r.subject == v.backend), None)
        if mine is None or not ok(mine):
            continue
        for r in rows:
            x = ratio(r, mine)
            other = r.subject != "dict" and r.subject not in shareit
            if r.title == title and x and x > 1 and other:
                wins[r.subject] = wins.get(r.subject, 0) + 1
    if not wins:
        return ""
    best = max(wins, key=lambda s: wins[s])
    n = len(dict.fromkeys(r.title for r in rows))
    return f"Not a shareit backend, {best} is faster on {wins[best]} of these {n} workloads"


# --------------------------------------------------------------------------- chart


def chart(results: list[Result], vs: list[Verdict], main_procs: int, path: str) -> str | None:
    """Bars of each subject's ratio to the row's baseline (log scale); the recommended backend's
    bars carry a star, lossy results are hatched and labelled, failures are marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = [r for r in results if _main(r, main_procs)]
    titles = list(dict.fromkeys(r.title for r in rows))
    names = list(dict.fromkeys(r.subject for r in rows))
    rec = {v.group: v.backend for v in vs}
    palette = plt.get_cmap("tab20")  # 20 distinct colours: one per subject, none repeated
    color = {n: palette(j % 20) for j, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(max(10, 0.9 * len(titles)) + 3, 6.5))
    width = 0.85 / max(len(names), 1)
    for i, title in enumerate(titles):
        here = [r for r in rows if r.title == title]
        for j, r in enumerate(here):  # only the subjects this row ran, centred on its tick
            x0 = i + (j - (len(here) - 1) / 2) * width
            base = baseline_of(r, results)
            if r.failed or r.skipped:
                ax.text(x0, 1, "×", ha="center", va="bottom", color=color[r.subject], fontsize=9)
                continue
            if r.value is None or base is None or base.value is None:
                continue
            raw = (r.value / base.value if WORKLOADS[r.workload].higher_is_better
                   else base.value / r.value)
            lossy = r.exact is False
            ax.bar(x0, raw, width, color=color[r.subject], hatch="///" if lossy else None,
                   edgecolor="black" if lossy else color[r.subject], alpha=0.5 if lossy else 1.0)
            if lossy:
                ax.text(x0, raw * 1.1, "lossy", rotation=90, ha="center", va="bottom", fontsize=7)
            if rec.get(r.group) == r.subject:
                ax.plot(x0, raw * 1.5, marker="*", color="black", markersize=9)
    handles: list[Any] = [Patch(color=color[n], label=n) for n in names]
    handles += [Line2D([], [], marker="*", color="black", linestyle="",
                       label="recommended for its class"),
                Patch(facecolor="white", edgecolor="black", hatch="///",
                      label="lossy: loses updates"),
                Line2D([], [], marker="$×$", color="grey", linestyle="", label="failed / not run")]
    ax.set_yscale("log")
    ax.axhline(1, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(titles)), titles, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("× the row's baseline (log; higher is better)")
    ax.set_title("shareit bench: each subject against the row's baseline, this run")
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
