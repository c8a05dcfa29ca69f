"""The ``redis`` backend: the same mapping across machines, in one Redis hash.

Features
--------
- One Redis hash per mapping, at ``PREFIX + NAME`` (``prefix`` option,
  default ``"shareit:"``), plus ``...:meta`` (its creator's options and
  serializer, as JSON: never pickle) and ``...:lock``. Keys: str (stored as plain UTF-8,
  readable from any
  language), bytes and int (tagged). Values: ints and floats are stored as
  Redis numbers, so ``incr`` is ``HINCRBY``/``HINCRBYFLOAT``; other values
  by ``serializer``: ``pickle`` (default, any value) or ``json`` (for
  mappings shared with other languages or less trusted writers: unpickling
  runs code chosen by whoever wrote the value). With ``json`` nothing is ever
  unpickled: a stored value that is neither JSON nor a number is a
  ``ValueError`` naming its key; NaN and infinity nested in a value are
  refused when written (JSON has none), top-level ones are Redis numbers.
  ``json`` is sticky: a handle uses it when its caller asks for it *or* the
  mapping's ``:meta`` says so (its creator asked), even if the caller asked
  for ``pickle`` (no error: the handle's ``config.serializer`` says
  ``"json"``). The record never turns a caller's ``json`` into pickle:
  anyone who can write to the server can rewrite it, so set ``json`` on every
  host that must not unpickle (as in the ``shareit.toml`` below). A record
  without the field (an older shareit's) leaves the caller's choice.
- The password in ``url`` appears in no message, repr or ``info()``.
- Every write is one round trip (a Lua script that first checks the lock);
  ``update`` and ``snapshot`` (``HGETALL``) are one each, not one per key, and
  so is ``dict(d)``.
- ``transform`` is optimistic (``WATCH``/``MULTI``, retried on conflict);
  ``edit`` holds the lock, since a ``with`` block cannot be run twice.
- ``lock()`` is a lease: ``SET NX PX`` with a random token and a
  ``LOCK_TTL`` (2 s) expiry, renewed every ``LOCK_TTL / 4`` by a daemon
  thread while it is held, so a holder that dies blocks the others for at
  most 2 s. While it is held, every other writer waits. A holder that cannot
  renew in time (stopped, frozen, cut off from Redis) loses it: the lock is
  fenced, each write inside ``lock()`` carries the token and its script
  refuses unless the lock key still holds it, so from then on the old
  holder's writes raise :class:`~shareit.LockLostError` and change nothing;
  a block that wrote nothing after the loss raises it when it ends.
- A server that goes away raises :class:`~shareit.BackendDiedError` (never
  redis-py's exceptions) within ``timeout``; when it returns, calls work again.
- A handle pickles as URL + key + options; a process reconnects on first use,
  and a forked child never reuses its parent's connection.

Configuration
-------------
``shareit.open("sessions", backend="redis", url="redis://localhost:6379/0")``;
``url`` takes ``redis://[:password@]host:port/db``, ``rediss://`` (TLS) and
``unix:///path/to/redis.sock``. Several machines share a mapping by using the
same URL and name; in ``shareit.toml`` on each host::

    [mappings.sessions]
    backend = "redis"
    url = "redis://:secret@cache.internal:6379/0"
    serializer = "json"

Needs ``pip install 'shareit[redis]'``.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from .. import _records, _runtime
from .._contract import MISSING, STRUCTURAL_OPTIONS, Capabilities, LockContext
from .._opening import Opener, attach_checked
from .._ops import check_number
from ..base import SharedMapping
from ..config import Config, redact_url
from ..errors import (
    BackendDiedError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    LockLostError,
    NotFoundError,
    RecordError,
    lock_timeout,
)
from ._redis_wire import (
    LOCKED,
    LOST,
    META_VERSION,
    SCRIPTS,
    ValueCodec,
    dec_key,
    enc_key,
    parse_meta,
    plain_number,
    response_error,
    token_pid,
)

try:
    import redis as _redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise BackendUnavailableError(
        f"the redis backend needs redis-py ({exc}): pip install 'shareit[redis]'"
    ) from exc

LOCK_TTL = 2.0  # seconds a dead holder can block the others; read at each use

class RedisMeta(Opener):
    """The redis open strategy: the record is the mapping's ``:meta`` hash in the server.

    Claimed in one step (a script), so concurrent openers on any machine end with
    one mapping; a found record is checked like a runtime-dir one
    (:func:`shareit._opening.attach_checked`). No users are counted: a named redis
    mapping lives until ``destroy()`` (its creator's exit destroys it unless
    ``persist=True``).
    """

    def open_named(self, cls: type[SharedMapping], name: str, config: Config,
                   create: bool) -> SharedMapping:
        assert issubclass(cls, RedisMapping)
        probe: RedisMapping | None = cls(name, config)  # becomes the mapping if it claims it
        try:
            deadline = time.monotonic() + config.timeout
            while True:
                assert probe is not None
                record = probe._read_meta()
                if record is not None:
                    return attach_checked(cls, name, config, record)
                if not create:
                    raise NotFoundError(
                        f"no shared mapping named {name!r} at {redact_url(probe._url)}"
                    )
                if probe._claim_meta():
                    probe._become_owner()
                    winner, probe = probe, None
                    return winner
                if time.monotonic() > deadline:  # claimed and destroyed again, over and over
                    raise BackendDiedError(
                        f"mapping {name!r} at {redact_url(probe._url)} kept being created and "
                        f"destroyed by other processes for {config.timeout:g} s"
                    )
        finally:
            if probe is not None:
                probe._close()


class RedisMapping(SharedMapping):
    """A mapping in a Redis hash: shared by every process on every machine reaching the server."""

    backend = "redis"
    opener = RedisMeta()
    capabilities = Capabilities(
        attach_by_name=True,
        cross_machine=True,
        key_types=(str, bytes, int),
        ordered=False,
        notes="one Redis hash; HINCRBY for incr; lock() is a fenced, renewed lease",
    )

    def __init__(self, name: str, config: Config, anonymous: bool = False):
        super().__init__(None if anonymous else name, config)
        self._key = f"{config.prefix or 'shareit:'}{name}"
        self._meta_key, self._lock_key = self._key + ":meta", self._key + ":lock"
        self._codec = ValueCodec(config.serializer == "json", self._label(), self._json_why())
        self._url = config.url or "redis://localhost:6379/0"
        self._client_pid = -1
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._held: dict[int, _Hold] = {}  # thread id -> _Hold, for this process
        self._renewer: threading.Thread | None = None
        self._renew_lock = threading.Lock()
        self._seg = name

    # ------------------------------------------------------------------ connection

    def _r(self) -> Any:
        if self._client_pid != os.getpid():  # first use, or a forked child: a connection of our own
            self._check_open()
            t = self._config.timeout
            try:
                self._client = _redis.Redis.from_url(
                    self._url, socket_timeout=t, socket_connect_timeout=t,
                    retry=Retry(NoBackoff(), 0), health_check_interval=0,
                )
            except ValueError:  # not echoed: redis-py's text may quote parts of the URL
                raise ConfigError(
                    f"option 'url' {redact_url(self._url)!r} is not a redis URL; expected "
                    f"redis://[[user]:password@]host[:port][/db], rediss://... or unix:///path"
                ) from None
            self._scripts = {n: self._client.register_script(s) for n, s in SCRIPTS.items()}
            self._client_pid = os.getpid()
            self._held = {}  # a forked child holds none of its parent's locks, nor its renewer
            self._renewer, self._renew_lock = None, threading.Lock()
        return self._client

    def _do(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one Redis call, translating redis-py's errors into shareit's."""
        try:
            return fn(*args, **kwargs)
        except _redis.exceptions.TimeoutError as exc:
            raise BackendTimeoutError(
                f"Redis at {redact_url(self._url)} did not answer within "
                f"{self._config.timeout:g} s ({exc})"
            ) from None
        except _redis.exceptions.ConnectionError as exc:
            raise self._unreachable(exc) from None

    def _script(self, name: str, field_args: list[Any], keys: list[str] | None = None) -> Any:
        """A write: retried while another process holds lock(), up to ``timeout``."""
        self._r()
        hold = self._held.get(threading.get_ident())
        if hold is not None and hold.lost:  # the renewer saw it go: no round trip
            raise self._lost_error(hold)
        token = hold.token if hold is not None else ""
        deadline = time.monotonic() + self._config.timeout
        delay = 0.001
        while True:
            try:
                return self._do(self._scripts[name],
                                keys or [self._key, self._lock_key, self._meta_key],
                                [token] + field_args)
            except _redis.exceptions.ResponseError as exc:
                if "GONE" in str(exc):
                    raise self._gone() from None
                if str(exc) == LOST and hold is not None:
                    hold.lost = True
                    raise self._lost_error(hold) from None
                if LOCKED not in str(exc):
                    raise response_error(exc) from None
            if time.monotonic() >= deadline:
                raise lock_timeout(f"mapping {self._label()}", self._config.timeout,
                                   "another process holds lock() and did not release it")
            time.sleep(delay)  # the holder is elsewhere, maybe on another machine
            delay = min(delay * 2, 0.05)

    # ------------------------------------------------------------------ lifetime

    @classmethod
    def _create(cls, name: str | None, config: Config) -> RedisMapping:
        """A new mapping: its record claimed in the server (an anonymous one under a fresh
        random name). The named path is :class:`RedisMeta`'s, which may attach instead."""
        self = cls(name if name is not None else f"anon-{secrets.token_hex(8)}", config,
                   anonymous=name is None)
        if not self._claim_meta():
            self._close()
            raise BackendDiedError(
                f"the record of mapping {self._label()} at {redact_url(self._url)} was created "
                f"by another process meanwhile"
            )
        return self

    @classmethod
    def _attach_record(cls, name: str, config: Config, record: Mapping[str, Any]) -> RedisMapping:
        # json is sticky: the record can turn pickle into json, never json into pickle.
        if record.get("serializer") == "json" and config.serializer != "json":
            config = Config({**config.as_dict(), "serializer": "json"},
                            {**config.sources, "serializer": "the mapping's record"})
        return cls(name, config)

    def _read_meta(self) -> dict[str, Any] | None:
        """The mapping's record, checked: ``backend``, ``options`` (decoded), ``fields``.

        Anything else in the hash is dropped. A record that is not what
        :meth:`_claim_meta` writes is a :class:`~shareit.errors.RecordError`.
        """
        raw = self._do(self._r().hgetall, self._meta_key)
        if not raw:
            return None
        try:
            return parse_meta(raw)
        except RecordError as exc:
            raise RecordError(
                f"the record of mapping {self._label()} (redis key {self._meta_key!r} at "
                f"{redact_url(self._url)}) is not valid shareit data: {exc}. If it is stale, "
                f"delete that key; else pick another name or prefix"
            ) from None

    def _claim_meta(self) -> bool:
        """Write this mapping's record unless one exists; True if this call wrote it."""
        structural = {k: self._config[k] for k in STRUCTURAL_OPTIONS}
        options = json.dumps(_records.options_to_json(structural))  # ConfigError before any write
        fields = {"version": str(META_VERSION), "backend": self.backend, "options": options,
                  "serializer": self._config.serializer,
                  **{k: str(v) for k, v in _runtime.owner_fields().items()}}
        self._r()
        args = [x for kv in fields.items() for x in kv]
        return bool(self._do(self._scripts["claim"], [self._meta_key], args))

    def _handle(self) -> tuple[str, Config, bool]:
        return (self._seg, self._config, self._name is None)

    @classmethod
    def _from_handle(cls, handle: tuple[str, Config, bool]) -> RedisMapping:
        return cls(*handle)

    def _close(self) -> None:
        if self._client is not None and self._client_pid == os.getpid():
            self._client.close()
        self._client, self._client_pid = None, -1

    def _destroy(self) -> None:
        self._do(self._r().delete, self._key, self._meta_key, self._lock_key)
        self._close()

    def _json_why(self) -> str:
        if self._config.sources.get("serializer") == "the mapping's record":
            return (f"Mapping {self._label()} was created with serializer='json', which every "
                    f"handle on it uses; pick another name for other objects")
        return "Use serializer='pickle' for other objects"

    # ------------------------------------------------------------------ the five

    def __getitem__(self, key: Any) -> Any:
        key = self._check_key(key)
        raw = self._do(self._r().hget, self._key, enc_key(key))
        if raw is None:
            self._check_alive()
            raise KeyError(key)
        value = self._codec.dec(raw, enc_key(key))
        return self._vt.coerce(value) if self._vt is not None else value

    def __setitem__(self, key: Any, value: Any) -> None:
        key = self._check_key(key)
        self._script("set", [enc_key(key), self._codec.enc(self._coerce(value))])

    def __delitem__(self, key: Any) -> None:
        key = self._check_key(key)
        if not self._script("del", [enc_key(key)]):
            raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        return iter([dec_key(k) for k in self._with_alive("hkeys")])

    def __len__(self) -> int:
        return int(self._with_alive("hlen"))

    def __contains__(self, key: Any) -> bool:
        try:
            key = self._check_key(key)
        except KeyError:
            return False
        if self._do(self._r().hexists, self._key, enc_key(key)):
            return True
        self._check_alive()
        return False

    def _with_alive(self, command: str) -> Any:
        """``command`` on the hash and an existence check of the mapping, in one round trip."""
        pipe = self._r().pipeline(transaction=False)
        getattr(pipe, command)(self._key)
        pipe.exists(self._meta_key)
        result, alive = self._do(pipe.execute)
        if not alive:
            raise self._gone()
        return result

    def _check_alive(self) -> None:
        if not self._do(self._r().exists, self._meta_key):
            raise self._gone()

    def _unreachable(self, exc: Exception) -> BackendDiedError:
        return BackendDiedError(f"Redis at {redact_url(self._url)} is unreachable ({exc})")

    def _gone(self) -> BackendDiedError:
        return BackendDiedError(
            f"mapping {self._label()} was destroyed (its key {self._key!r} is gone from "
            f"{redact_url(self._url)}); open it again"
        )

    # ------------------------------------------------------------------ one round trip each

    def snapshot(self) -> dict[Any, Any]:
        raw = self._with_alive("hgetall")
        out = {dec_key(k): self._codec.dec(v, k) for k, v in raw.items()}
        if self._vt is not None:
            out = {k: self._vt.coerce(v) for k, v in out.items()}
        return out

    def _update_items(self, items: list[tuple[Any, Any]]) -> None:
        args: list[bytes] = []
        for k, v in items:
            args += [enc_key(k), self._codec.enc(v)]
        if args:
            self._script("update", args)

    def clear(self) -> None:
        self._script("clear", [])

    def incr(self, key: Any, delta: Any = 1, default: Any = 0) -> Any:
        key = self._check_key(key)
        check_number("delta", delta)
        if self._vt is not None and self._vt.name not in ("int64", "float64"):
            return super().incr(key, delta, default)  # narrower types: checked under the lock
        if self._vt is not None and self._vt.kind == "int":
            self._vt.coerce(delta)  # a float delta into an int mapping: TypeError, nothing written
        check_number("default", default)  # the script writes it before adding: check it first
        delta = plain_number("delta", delta)
        default = plain_number("default", self._coerce(default))
        floats = isinstance(delta, float) or (self._vt is not None and self._vt.kind == "float")
        kind = "f" if floats else "i"
        field = enc_key(key)
        for attempt in (kind, "f"):
            try:
                step = repr(float(delta)) if attempt == "f" else str(delta)
                got = self._script("incr", [field, step,
                                            self._codec.enc(default), attempt])
            except TypeError:
                if attempt == "f":
                    raise
                continue  # an int delta on a float value: HINCRBYFLOAT
            value = float(got) if attempt == "f" else int(got)
            return self._coerce(value) if self._vt is not None else value
        raise AssertionError("unreachable")  # pragma: no cover

    def transform(self, key: Any, fn: Any, default: Any = MISSING) -> Any:
        """Optimistic: ``WATCH`` the hash, the lock and the mapping's record, read, run
        ``fn``, then ``MULTI``/``EXEC``; a concurrent write makes ``EXEC`` fail and it
        retries (until ``timeout``). Inside ``lock()`` the lock already excludes others."""
        key = self._check_key(key)
        if self._my_token():
            return super().transform(key, fn, default)
        r = self._r()
        field = enc_key(key)
        deadline = time.monotonic() + self._config.timeout
        delay = 0.001
        while True:
            try:
                with r.pipeline() as pipe:
                    pipe.watch(self._key, self._lock_key, self._meta_key)
                    if not pipe.exists(self._meta_key):
                        raise self._gone()
                    if pipe.get(self._lock_key) is None:
                        raw = pipe.hget(self._key, field)
                        if raw is not None:
                            current = self._codec.dec(raw, field)
                            current = self._vt.coerce(current) if self._vt is not None else current
                        elif default is MISSING:
                            raise KeyError(key)
                        else:
                            current = copy.deepcopy(default)
                        new = self._coerce(fn(current))
                        encoded = self._codec.enc(new)
                        pipe.multi()
                        pipe.hset(self._key, field, encoded)
                        pipe.execute()
                        return new
            except _redis.exceptions.WatchError:
                pass  # someone wrote meanwhile: read again
            except _redis.exceptions.TimeoutError as exc:
                raise BackendTimeoutError(
                    f"Redis at {redact_url(self._url)} did not answer ({exc})"
                ) from None
            except _redis.exceptions.ConnectionError as exc:
                raise self._unreachable(exc) from None
            if time.monotonic() >= deadline:
                raise lock_timeout(f"mapping {self._label()} for transform()",
                                   self._config.timeout,
                                   "it kept losing to other writers or to a lock() holder")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # ------------------------------------------------------------------ the lock

    def lock(self, timeout: float | None = None) -> LockContext:
        """One critical section across all processes: ``with d.lock(): ...``.

        Reentrant within a thread; while it is held, other processes' writes
        wait. It is a lease of ``LOCK_TTL`` seconds that a daemon thread renews
        every ``LOCK_TTL / 4``: if this process cannot renew it in time
        (stopped, frozen, cut off from Redis), another process may take it,
        and then every write in the block raises :class:`~shareit.LockLostError`
        and changes nothing. A block that lost the lock and was not told so by
        a write raises it when it ends, unless another exception is already on
        its way out (that one is kept, with a note). Raises
        :class:`LockTimeoutError` after ``timeout`` seconds.
        """
        return _RedisLockContext(self, timeout)

    def _my_token(self) -> str:
        hold = self._held.get(threading.get_ident())
        return hold.token if hold is not None else ""

    def _lost_error(self, hold: _Hold, what: str = "") -> LockLostError:
        hold.told = True  # told once: leaving the block does not say it again
        what = what or "nothing was written. Leave the with block and take the lock again"
        return LockLostError(
            f"the lock() this thread held on mapping {self._label()} expired (its lease of "
            f"{LOCK_TTL:g} s was not renewed in time: process stopped, frozen or cut off from "
            f"Redis) and may have passed to another process; {what}"
        )

    def _lock_acquire(self, timeout: float) -> bool:
        r = self._r()
        me = threading.get_ident()
        hold = self._held.get(me)
        if hold is not None:  # reentrant, even once lost: only leaving the outer block ends a loss
            hold.depth += 1
            return True
        token = f"{os.getpid()}:{me}:{secrets.token_hex(8)}"
        deadline = time.monotonic() + timeout
        delay = 0.001
        ttl_ms = int(LOCK_TTL * 1000)
        while not self._do(lambda: r.set(self._lock_key, token, nx=True, px=ttl_ms)):
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        self._held[me] = _Hold(token)
        self._start_renewer()
        return True

    def _lock_release(self, exc: BaseException | None = None) -> None:
        """Leave one level of ``lock()``; ``exc`` is the exception leaving the block, if any.

        A lost lock raises :class:`LockLostError` here, like redis-py's
        ``Lock.release`` raising ``LockNotOwnedError``, unless the block was
        already told (a write in it raised one) or another exception is leaving it.
        """
        me = threading.get_ident()
        hold = self._held[me]
        if hold.depth > 1:
            hold.depth -= 1
            return
        del self._held[me]
        lost = hold.lost  # read first: once the unlock below ran, the renewer may mark it lost too
        lost = not self._do(self._scripts["unlock"], [self._lock_key], [hold.token]) or lost
        if not lost or hold.told or isinstance(exc, LockLostError):
            return
        if exc is None:
            raise self._lost_error(hold, "the block's writes made before that were kept, but "
                                         "another process may have changed what it read since")
        if hasattr(exc, "add_note"):  # Python 3.11+; the exception already on its way out is kept
            exc.add_note(f"meanwhile the lock() on mapping {self._label()} had expired: "
                         f"other processes may have written inside this block")

    def _start_renewer(self) -> None:
        with self._renew_lock:
            if self._renewer is not None and self._renewer.is_alive():
                return
            self._renewer = threading.Thread(target=self._renew, daemon=True,
                                             name="shareit-redis-lock")
            self._renewer.start()

    def _renew(self) -> None:
        """The renewer: keeps this process's held locks alive; ends when none is held."""
        pid = os.getpid()
        while True:
            with self._renew_lock:  # an acquire racing with the exit starts a new renewer
                if not self._held or self._client_pid != pid:
                    self._renewer = None
                    return
            for hold in list(self._held.values()):
                if not hold.lost:
                    self._renew_one(hold)
            time.sleep(LOCK_TTL / 4)

    def _renew_one(self, hold: _Hold) -> None:
        try:
            renewed = self._scripts["renew"]([self._lock_key], [hold.token, int(LOCK_TTL * 1000)])
        except Exception:  # Redis unreachable for now: the lease may still be ours; writes check it
            return
        if not renewed:  # expired, maybe taken since: the holder's next write fails at once
            hold.lost = True

    def info(self) -> dict[str, Any]:
        """Where the mapping lives and who holds its lock: ``lock_holder`` is the pid in
        the holder's token, or None when the lock key holds something else (anyone who
        can write to the server can put anything there)."""
        r = self._r()
        holder = self._do(r.get, self._lock_key)
        return {"url": redact_url(self._url), "key": self._key, "keys": len(self),
                "lock_held": holder is not None, "lock_holder": token_pid(holder)}


class _Hold:
    """One thread's hold of ``lock()``: its token, its reentrancy depth, whether it
    lapsed and whether a :class:`LockLostError` already said so."""

    __slots__ = ("token", "depth", "lost", "told")

    def __init__(self, token: str):
        self.token, self.depth, self.lost, self.told = token, 1, False, False


class _RedisLockContext(LockContext):
    __slots__ = ()

    def __exit__(self, *exc: Any) -> None:
        self._mapping._lock_release(exc[1])  # type: ignore[call-arg]  # the RedisMapping one


