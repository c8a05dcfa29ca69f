"""The workloads of ``shareit bench``, declared as data (:data:`WORKLOADS`).

Each :class:`Workload` names what it measures for a user ("set, new key"),
its unit, the class of use it informs (reads, writes, counters, bulk,
latency), the baseline its ratios are taken against, and which subjects it
applies to by capability. Titles are built from the sizes that actually run,
so a ``--quick`` row never claims a size it did not use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import drivers as d
from .drivers import Measured
from .subjects import Cap, Subject

REFERENCE = "Manager().dict()"


@dataclass
class Params:
    """Sizes and repeats of one run; ``make(quick=True)`` is the small, fast variant."""

    quick: bool = False
    procs: int = 2
    repeats: int = 5
    min_time: float = 0.1
    bulk_keys: int = 100_000
    spread_keys: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    scale_procs: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    propagation_changes: int = 1000

    @classmethod
    def make(cls, quick: bool, procs: int = 2, repeats: int | None = None) -> Params:
        if not quick:
            return cls(procs=procs, repeats=repeats or 5,
                       scale_procs=sorted({1, 2, 4, 8, procs}))
        return cls(quick=True, procs=procs, repeats=min(repeats or 3, 3), min_time=0.025,
                   bulk_keys=20_000, spread_keys=[100_000], scale_procs=[procs],
                   propagation_changes=200)


Fn = Callable[[Subject, Params, int, int], Measured]


@dataclass(frozen=True)
class Workload:
    key: str            # what --workloads takes
    title: str          # what the user reads; {n} and {procs} are filled in from what ran
    unit: str           # "ops/s", "keys/s", "values/s" (higher is better) or "µs", "ms" (lower)
    group: str          # the class of use it informs (see verdict.GROUPS)
    fn: Fn
    needs: frozenset[Cap] = frozenset()
    any_of: frozenset[Cap] = frozenset()   # at least one of these, if given
    shows_lossy: bool = False              # run lossy subjects too, to show what they lose
    sizes: str = ""                        # "bulk" | "spread" | "" : which Params size is n
    scales: bool = False                   # also run with each of Params.scale_procs processes
    baseline: str = REFERENCE

    @property
    def higher_is_better(self) -> bool:
        return self.unit.endswith("/s")

    def applies(self, s: Subject) -> bool:
        if Cap.LOSSY in s.caps and not self.shows_lossy:
            return False
        return self.needs <= s.caps and (not self.any_of or bool(self.any_of & s.caps))

    def variants(self, p: Params) -> list[tuple[int, int]]:
        """(n, procs) of each row this workload yields in run ``p``."""
        n = {"bulk": [p.bulk_keys], "spread": p.spread_keys}.get(self.sizes, [0])
        procs = p.scale_procs if self.scales else [p.procs]
        return [(k, q) for k in n for q in procs]

    def title_for(self, n: int, procs: int) -> str:
        return self.title.format(n=count(n), procs=f"{procs} process{'es' if procs > 1 else ''}")


def count(n: int) -> str:
    """100000 -> "100k", 1000000 -> "1M", 20000 -> "20k"."""
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return f"{n:,}"


ANY, SHARED = frozenset({Cap.ANY_VALUES}), frozenset({Cap.ANY_VALUES, Cap.SHARED})
W = Workload
WORKLOADS: dict[str, Workload] = {w.key: w for w in [
    W("get", "get, hot key", "ops/s", "reads", d.w_get, ANY),
    W("get-dict", "get, small dict value", "ops/s", "reads", d.w_get_dict, ANY),
    W("get-spread", "get, cycling over {n} keys", "ops/s", "reads", d.w_get_spread, ANY,
      sizes="spread"),
    W("set", "set, existing key, int", "ops/s", "writes", d.w_set, ANY),
    W("set-str", "set, existing key, str", "ops/s", "writes", d.w_set_str, ANY),
    W("set-new", "set, new key", "ops/s", "writes", d.w_set_new, ANY),
    W("del", "del", "ops/s", "writes", d.w_del, ANY),
    W("mixed", "90% get / 10% set, {procs}", "ops/s", "writes", d.w_mixed, SHARED, scales=True),
    W("edit", "edit a nested value", "ops/s", "writes", d.w_edit, ANY),
    W("read-counter", "read a counter", "ops/s", "counters", d.w_read_counter,
      any_of=frozenset({Cap.SHAREIT, Cap.NUMERIC_ONLY}), baseline="Value+get_lock"),
    W("incr", "incr, one key, {procs}", "ops/s", "counters", d.w_incr, frozenset({Cap.SHARED}),
      shows_lossy=True, scales=True),
    W("incr-own", "incr, a key each, {procs}", "ops/s", "counters", d.w_incr_own,
      frozenset({Cap.SHARED}), shows_lossy=True),
    W("snapshot", "snapshot of {n} keys, other process", "keys/s", "bulk", d.w_snapshot, SHARED,
      sizes="bulk"),
    W("build", "build {n} keys, one update()", "keys/s", "bulk", d.w_build, SHARED, sizes="bulk"),
    W("numeric", "{n} floats into numpy, other process", "values/s", "bulk", d.w_numeric,
      any_of=frozenset({Cap.NUMPY_BULK, Cap.REFERENCE}), sizes="bulk"),
    W("propagation", "set, until another process sees it (p50)", "µs", "latency",
      d.w_propagation, SHARED),
    W("attach", "attach to {n} keys by name, read one", "ms", "latency", d.w_attach,
      frozenset({Cap.ATTACH_BY_NAME}), sizes="bulk", baseline="manager"),
]}
