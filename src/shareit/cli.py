"""``shareit``: bench | ls | gc | inspect. Also ``python -m shareit``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

from . import _runtime
from .base import SharedMapping
from .config import did_you_mean, redact_url
from .errors import ShareitError

# --------------------------------------------------------------------------- bench


def _progress(done: int, total: int, label: str) -> None:
    if not sys.stderr.isatty() and os.environ.get("SHAREIT_PROGRESS") != "1":
        if done == total or done % 5 == 0:
            print(f"  [{done}/{total}] {label}", file=sys.stderr, flush=True)
        return
    width = 30
    fill = int(width * done / max(total, 1))
    sys.stderr.write(f"\r  [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {label:<40.40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def cmd_bench(args: argparse.Namespace) -> int:
    from . import _bench

    info = registry_info()
    all_backends = sorted(info)
    wanted = args.backends.split(",") if args.backends else all_backends
    for b in wanted:
        if b not in info:
            print(f"shareit bench: unknown backend {b!r}.{did_you_mean(b, all_backends)} "
                  f"Valid: {', '.join(all_backends)}", file=sys.stderr)
            return 2
    workloads = args.workloads.split(",") if args.workloads else list(_bench.WORKLOADS)
    for w in workloads:
        if w not in _bench.WORKLOADS:
            print(f"shareit bench: unknown workload {w!r}.{did_you_mean(w, _bench.WORKLOADS)} "
                  f"Valid: {', '.join(_bench.WORKLOADS)}", file=sys.stderr)
            return 2
    skipped = {b: info[b]["reason"] for b in wanted if not info[b]["available"]}
    for b in wanted:  # a server backend with no server is skipped with the reason, not run
        if b in skipped:
            continue
        try:
            from .api import open as open_

            opts = {"url": args.url} if args.url and b == "redis" else {}
            open_(backend=b, timeout=2.0, **_bench.ShareitSubject.extra_options(b), **opts).close()
        except Exception as exc:
            skipped[b] = f"{type(exc).__name__}: {exc}"
    for b, why in skipped.items():
        print(f"skipping backend {b!r}: {why}", file=sys.stderr)
    usable = [b for b in wanted if b not in skipped]
    p = _bench.Params(procs=args.procs, repeats=args.repeats)
    if args.quick:
        p.repeats, p.min_time, p.incr_per_proc = min(args.repeats, 3), 0.05, 2_000
        p.bulk_keys, p.propagation_changes = 20_000, 300
    subjects = _bench.subjects(usable, peers=not args.no_peers, url=args.url)
    plan = [(w, s) for w in workloads for s in subjects if _bench.WORKLOADS[w][1](s)]
    print(f"shareit bench: {len(plan)} runs on {os.cpu_count()} cores, {p.procs} processes, "
          f"median of {p.repeats}{' (quick)' if args.quick else ''}", file=sys.stderr)
    results = []
    for i, (w, s) in enumerate(plan):
        _progress(i, len(plan), f"{w} · {s.name}")
        try:
            if isinstance(s, _bench.PeerProxy):
                results.append(_bench.run_peer(s, w, p))
            else:
                results.append(_bench.WORKLOADS[w][0](s, p))
        except Exception as exc:  # a failing subject is reported, the run goes on
            results.append(_bench.Result(w, s.name, note=f"failed: {type(exc).__name__}: {exc}"))
    _progress(len(plan), len(plan), "done")
    report = _report(results, workloads, subjects)
    print(report)
    payload = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M:%S")},
        "params": vars(p), "skipped": skipped, "command": " ".join(["shareit"] + sys.argv[1:]),
        "results": [vars(r) for r in results],
    }
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"\nresults written to {args.out}")
    png = _chart(results, workloads, os.path.splitext(args.out)[0] + ".png")
    if png:
        print(f"chart written to {png}")
    return 0


def registry_info() -> dict:
    from .api import backends

    return backends()


def _report(results: list, workloads: list[str], subjects: list) -> str:
    kinds = {s.name: s.kind for s in subjects}
    by = {(r.workload, r.subject): r for r in results}
    lines = [f"{'workload':<16} {'subject':<26} {'ops/s':>9} {'x Manager':>10} {'x dict':>8}  exact"]
    winners = []
    for w in dict.fromkeys(r.workload for r in results):
        rows = [r for r in results if r.workload == w]
        base_m = by.get((w, "Manager().dict()"))
        base_d = by.get((w, "dict"))
        for r in rows:
            vm = (f"{r.ops_per_s / base_m.ops_per_s:.2f}" if r.ops_per_s and base_m and
                  base_m.ops_per_s else "-")
            vd = (f"{r.ops_per_s / base_d.ops_per_s:.3f}" if r.ops_per_s and base_d and
                  base_d.ops_per_s else "-")
            exact = {None: "", True: "yes", False: "NO (lost updates)"}[r.exact]
            rate = _fmt_rate(r.ops_per_s) if r.ops_per_s else r.note[:40]
            lines.append(f"{w:<16} {r.subject:<26} {rate:>9} {vm:>10} {vd:>8}  {exact}")
        ok = [r for r in rows if r.ops_per_s and r.exact is not False and r.subject != "dict"]
        ours = [r for r in ok if kinds.get(r.subject) == "shareit"]
        if ok:
            best = max(ok, key=lambda r: r.ops_per_s)
            rec = max(ours, key=lambda r: r.ops_per_s).subject if ours else "-"
            winners.append(f"  {w:<16} fastest shared: {best.subject:<24} recommended backend: {rec}")
        lines.append("")
    lines.append("winners (correct results only; plain dict is the single-process floor):")
    lines.extend(winners)
    return "\n".join(lines)


def _chart(results: list, workloads: list[str], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ws = list(dict.fromkeys(r.workload for r in results))
    names = list(dict.fromkeys(r.subject for r in results))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(ws)), 5))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs, ys = [], []
        for i, w in enumerate(ws):
            r = next((r for r in results if r.workload == w and r.subject == name), None)
            if r and r.ops_per_s and r.exact is not False:
                xs.append(i + j * width)
                ys.append(r.ops_per_s)
        ax.bar(xs, ys, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ws))], ws, rotation=20)
    ax.set_ylabel("ops/s (log scale; higher is better)")
    ax.set_title("shareit bench: median throughput per workload")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- ls / gc / inspect


def _describe(name: str, record: dict | None) -> dict[str, Any]:
    from . import _lifetime

    path = _runtime.meta_path(name)
    if record is None:
        return {"name": name, "backend": "?", "users": 0, "persist": False,
                "created": None, "keys": None, "stale": _runtime.record_is_stale(None, path)}
    return {
        "name": name,
        "backend": record["backend"],
        "users": len(_lifetime.live_users(record)),
        "creator_pid": record["owner_pid"],
        "persist": record["persist"],
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["created"])),
        "stale": _runtime.record_is_stale(record, path),
    }


def _attach(name: str, record: dict) -> SharedMapping | None:
    from .api import open as open_

    try:
        return open_(name, backend=record["backend"], create=False, timeout=2.0)
    except (ShareitError, OSError):
        return None


def _records_warned() -> list[tuple[str, dict | None]]:
    """This user's records; a malformed one is skipped with a one-line warning."""
    out = []
    for name, record in _runtime.list_records():
        if isinstance(record, Exception):
            print(f"shareit: skipping {name}: {record}", file=sys.stderr)
            continue
        out.append((name, record))
    return out


