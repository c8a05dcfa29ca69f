"""Review of the recent fixes: keys() prefetch freshness, the default lock's journal
identity, runtime_dir re-checks, forked children and inherited lock fds.

Real processes, no mocks; other processes are waited for with pipes/events and deadlines.
"""

from __future__ import annotations

import multiprocessing as mp
import operator
import os
import signal

import pytest

import shareit
import shareit.testing

FORK = mp.get_context("fork")
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def redis_url():
    import shutil
    import tempfile

    try:
        from test_redis import start_server
    except Exception as exc:
        pytest.skip(f"no redis: {exc}")
    tmp = tempfile.mkdtemp(prefix="shareit-review3-redis-")
    sock = os.path.join(tmp, "redis.sock")
    try:
        proc = start_server(sock)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"no redis-server: {exc}")
    yield f"unix://{sock}"
    proc.terminate()
    proc.wait(30)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def opts(request, backend):
    return {"url": request.getfixturevalue("redis_url")} if backend == "redis" else {}


def _writer(name: str, backend: str, opts: dict, go, done) -> None:
    """Another process: on `go`, overwrite d['a'] and report the write complete."""
    d = shareit.open(name, backend=backend, timeout=5.0, **opts)
    try:
        assert go.wait(TIMEOUT)
        d["a"] = "new"
        done.set()
    finally:
        d.close()


def _writer_loop(name: str, backend: str, opts: dict, conn) -> None:
    """Another process: each value received is written to d['a'], then acknowledged."""
    d = shareit.open(name, backend=backend, timeout=5.0, **opts)
    try:
        while True:
            if not conn.poll(TIMEOUT):
                return
            v = conn.recv()
            if v is None:
                return
            d["a"] = v
            conn.send("written")
    finally:
        d.close()


def _start_writer(name, backend, opts):
    go, done = FORK.Event(), FORK.Event()
    p = FORK.Process(target=_writer, args=(name, backend, opts, go, done))
    p.start()
    return p, go, done


def _finish(p) -> None:
    p.join(TIMEOUT)
    if p.is_alive():
        p.kill()
        p.join()


def _let_write(go, done):
    """Let the other process write, and wait until its write has completed."""
    go.set()
    assert done.wait(TIMEOUT), "the writer did not finish in time"
    return "waited"


# ---------------------------------------------------------------- 1. keys() prefetch


@pytest.mark.parametrize("backend", ["manager", "redis"])
@pytest.mark.parametrize("shape", ["comprehension", "one_line_loop", "generator", "map"])
def test_prefetch_guard_later_reads_are_fresh(name, backend, shape, opts):
    """Reads that start after another process's write completed see that write."""
    d = shareit.open(name, backend=backend, create=True, timeout=5.0, **opts)
    p, go, done = _start_writer(name, backend, opts)
    try:
        d.update({"a": "old", "b": "old"})
        if shape == "comprehension":
            got = {k: (_let_write(go, done) and d[k]) for k in d.keys()}
            assert got["a"] == "new"
        elif shape == "one_line_loop":
            got = []
            for k in d.keys(): _ = _let_write(go, done); got.append(d[k])  # noqa: E701, E702
            assert got[0] == "new"
        elif shape == "generator":
            gen = (d[k] for k in d.keys())
            _let_write(go, done)
            assert next(gen) == "new"
        else:
            it = map(d.__getitem__, d.keys())
            _let_write(go, done)
            assert next(it) == "new"
    finally:
        _finish(p)
        d.destroy()


# Was a strict xfail (fixed):  prefetch keyed on (frame, code, f_lasti): one call site that
# first lists keys  (iter(d.keys())) and later reads (operator.getitem: a C caller, like
# dict(d)) --  a dispatch loop `r = fn(*args)` --  matches both, so a read made after another
# process's completed write is served from  the older snapshot (the pending snapshot is never
# dropped when the listing call  did not read)
@pytest.mark.parametrize("backend", ["manager", "redis"])
def test_prefetch_same_call_site_serves_stale_read(name, backend, opts):
    d = shareit.open(name, backend=backend, create=True, timeout=5.0, **opts)
    p, go, done = _start_writer(name, backend, opts)
    try:
        d.update({"a": "old"})
        steps = [(iter, (d.keys(),)), (_let_write, (go, done)), (operator.getitem, (d, "a"))]
        results = []
        for fn, args in steps:
            results.append(fn(*args))  # one instruction: lists, then (later) reads
        assert list(results[0]) == ["a"] and results[1] == "waited"
        assert results[2] == "new", "a read after a completed write returned the old value"
    finally:
        _finish(p)
        d.destroy()


