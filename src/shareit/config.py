"""The option vocabulary, its resolution from all sources, and validation.

Resolution, highest first: keyword arguments to :func:`shareit.open`; the
environment (``SHAREIT_BACKEND``; ``SHAREIT_CONFIG`` names the file); the TOML
file's ``[mappings.NAME]`` table, then its ``[defaults]`` table; built-in
defaults. The file is ``SHAREIT_CONFIG``, else ``./shareit.toml``, else
``[tool.shareit]`` in ``./pyproject.toml``.

The result is a frozen :class:`Config`; nothing the caller passed is mutated.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote_plus

from . import _codec
from .errors import ConfigError

__all__ = [
    "Config", "OPTIONS", "DEFAULT_BACKEND", "resolve", "layers", "did_you_mean", "redact_url",
]

#: The backend used when nothing chooses one.
DEFAULT_BACKEND = "shm"


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), sorted(map(str, choices)), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


# --- validators: each returns the normalised value or raises ConfigError ---------------


def _positive_number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ConfigError(f"option {name!r} must be a number of seconds > 0, got {v!r}")
    return float(v)


def _opt_positive_int(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"option {name!r} must be an int >= 1 (a sizing hint), got {v!r}")
    return v


def _boolean(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"option {name!r} must be true or false, got {v!r}")
    return v


def _opt_str(name: str, v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise ConfigError(f"option {name!r} must be a string, got {type(v).__name__} {v!r}")
    return v


def _url(name: str, v: Any) -> str | None:
    # Never echo the value: a URL may carry a password (bytes included).
    if v is not None and not isinstance(v, str):
        raise ConfigError(
            f"option 'url' must be a string such as 'redis://host:6379/0', got {type(v).__name__}"
        )
    return v


def _backend(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"option 'backend' must be a backend name (a string), got {v!r}")
    return v


def _value_type(name: str, v: Any) -> str | None:
    try:
        return _codec.value_type(v)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _keys(name: str, v: Any) -> tuple[Any, ...] | None:
    if v is None:
        return None
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__") or isinstance(v, Mapping):
        raise ConfigError(
            f"option 'keys' must be a list of keys, e.g. keys=['ok', 'error'], got {v!r}"
        )
    out: dict[Any, None] = {}
    for k in v:
        if isinstance(k, list) or not isinstance(k, Hashable):
            raise ConfigError(f"option 'keys' holds an unhashable key {k!r}")
        out[k] = None
    if not out:
        raise ConfigError("option 'keys' must declare at least one key (or be left unset)")
    return tuple(out)


def _serializer(name: str, v: Any) -> str:
    if v not in ("pickle", "json"):
        raise ConfigError(f"option 'serializer' must be 'pickle' or 'json', got {v!r}")
    return str(v)


#: name -> (validator, default, one-line description). The union over all backends:
#: a name outside it is a ConfigError, a name the chosen backend does not use is ignored.
OPTIONS: dict[str, tuple[Callable[[str, Any], Any], Any, str]] = {
    "backend": (_backend, DEFAULT_BACKEND, "how the mapping is shared"),
    "value_type": (_value_type, None, "declared value type, e.g. 'int64', 'float64'"),
    "keys": (_keys, None, "declared, fixed set of keys"),
    "capacity": (_opt_positive_int, None, "sizing hint: expected number of keys"),
    "timeout": (_positive_number, 10.0, "seconds any blocking wait may take"),
    "serializer": (_serializer, "pickle",
                   "value encoding where a backend encodes ('pickle'/'json')"),
    "persist": (_boolean, False, "keep the shared object after its owner exits"),
    "url": (_url, None, "server URL (redis)"),
    "prefix": (_opt_str, None, "server-side key prefix (redis)"),
}


class Config:
    """The resolved, frozen options of one mapping.

    Read an option by attribute (``cfg.timeout``, ``cfg.keys``) or by item
    (``cfg["timeout"]``); ``as_dict()`` gives a plain copy and ``sources``
    says where each value came from. (Not a ``Mapping``: its ``keys()``
    method would hide the ``keys`` option.)
    """

    __slots__ = ("_values", "_sources")

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str] | None = None):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_sources", dict(sources or {}))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"no option {key!r}; options: {sorted(self._values)}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Config is frozen; pass options to shareit.open() instead")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Config, (self._values, self._sources))

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    @property
    def sources(self) -> dict[str, str]:
        return dict(self._sources)

    def __repr__(self) -> str:
        # The url may hold a password: a repr ends up in logs and tracebacks.
        inner = ", ".join(
            f"{k}={redact_url(v)!r}" if k == "url" and v is not None else f"{k}={v!r}"
            for k, v in self._values.items()
        )
        return f"Config({inner})"


# --- secrets in URLs ---------------------------------------------------------------

#: A query parameter ``NAME=VALUE``, still percent-encoded. The value runs to the next
#: ``&`` only: redis-py splits on ``&`` alone, so a ``;`` may be part of a password.
_QUERY_PARAM = re.compile(r"[?&;]([^=&;#]*)=([^&]*)")


def redact_url(url: Any) -> str:
    """``url`` with every secret replaced by ``***``, for messages, reprs and logs.

    Hides the value of any query parameter whose name contains ``pass``
    (``?password=``, ``&ssl_password=``; up to the next ``&``) and the
    userinfo (``user:password@``: everything up to the *last* ``@`` outside
    those values, since a password may itself contain ``@``, ``/`` or ``?``).
    Errs on the side of hiding too much.

    Parameters
    ----------
    url : str or bytes
        A server URL such as ``redis://:pw@host:6379/0`` or
        ``unix://:pw@/run/redis.sock?db=1``. Bytes are decoded (invalid UTF-8
        replaced) first; any other type shows as ``<TYPE>`` only.

    Returns
    -------
    str
        The URL, safe to show.
    """
    if isinstance(url, (bytes, bytearray)):
        url = bytes(url).decode("utf-8", "replace")
    elif not isinstance(url, str):
        return f"<{type(url).__name__}>"
    hide = [False] * len(url)
    for m in _QUERY_PARAM.finditer(url):
        if "pass" in unquote_plus(m.group(1)).lower():
            hide[m.start(2):m.end(2)] = [True] * (m.end(2) - m.start(2))
    scheme_end = url.find("://")
    start = 0 if scheme_end < 0 else scheme_end + 3
    # The userinfo ends at the last "@" that is not part of a password already hidden.
    at = next((i for i in range(len(url) - 1, start - 1, -1) if url[i] == "@" and not hide[i]), -1)
    if at > start:
        hide[start:at] = [True] * (at - start)
    out, i = [], 0
    while i < len(url):  # each run of hidden characters becomes one "***"
        if hide[i]:
            while i < len(url) and hide[i]:
                i += 1
            out.append("***")
        else:
            out.append(url[i])
            i += 1
    return "".join(out)


def validate_option(key: str, value: Any, where: str,
                    extra: Mapping[str, Any] | None = None) -> Any:
    table = {**OPTIONS, **(extra or {})}
    if key not in table:
        raise ConfigError(
            f"unknown option {key!r} (from {where}).{did_you_mean(key, table)} "
            f"Valid options: {', '.join(sorted(table))}"
        )
    try:
        return table[key][0](key, value)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from {where})") from None


# --- the configuration file ----------------------------------------------------------


def _load_toml(path: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]
    try:
        with open(path, "rb") as f:
            out: dict[str, Any] = tomllib.load(f)
            return out
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path!r} is not valid TOML: {exc}") from None


def find_file() -> tuple[str, dict[str, Any]] | None:
    """The configuration file in force and its shareit table, or None."""
    env = os.environ.get("SHAREIT_CONFIG")
    if env:
        return env, _load_toml(env)
    if os.path.isfile("shareit.toml"):
        return os.path.abspath("shareit.toml"), _load_toml("shareit.toml")
    if os.path.isfile("pyproject.toml"):
        table = _load_toml("pyproject.toml").get("tool", {}).get("shareit")
        if table is not None:
            return os.path.abspath("pyproject.toml") + " [tool.shareit]", table
    return None


#: One layer of options and where it came from ("keyword arguments", a file's table, ...).
Layer = tuple[str, Mapping[str, Any]]


def _file_layers(name: str | None) -> list[Layer]:
    found = find_file()
    if found is None:
        return []
    path, table = found
    unknown = set(table) - {"defaults", "mappings"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown table(s) {sorted(unknown)}; a shareit configuration has "
            f"[defaults] and [mappings.NAME] tables"
        )
    layers: list[Layer] = [(f"{path} [defaults]", table.get("defaults", {}))]
    mappings = table.get("mappings", {})
    if name is not None and name in mappings:
        layers.append((f"{path} [mappings.{name}]", mappings[name]))
    for where, layer in layers:
        if not isinstance(layer, Mapping):
            raise ConfigError(f"{where} must be a table of options")
    return layers


def layers(name: str | None) -> list[Layer]:
    """Every source below the keyword arguments, lowest first: the file's tables, then the
    environment. Read once per open and passed to :func:`pick_backend_where` and
    :func:`resolve` (the file is read here, and only here)."""
    out = _file_layers(name)
    env_backend = os.environ.get("SHAREIT_BACKEND")
    if env_backend:
        out.append(("environment SHAREIT_BACKEND", {"backend": env_backend}))
    return out


def _with_kwargs(name: str | None, kwargs: Mapping[str, Any],
                 below: list[Layer] | None) -> list[Layer]:
    return [*(layers(name) if below is None else below), ("keyword arguments", dict(kwargs))]


def pick_backend(name: str | None, kwargs: Mapping[str, Any]) -> str:
    """Only the backend name, so that the backend's own options can join the vocabulary."""
    return pick_backend_where(name, kwargs)[0]


def pick_backend_where(name: str | None, kwargs: Mapping[str, Any],
                       below: list[Layer] | None = None) -> tuple[str, str]:
    """The backend name and where it came from (``"default"`` when nothing chose it).

    ``below``: the result of :func:`layers`, if the caller already has it.
    """
    backend, where = DEFAULT_BACKEND, "default"
    for where_, layer in _with_kwargs(name, kwargs, below):
        if "backend" in layer:
            backend, where = layer["backend"], where_
    return validate_option("backend", backend, where), where


def resolve(name: str | None, kwargs: Mapping[str, Any],
            extra: Mapping[str, Any] | None = None,
            below: list[Layer] | None = None) -> Config:
    """Resolve the options of mapping ``name`` from every source (see module doc).

    ``extra`` adds backend-specific options (name -> (validator, default, doc));
    ``below``: the result of :func:`layers`, if the caller already has it.
    """
    table = {**OPTIONS, **(extra or {})}
    values = {k: spec[1] for k, spec in table.items()}
    sources = dict.fromkeys(table, "default")
    for where, layer in _with_kwargs(name, kwargs, below):
        for k, v in layer.items():
            values[k] = validate_option(k, v, where, extra)
            sources[k] = where
    return Config(values, sources)