def _others_note() -> str:
    n = _runtime.foreign_dirs()
    return f"({n} other user(s) also use shareit here; their mappings are not shown)" if n else ""


def cmd_ls(args: argparse.Namespace) -> int:
    rows = []
    for name, record in _records_warned():
        row = _describe(name, record)
        if record is not None and not row["stale"]:
            m = _attach(name, record)
            if m is not None:
                row["keys"] = len(m)
                m.close()
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<28} {'backend':<9} {'users':>5} {'persist':<8} {'keys':>8}  created")
    for r in rows:
        keys = "-" if r.get("keys") is None else r["keys"]
        print(f"{r['name']:<28} {r['backend']:<9} {r['users']:>5} "
              f"{'yes' if r['persist'] else 'no':<8} {keys:>8}  {r['created'] or '-'}")
    if not rows:
        print(f"(no shared mappings in {_runtime.runtime_dir()})")
    note = _others_note()
    if note:
        print(note)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from .api import remove_local

    removed = 0
    for name, record in _runtime.list_records():
        if isinstance(record, Exception):
            why = f"its record is malformed ({record})"
        elif _runtime.record_is_stale(record, _runtime.meta_path(name)):
            why = "no process uses it any more" if record else "its creator died before finishing"
        elif args.persistent and record is not None and record["persist"] and not _users(record):
            why = "persistent, and no process uses it"
        else:
            continue
        if not args.dry_run:
            try:
                done = remove_local(name, timeout=1.0, unused_only=True, persistent=args.persistent)
            except ShareitError as exc:  # (busy: being opened or closed right now)
                print(f"skipped {name}: {exc}")
                continue
            if done is None:
                continue  # somebody started using it meanwhile
        removed += 1
        print(f"{'would remove' if args.dry_run else 'removed'} {name}: {why}")
    from .api import remove_orphans

    for f in remove_orphans(dry_run=args.dry_run):
        removed += 1
        print(f"{'would remove' if args.dry_run else 'removed'} {f}: no mapping reaches it")
    if not removed:
        print("nothing to remove: every mapping is in use, or persistent"
              + ("" if args.persistent else " (--persistent removes unused persistent ones)"))
    note = _others_note()
    if note:
        print(note)
    return 0