def _apply(fn, *args):
    return fn(*args)


# Was a strict xfail (fixed):  prefetch keyed on id(frame): a helper `_apply(fn, *args)` that
# lists the keys (iter) in one  call and reads in a later call gets a new frame object at the
# same address (freed  and reused), same code, same f_lasti -- the later read is served from
# the old snapshot
@pytest.mark.parametrize("backend", ["manager", "redis"])
def test_prefetch_reused_frame_serves_stale_read(name, backend, opts):
    d = shareit.open(name, backend=backend, create=True, timeout=5.0, **opts)
    parent_end, child_end = FORK.Pipe()
    p = FORK.Process(target=_writer_loop, args=(name, backend, opts, child_end))
    p.start()
    stale = []
    try:
        for i in range(50):  # the frame object's address is reused often, not always
            d["a"] = f"old{i}"
            assert list(_apply(iter, d.keys())) == ["a"]
            parent_end.send(f"new{i}")  # the other process writes; we wait for its ack
            assert parent_end.poll(TIMEOUT) and parent_end.recv() == "written"
            got = _apply(operator.getitem, d, "a")
            if got != f"new{i}":
                stale.append((i, got))
        assert not stale, f"reads after a completed write returned older values: {stale[:3]}"
    finally:
        parent_end.send(None)
        _finish(p)
        d.destroy()


# ---------------------------------------------------------------- 2. the undo journal

from dataclasses import dataclass  # noqa: E402

from helpers import gone, wait_until  # noqa: E402
from shareit import _runtime  # noqa: E402
from shareit.errors import PermissionDeniedError  # noqa: E402

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")

_STALL: list = []  # in a child only: [conn, skips left]


@dataclass(frozen=True)
class Park:
    """Pickling it (once armed, in a child) tells the parent and parks until killed."""

    n: int = 0

    def __reduce__(self):
        if _STALL:
            conn, skip = _STALL
            if skip > 0:
                _STALL[1] = skip - 1
            else:
                _STALL.clear()
                conn.send("parked")
                conn.recv()  # until SIGKILLed (or the parent closes its end)
        return (Park, (self.n,))


def _kill_parked(target, args) -> None:
    parent_end, child_end = FORK.Pipe()
    p = FORK.Process(target=target, args=(*args, child_end))
    p.start()
    try:
        assert parent_end.poll(TIMEOUT), "the child never parked"
        assert parent_end.recv() == "parked"
        os.kill(p.pid, signal.SIGKILL)
        p.join(TIMEOUT)
        wait_until(lambda: gone(p.pid), "the killed writer gone")
    finally:
        if p.is_alive():
            p.kill()
        p.join(TIMEOUT)
        parent_end.close()


def _update_parks(name, conn) -> None:
    d = shareit.open(name, backend="reference")
    _STALL[:] = [conn, 0]
    d.update({"a": -1, "n1": 1, "n2": Park(2), "n3": 3})


def _clear_parks(name, conn) -> None:
    d = shareit.open(name, backend="reference")
    _STALL[:] = [conn, 1]  # skip the journal's pickling of the Park key
    d.clear()


def _fresh_view(name, conn) -> None:
    d = shareit.open(name, backend="reference")
    try:
        with d.lock():
            conn.send(("ok", list(d.snapshot().items())))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
    finally:
        d.close()


