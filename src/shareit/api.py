"""The functions users call: :func:`open`, :func:`destroy`, :func:`backends`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from . import _runtime, config, registry
from .base import SharedMapping
from .errors import RecordError, ShareitError, UnknownBackendError

__all__ = ["open", "destroy", "backends", "remove_local", "remove_orphans"]

_builtin_open = open


def open(
    name: str | None = None,
    *,
    backend: str | None = None,
    create: bool = True,
    **options: Any,
) -> SharedMapping:
    """Create or attach to a shared mapping.

    Parameters
    ----------
    name
        Mappings of the same name share data. ``None`` makes an anonymous
        mapping, shared by passing it to child processes.
    backend
        How it is shared: ``"manager"``, ... (see :func:`backends`). When not
        given, it comes from ``SHAREIT_BACKEND``, the configuration file, the
        backend an existing local mapping of that name has, or the default.
    create
        With ``False``, only attach: :class:`~shareit.NotFoundError` if no
        live mapping of that name exists.
    **options
        ``value_type``, ``keys``, ``capacity``, ``timeout``, ``serializer``,
        ``persist``, and backend-specific ones such as ``url``. See
        :mod:`shareit.config` for how they combine with the environment and
        the configuration file.

    Returns
    -------
    SharedMapping
        A ``MutableMapping``; ``d.config`` shows the resolved options.
    """
    if name is not None:
        _runtime.check_name(name)
    kwargs = dict(options)
    if backend is not None:
        kwargs["backend"] = backend
    below = config.layers(name)  # the file is read here, once per open
    chosen, where = config.pick_backend_where(name, kwargs, below)
    if where == "default" and name is not None:
        # Nothing chose a backend: attach to the one this name exists with, if any.
        record = _runtime.read_meta_quiet(name)
        if record is not None and record["backend"] in registry.names():
            chosen = record["backend"]
            kwargs["backend"] = chosen
    try:
        cls = registry.load(chosen)
    except UnknownBackendError as exc:
        if where in ("keyword arguments", "default"):
            raise
        raise UnknownBackendError(f"{exc} (the name came from {where})") from None
    cfg = config.resolve(name, kwargs, extra=cls.options, below=below)
    cls.check_config(cfg)
    return cls._open(name, cfg, create=create)


def destroy(name: str, **options: Any) -> None:
    """Remove the named mapping for every process that uses it.

    A local mapping (this machine's runtime dir has its record) is removed from
    its record alone, even a persistent one and even if its server died; pass
    ``backend=`` and its options (``url=``) for one that lives elsewhere (redis).
    """
    _runtime.check_name(name)
    if not options or set(options) <= {"timeout"}:
        if remove_local(name, timeout=options.get("timeout", 10.0)) is not None:
            return
    open(name, create=False, **options).destroy()


def remove_local(name: str, timeout: float = 10.0, unused_only: bool = False,
                 persistent: bool = True) -> Mapping[str, Any] | Exception | None:
    """Remove the local mapping ``name`` (record, segments, server) under its lock.

    With ``unused_only``, only if no user of it is alive, and a persistent one only
    with ``persistent``. Returns the record removed (the RecordError of a malformed
    one, which is removed too), or None if nothing was removed.
    """
    from . import _lifetime

    with _lifetime.name_lock(name, timeout) as lock:
        try:
            record = _runtime.read_meta(name)
        except RecordError as exc:  # ours (private dir, owner checked), but unusable
            _runtime.remove_meta(name)
            lock["remove"] = True
            return exc
        if record is None:
            if os.path.lexists(_runtime.meta_path(name)):  # a creator died before publishing
                _runtime.remove_meta(name)
                lock["remove"] = True
            return None
        if unused_only and (_lifetime.live_users(record) or (_runtime.in_use(record) and not (
                record["persist"] and persistent))):
            return None
        try:
            registry.load(record["backend"])._cleanup_record(name, record)
        except ShareitError:
            pass
        _runtime.remove_meta(name)
        lock["remove"] = True
        return record


def remove_orphans(dry_run: bool = False) -> list[str]:
    """Remove files of ours that no mapping can reach any more; return their names.

    Segments, sockets and words files of a named mapping whose record is gone (a
    crash between removing the record and the rest), those of an anonymous mapping
    whose creator is dead, a record's temporary file left by a killed writer, and a
    long-name server's socket that nothing listens on.
    """
    import re
    import socket as _socket

    from . import _lifetime

    d = _runtime.runtime_dir()
    out = []
    for f in sorted(os.listdir(d)):
        stem, _, kind = f.partition(_runtime.SEP)
        path = os.path.join(d, f)
        tmp = re.fullmatch(r"meta\.tmp-([0-9]+)-[0-9]+", kind)
        anon = re.fullmatch(r"\+anon-([0-9]+)-[0-9a-f]+", stem)
        if tmp:
            orphan = not _runtime.pid_alive(int(tmp.group(1)))
        elif anon:
            orphan = not _runtime.pid_alive(int(anon.group(1)))
        elif stem.startswith("#") and kind == "sock":
            orphan = not _listening(_socket, path)
        elif _runtime._NAME_RE.fullmatch(stem) and kind == "lock":
            if os.path.lexists(_runtime.meta_path(stem)):
                continue
            if dry_run:
                out.append(f)
                continue
            try:  # a free lock of a name with no record: taking it removes it
                with _lifetime.name_lock(stem, 0.0, create=False):
                    pass
            except (ShareitError, FileNotFoundError):
                continue
            out.append(f)
            continue
        elif _runtime._NAME_RE.fullmatch(stem) and kind not in ("meta", "lock"):
            if os.path.lexists(_runtime.meta_path(stem)):
                continue
            try:  # nobody is creating it right now (creation holds the name's lock)
                with _lifetime.name_lock(stem, 0.2):
                    orphan = not os.path.lexists(_runtime.meta_path(stem))
            except ShareitError:
                continue
        else:
            continue
        if orphan and os.path.lexists(path):
            if not dry_run:
                os.unlink(path)
            out.append(f)
    return out


def _listening(socket_mod: Any, path: str) -> bool:
    s = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def backends() -> dict[str, dict[str, Any]]:
    """Every registered backend with its capabilities, or why it is unavailable.

    Returns
    -------
    dict
        ``{name: {"available": bool, "reason": str, <capability>: value, ...}}``
    """
    out: dict[str, dict[str, Any]] = {}
    for name in registry.names():
        try:
            cls = registry.load(name)
        except ShareitError as exc:
            out[name] = {"available": False, "reason": str(exc)}
            continue
        caps = dataclasses.asdict(cls.capabilities)
        caps["value_kinds"] = sorted(caps["value_kinds"])
        caps["start_methods"] = sorted(caps["start_methods"])
        if caps["key_types"] is not None:
            caps["key_types"] = [t.__name__ for t in caps["key_types"]]
        out[name] = {"available": True, "reason": "", "doc": _first_line(cls.__doc__), **caps}
    return out


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""
