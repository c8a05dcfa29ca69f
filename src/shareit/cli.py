"""``shareit``: bench | ls | gc | inspect. Also ``python -m shareit``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from . import _runtime
from ._records import Record
from .base import SharedMapping
from .config import did_you_mean, redact_url
from .errors import ShareitError


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import command

    return command.run(args)


# --------------------------------------------------------------------------- ls / gc / inspect


def _describe(name: str, record: Record | None) -> dict[str, Any]:
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


def _attach(name: str, record: Record) -> SharedMapping | None:
    from .api import open as open_

    try:
        return open_(name, backend=record["backend"], create=False, timeout=2.0)
    except (ShareitError, OSError):
        return None


def _records_warned() -> list[tuple[str, Record | None]]:
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


def _users(record: Record) -> list[Any]:
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
    from .bench.workloads import WORKLOADS

    b.add_argument("--workloads", help="comma-separated workloads (default: all): "
                   + ", ".join(WORKLOADS))
    b.add_argument("--procs", type=int, default=2, help="processes in multi-process workloads")
    b.add_argument("--repeats", type=int, help="repeats; medians are reported (default 5, "
                   "--quick 3)")
    b.add_argument("--quick", action="store_true",
                   help="smaller sizes, 1 and 2 processes: about 30 s on 2 cores")
    b.add_argument("--out", default="shareit-bench.json", help="where to write results (JSON)")
    b.add_argument("--no-peers", action="store_true",
                   help="leave out the peer libraries (UltraDict, shared-memory-dict, lmdb, "
                   "diskcache)")
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
        return int(args.fn(args))
    except ShareitError as exc:  # e.g. a runtime dir that is not safely ours: say so, no traceback
        print(f"shareit {args.cmd}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