def _users(record: dict) -> list:
    from . import _lifetime

    return _lifetime.live_users(record)


def cmd_rm(args: argparse.Namespace) -> int:
    from .api import remove_local

    status = 0
    for name in args.names:
        try:
            _runtime.check_name(name)
            done = remove_local(name)
        except ShareitError as exc:
            print(f"shareit rm: {exc}", file=sys.stderr)
            status = 1
            continue
        if done is None:
            print(f"shareit rm: no mapping named {name!r}."
                  f"{did_you_mean(name, _runtime.list_names())}", file=sys.stderr)
            status = 1
        else:
            print(f"removed {name}")
    return status


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        _runtime.check_name(args.name)
        record = _runtime.read_meta(args.name)
    except ShareitError as exc:
        print(f"shareit inspect: {exc}", file=sys.stderr)
        return 1
    if record is None:
        names = _runtime.list_names()
        print(f"shareit inspect: no mapping named {args.name!r}.{did_you_mean(args.name, names)}",
              file=sys.stderr)
        return 1
    row = _describe(args.name, record)
    fields = {k: v for k, v in record["fields"].items() if k != "authkey"}
    row["record"] = {**{k: v for k, v in record.items() if k != "fields"}, **fields}
    m = None if row["stale"] else _attach(args.name, record)
    if m is not None:
        row["keys"] = len(m)
        row["config"] = {k: redact_url(m.config[k]) if k == "url" and m.config[k] else m.config[k]
                         for k in m.config}
        if hasattr(m, "info"):
            row["backend_info"] = m.info()
        m.close()
    print(json.dumps(row, indent=1, default=repr))
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="shareit",
        description="One dict-like mapping shared by several processes: compare the ways "
                    "to share it on this machine, and manage your shared mappings.")
    parser.add_argument("--version", action="version", version=f"shareit {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    b = sub.add_parser("bench", help="compare backends and baselines on real workloads")
    b.add_argument("--backends", help="comma-separated backend names (default: all)")
    b.add_argument("--workloads", help="comma-separated workloads (default: all)")
    b.add_argument("--procs", type=int, default=2, help="processes in multi-process workloads")
    b.add_argument("--repeats", type=int, default=5, help="repeats; medians are reported")
    b.add_argument("--quick", action="store_true", help="small sizes: under a minute on 2 cores")
    b.add_argument("--out", default="shareit-bench.json", help="where to write results (JSON)")
    b.add_argument("--no-peers", action="store_true", help="leave out UltraDict and shared-memory-dict")
    b.add_argument("--url", help="server URL for the redis backend (default: its url option)")
    b.set_defaults(fn=cmd_bench)
    ls = sub.add_parser("ls", help="your shared mappings on this machine, and their users")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_ls)
    gc = sub.add_parser("gc", help="remove mappings no live process uses (not persistent ones)")
    gc.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    gc.add_argument("--persistent", action="store_true",
                    help="also remove persistent mappings that no live process uses")
    gc.set_defaults(fn=cmd_gc)
    rm = sub.add_parser("rm", help="remove mappings for every process, persistent ones too")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(fn=cmd_rm)
    ins = sub.add_parser("inspect", help="one mapping in detail, including its lock holder")
    ins.add_argument("name")
    ins.set_defaults(fn=cmd_inspect)
    args = parser.parse_args(argv)
    if args.cmd is None:  # `shareit` alone: say what it can do
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except ShareitError as exc:  # e.g. a runtime dir that is not safely ours: say so, no traceback
        print(f"shareit {args.cmd}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