def _view_from_another_process(name):
    parent_end, child_end = FORK.Pipe()
    p = FORK.Process(target=_fresh_view, args=(name, child_end))
    p.start()
    try:
        assert parent_end.poll(TIMEOUT)
        kind, value = parent_end.recv()
    finally:
        p.join(TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join()
    assert kind == "ok", value
    return value


@pytest.mark.parametrize("op", ["update", "clear"])
def test_journal_guard_sigkill_mid_bulk_write_rolled_back_by_next_taker(name, op):
    """A writer SIGKILLed half-way through update()/clear(): the next taker, a fresh handle
    in a third process, sees exactly the state before, in its order; no journal is left."""
    d = shareit.open(name, backend="reference")
    try:
        d.update({"a": 1, Park(9): 2, "z": 3})
        before = list(d.snapshot().items())
        _kill_parked(_update_parks if op == "update" else _clear_parks, (name,))
        assert os.path.exists(d._journal_path()), "no journal left by the killed writer"
        assert _view_from_another_process(name) == before
        assert not os.path.exists(d._journal_path())
        assert list(d.snapshot().items()) == before
    finally:
        d.destroy()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@root_only
@pytest.mark.parametrize("how", ["other_user", "group_readable"])
def test_journal_guard_planted_journal_with_right_identity_is_refused(
        name, attacker, tmp_path, how):
    """A journal carrying the right lock identity but content that runs code when unpickled,
    owned by another user (or readable by others): refused, never unpickled or replayed."""
    import pickle

    d = shareit.open(name, backend="reference")
    marker = str(tmp_path / "pwned")
    try:
        d["a"] = 1
        with d.lock():  # learn the identity the journal must carry
            token = d._lock_token
        assert token
        path = d._journal_path()
        with open(path, "wb") as f:
            f.write(pickle.dumps((token, "update", [("a", True, _Evil(marker))])))
        if how == "other_user":
            os.chown(path, attacker[0], attacker[1])
            os.chmod(path, 0o600)
        else:
            os.chmod(path, 0o644)
        with pytest.raises(PermissionDeniedError):
            with d.lock():
                pass
        assert not os.path.exists(marker), "the planted journal was unpickled"
        os.unlink(path)
        assert d["a"] == 1
    finally:
        if os.path.exists(d._journal_path()):
            os.unlink(d._journal_path())
        d.destroy()


# ---------------------------------------------------------------- 3. runtime_dir re-checks


def _runtime_dir_after_swap(base: str, target: str, conn) -> None:
    """In a child: use `base` (a real dir), then replace it by a symlink to `target`."""
    try:
        os.environ["SHAREIT_RUNTIME_DIR"] = base
        first = _runtime.runtime_dir()
        os.rename(base, base + ".old")
        os.symlink(target, base)
        try:
            second = _runtime.runtime_dir()
            conn.send(("accepted", first, second))
        except PermissionDeniedError as exc:
            conn.send(("refused", first, str(exc)))
        try:  # what a process using that base for the first time says
            _runtime._bases_checked.clear()
            _runtime.runtime_dir()
            conn.send("fresh accepted")
        except PermissionDeniedError:
            conn.send("fresh refused")
    except BaseException as exc:
        conn.send(("error", repr(exc), ""))
    finally:
        conn.close()


def _run_swap(base, target):
    parent_end, child_end = FORK.Pipe(duplex=False)
    p = FORK.Process(target=_runtime_dir_after_swap, args=(base, target, child_end))
    p.start()
    child_end.close()
    try:
        assert parent_end.poll(TIMEOUT)
        kind, first, _detail = parent_end.recv()
        assert parent_end.poll(TIMEOUT)
        fresh = parent_end.recv()
    finally:
        p.join(TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join()
    assert kind != "error", first
    return kind, fresh


@root_only
# Was a strict xfail (fixed):  runtime_dir() caches the ancestor walk per base *string*: after
# the base is replaced  by a symlink (ours) to a dir under another user's directory, the
# per-call re-check  stat()s through the symlink and checks only the target itself (ours,
# 0700), not the  target's ancestors -- a path a fresh process refuses is accepted by one that
# used  the base before
def test_runtime_dir_base_swapped_for_symlink_into_foreign_dir_is_refused(tmp_path, attacker):
    base = str(tmp_path / "base")
    os.mkdir(base, 0o700)
    evil = tmp_path / "evil"
    evil.mkdir(mode=0o755)
    os.chown(evil, attacker[0], attacker[1])  # the attacker can rename what is in it
    target = evil / "target"
    target.mkdir(mode=0o700)
    (target / f"shareit-{os.geteuid()}").mkdir(mode=0o700)
    kind, fresh = _run_swap(base, str(target))
    assert fresh == "fresh refused"  # the first-use walk does see the foreign ancestor
    assert kind == "refused", "a cached base swapped for a symlink into a foreign dir is used"


@root_only
def test_runtime_dir_guard_base_swapped_for_symlink_to_foreign_dir_is_refused(tmp_path, attacker):
    """The base replaced by a symlink straight to another user's dir: refused."""
    base = str(tmp_path / "base")
    os.mkdir(base, 0o700)
    target = tmp_path / "theirs"
    target.mkdir(mode=0o700)
    (target / f"shareit-{os.geteuid()}").mkdir(mode=0o700)
    os.chown(target, attacker[0], attacker[1])
    kind, fresh = _run_swap(base, str(target))
    assert (kind, fresh) == ("refused", "fresh refused")


# ---------------------------------------------------------------- 4. forked children


def _try_lock(name, conn) -> None:
    d = shareit.open(name, backend="reference", timeout=0.3)
    try:
        with d.lock(timeout=0.3):
            conn.send("got it")
    except shareit.LockTimeoutError:
        conn.send("timed out")
    finally:
        d.close()


def _third_process_can_lock(name) -> bool:
    parent_end, child_end = FORK.Pipe()
    p = FORK.Process(target=_try_lock, args=(name, child_end))
    p.start()
    try:
        assert parent_end.poll(TIMEOUT)
        return parent_end.recv() == "got it"
    finally:
        p.join(TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join()


def _in_forked_child(d) -> list:
    """What the child of a fork made inside the parent's `with d.lock()` manages to do."""
    out = []
    for what, fn in (
        ("set", lambda: d.__setitem__("c", 1)),
        ("update", lambda: d.update({"c": 1, "p": 99})),
        ("clear", d.clear),
        ("pop", lambda: d.pop("p")),
        ("nested lock", lambda: d.lock(timeout=0.2).acquire()),
    ):
        try:
            fn()
            out.append((what, "done"))
        except shareit.LockTimeoutError:
            out.append((what, "timed out"))
        except Exception as exc:
            out.append((what, type(exc).__name__))
    return out


def test_fork_guard_child_of_a_lock_holder_neither_writes_nor_releases(name):
    """Forked while the parent holds d.lock(): the child's writes wait for the parent's
    lock (time out), and the child leaving the `with` -- or exiting -- leaves the parent's
    hold intact (a third process still cannot take the lock)."""
    d = shareit.open(name, backend="reference", timeout=0.3)
    try:
        d["p"] = 1
        r, w = os.pipe()
        with d.lock():
            d["p"] = 2
            pid = os.fork()
            if pid == 0:  # the child: inside the parent's `with` block
                code = 1
                try:
                    import pickle
                    res = _in_forked_child(d)
                    code = 0
                finally:
                    if code:
                        os._exit(code)
                # leaving the parent's `with` below releases nothing; then try again
            else:
                os.close(w)
                with os.fdopen(r, "rb") as f:
                    data = f.read()  # until the child exits (EOF), bounded by its timeouts
                _, status = os.waitpid(pid, 0)
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
                import pickle
                res, after = pickle.loads(data)
                assert all(v == "timed out" for _, v in res), res
                assert after == "timed out", "the child took the lock the parent holds"
                assert not _third_process_can_lock(name), "the parent's hold was released"
                assert d.snapshot() == {"p": 2}
        if pid == 0:
            try:
                try:
                    with d.lock(timeout=0.2):
                        after = "got it"
                except shareit.LockTimeoutError:
                    after = "timed out"
                os.close(r)
                os.write(w, pickle.dumps((res, after)))
            finally:
                os._exit(0)
        assert _third_process_can_lock(name)
        assert d.snapshot() == {"p": 2}
    finally:
        d.destroy()


# ---------------------------------------------------------------- 3b. a relative runtime dir
# (A relative SHAREIT_RUNTIME_DIR is refused now: test_review_structure.py
# test_a_relative_runtime_base_is_refused.)

# ---------------------------------------------------------------- 2b. a stale writer's journal


def _stale_writer(d, conn) -> None:
    _STALL[:] = [conn, 0]  # the undo list holds the old Park value: parks before the journal
    try:
        d.update({"k": 1})
    except shareit.BackendDiedError:
        pass
    conn.send("done")


def _new_writer(d2, conn) -> None:
    _STALL[:] = [conn, 0]  # parks pickling n's value: journal written, "x" written
    d2.update({"x": -1, "n": Park(5), "y": -2})


# Was a strict xfail (fixed):  _write_journal/_end_journal address the journal by name and do
# not re-check that the  held lock file is still the one at the path: a writer of a destroyed
# mapping, resumed  after the name was created again, os.replace()s its journal (old identity)
# over the  live journal of the new mapping's writer; when that writer is SIGKILLed, the next
# taker discards the foreign-identity journal and the half-done update stays
def test_stale_writer_journal_never_replaces_the_new_mappings_journal(name):
    d = shareit.open(name, backend="reference", timeout=5.0)
    d2 = None
    s_parent, s_child = FORK.Pipe()
    w_parent, w_child = FORK.Pipe()
    s = w = None
    try:
        d["k"] = Park(3)
        s = FORK.Process(target=_stale_writer, args=(d, s_child))
        s.start()
        assert s_parent.poll(TIMEOUT) and s_parent.recv() == "parked"  # holds the old lock
        shareit.destroy(name)
        d2 = shareit.open(name, backend="reference", timeout=5.0)
        d2.update({"x": 1, "y": 2})
        w = FORK.Process(target=_new_writer, args=(d2, w_child))
        w.start()
        assert w_parent.poll(TIMEOUT) and w_parent.recv() == "parked"  # mid-update
        s_parent.send("go")
        assert s_parent.poll(TIMEOUT) and s_parent.recv() == "done"
        os.kill(w.pid, signal.SIGKILL)
        w.join(TIMEOUT)
        assert d2.snapshot() == {"x": 1, "y": 2}, "the new mapping's killed update stayed"
    finally:
        for p in (s, w):
            if p is not None:
                if p.is_alive() and p is s:
                    p.join(TIMEOUT)
                if p.is_alive():
                    p.kill()
                p.join(TIMEOUT)
        d.close()
        if d2 is not None:
            d2.destroy()
        for f in _runtime.files_of(name):
            os.unlink(f)


# ---------------------------------------------------------------- 2c. the narrow window


def _is_journal(name: str, path: object) -> bool:
    """``path`` is a journal file of ``name`` (whatever the journal's naming): a file of the
    stem that is neither its data, its record nor its lock file, nor a temp file."""
    base = os.path.basename(os.fsdecode(path))  # type: ignore[arg-type]
    stem, sep, kind = base.partition("@")
    return (stem == name and sep == "@" and not kind.endswith(".tmp")
            and kind not in ("data", "meta", "mutex"))


def _stale_writer_in_window(d, window, conn) -> None:
    """In a forked child only: update ``d`` and stop exactly where the last lock-file check is
    behind it -- at the journal's ``os.replace`` (``_write_journal``) or at its unlink
    (``_end_journal``) -- until the parent says go."""
    name = d.name
    real = os.replace if window == "replace" else os.unlink

    def hooked(*args, **kwargs):
        if _is_journal(name, args[1] if window == "replace" else args[0]):
            setattr(os, window, real)  # once
            conn.send("parked")
            assert conn.poll(TIMEOUT * 3), "the parent never said go"
            assert conn.recv() == "go"
        return real(*args, **kwargs)

    setattr(os, window, hooked)
    try:
        d.update({"k": 1})
        outcome = "ok"
    except shareit.BackendDiedError:
        outcome = "died"
    except BaseException as exc:  # reported to the parent, which asserts on it
        outcome = repr(exc)
    conn.send(outcome)


@pytest.mark.parametrize("window", ["replace", "unlink"])
def test_stale_writer_resumed_inside_the_check_window_spares_the_new_journal(name, window):
    """The narrow TOCTOU of the journal: a writer of a destroyed mapping stopped just past its
    last lock-file check (at the journal's os.replace, or at its unlink in _end_journal), the
    name destroyed and created again, the new mapping's writer parked mid-update; the stale
    writer resumes, then the new writer is SIGKILLed: its half-done update is rolled back."""
    d = shareit.open(name, backend="reference", timeout=5.0)
    d2 = None
    s_parent, s_child = FORK.Pipe()
    w_parent, w_child = FORK.Pipe()
    s = w = None
    try:
        d["k"] = 0
        s = FORK.Process(target=_stale_writer_in_window, args=(d, window, s_child))
        s.start()
        assert s_parent.poll(TIMEOUT) and s_parent.recv() == "parked"  # past its last check
        shareit.destroy(name)
        d2 = shareit.open(name, backend="reference", timeout=5.0)
        d2.update({"x": 1, "y": 2})
        w = FORK.Process(target=_new_writer, args=(d2, w_child))
        w.start()
        assert w_parent.poll(TIMEOUT) and w_parent.recv() == "parked"  # journal written, x=-1
        s_parent.send("go")
        assert s_parent.poll(TIMEOUT), "the stale writer never finished"
        outcome = s_parent.recv()
        os.kill(w.pid, signal.SIGKILL)
        w.join(TIMEOUT)
        assert not w.is_alive()
        assert d2.snapshot() == {"x": 1, "y": 2}, "the new mapping's killed update stayed"
        # (past the replace window its journal's temp file went with destroy(); past the
        # unlink window its update had completed before the destroy)
        assert outcome == ("died" if window == "replace" else "ok"), outcome
    finally:
        for p in (s, w):
            if p is not None:
                if p.is_alive():
                    p.join(TIMEOUT)
                if p.is_alive():
                    p.kill()
                p.join(TIMEOUT)
        d.close()
        if d2 is not None:
            d2.destroy()
        left = _runtime.files_of(name)
        for f in left:
            os.unlink(f)
    assert not left, f"left behind: {left}"


@pytest.mark.parametrize("how", ["handle", "by_name", "create_again"])
def test_destroy_leaves_no_journal_of_any_identity(name, how):
    """Journals of every identity of the name go with its destroy (through a handle, or by
    name) or with its next create: the live one a SIGKILLed writer left, a stale writer's of
    an earlier identity, and their temp files. Nothing else of the name is touched."""
    import secrets

    d = shareit.open(name, backend="reference")
    try:
        d.update({"a": 1, Park(9): 2})
        _kill_parked(_update_parks, (name,))  # leaves this identity's journal
        live = d._journal_path()
        assert os.path.exists(live), "no journal left by the killed writer"
        planted = [live + ".tmp"]
        for _ in range(2):  # as a stale writer of an earlier mapping of the name leaves them
            old = _runtime.path(name, "journal-" + secrets.token_bytes(16).hex())
            planted += [old, old + ".tmp"]
        for p in planted:
            os.close(_runtime.open_private(p, os.O_WRONLY, create=True))
        other = _runtime.path(name + "x", "journal-" + secrets.token_bytes(16).hex())
        os.close(_runtime.open_private(other, os.O_WRONLY, create=True))  # another name's
        if how == "handle":
            d.destroy()
        elif how == "by_name":
            shareit.destroy(name)
            d.close()
        else:  # only the record gone (as an owner killed mid-destroy leaves it): the files
            _runtime.remove_meta(name)  # stay until the name's next create sweeps them
            d.close()
            assert set(planted) <= set(_runtime.files_of(name))
            shareit.open(name, backend="reference").destroy()
        left = _runtime.files_of(name)
        assert not left, f"left behind: {left}"
        assert os.path.exists(other), "another name's journal was removed"
        os.unlink(other)
    finally:
        if not d.closed:
            d.destroy()
        for f in _runtime.files_of(name) + _runtime.files_of(name + "x"):
            os.unlink(f)
