"""Hostile local clients of a server backend: floods, garbage handshakes, other users.

A server listens on an abstract Unix socket, which any local user can find (in
/proc/net/unix) and connect to. None of that may kill the server, starve its
legitimate clients for good, or print anything to the owner's stderr.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import random
import resource
import select
import socket
import struct
import threading
import time
import uuid
from multiprocessing.connection import AuthenticationError, Connection, answer_challenge

import pytest

import shareit
from helpers import wait_until
from shareit.backends.manager import ManagerMapping

FORK = mp.get_context("fork")
TIMEOUT = 60
NOBODY = 65534
BACKENDS = ["manager", "queue"]


def _open(backend: str, timeout: float = 2.0):
    return shareit.open(backend=backend, timeout=timeout)


def _server_alive(m) -> bool:
    return m._proc is not None and m._proc.poll() is None


def _join(p) -> None:
    """Join a child; one that outstays the deadline is killed, so none is left running."""
    p.join(TIMEOUT)
    if p.is_alive():
        p.kill()
        p.join(TIMEOUT)
    assert p.exitcode == 0, f"child exited with {p.exitcode}"


def _drop_to_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


# ---------------------------------------------------------------------- children


def _flood(address: str, n: int, ctl) -> None:
    """Open up to ``n`` connections that never handshake; hold them until told to let go."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 64)), hard))
    held = []
    for _ in range(n):
        sock = _connect_soon(address)
        if sock is None:
            break  # the backlog stays full: the server is saturated, which is the point
        held.append(sock)
    ctl.send(len(held))
    ctl.poll(TIMEOUT)
    for sock in held:
        sock.close()
    ctl.send("closed")


def _connect_soon(address: str) -> socket.socket | None:
    """A non-blocking connect, retried while the server's backlog is full (0.5 s at most);
    None if it stays full, or if the server is gone (the test then says so)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    deadline = time.monotonic() + 0.5
    while True:
        try:
            sock.connect(address)
            return sock
        except BlockingIOError:
            if time.monotonic() > deadline:
                sock.close()
                return None
            select.select([], [], [], 0.002)  # polling the backlog, with a deadline
        except OSError:
            sock.close()
            return None


def _attach_and_use(handle: bytes, ctl) -> None:
    """Attach by pickled handle and set/get, retrying refused connections until a deadline."""
    deadline = time.monotonic() + TIMEOUT / 2
    while True:
        try:
            m = pickle.loads(handle)
            m[f"child-{os.getpid()}"] = os.getpid()
            ok = m[f"child-{os.getpid()}"] == os.getpid()
            m.close()
            ctl.send(("ok", ok))
            return
        except shareit.BackendDiedError as exc:
            if time.monotonic() > deadline:
                ctl.send(("gave up", repr(exc)))
                return
            select.select([], [], [], 0.01)  # polling, with a deadline
        except Exception as exc:
            ctl.send(("error", repr(exc)))
            return


def _connect_as_nobody(address: str, ctl) -> None:
    _drop_to_nobody()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT / 2)
    try:
        sock.connect(address)
    except PermissionError:
        ctl.send("denied")
        return
    try:
        got = sock.recv(4096)
    except ConnectionResetError:
        got = "reset"
    except TimeoutError:
        got = "timeout"
    ctl.send(got)


def _listen_as_nobody(address: str, ctl) -> None:
    _drop_to_nobody()  # before listen(): a client's SO_PEERCRED is the listener's then
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen(8)
    ctl.send("listening")
    ctl.poll(TIMEOUT)  # keep listening until the parent is done


def _use_from_child(m) -> None:
    """A new process attaches via a pickled handle and sets/gets; it must succeed."""
    parent_end, child_end = FORK.Pipe()
    p = FORK.Process(target=_attach_and_use, args=(pickle.dumps(m), child_end))
    p.start()
    try:
        assert parent_end.poll(TIMEOUT), "the attaching child never reported"
        assert parent_end.recv() == ("ok", True)
    finally:
        _join(p)


# ---------------------------------------------------------------------- the flood


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fd_limit", [256, 24], ids=["busy", "emfile"])
def test_connection_flood_does_not_kill_the_server(backend: str, fd_limit: int, capfd) -> None:
    """Hundreds of connections that never handshake: with descriptors to spare the
    surplus is turned away (rejected_busy); with almost none, accept() fails with
    EMFILE (accept_errors). Either way the server lives and serves afterwards."""
    m = _open(backend)
    try:
        # The server's own limit, as if it had been started under a lower ulimit -n;
        # set from outside so that this process keeps its descriptors.
        hard = resource.prlimit(m._proc.pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(m._proc.pid, resource.RLIMIT_NOFILE, (fd_limit, hard))
        m["before"] = 1
        assert m["before"] == 1  # connected (and, for queue, subscribed) before the flood
        parent_end, child_end = FORK.Pipe()
        flooder = FORK.Process(target=_flood, args=(m._address, 600, child_end))
        flooder.start()
        try:
            assert parent_end.poll(TIMEOUT), "the flooder never reported"
            held = parent_end.recv()
            assert held >= 100, f"the flood held only {held} connections"
            key = "rejected_busy" if fd_limit == 256 else "accept_errors"
            wait_until(lambda: m.info()[key] > 0, what=f"{key} counted", timeout=TIMEOUT / 2)
            # An already connected client keeps working during the flood ...
            m["during"] = 2
            assert m["during"] == 2 and m["before"] == 1
            if fd_limit == 256:  # ... and a new one gets in once the flood's handshakes time out
                _use_from_child(m)
            parent_end.send("let go")
            assert parent_end.poll(TIMEOUT) and parent_end.recv() == "closed"
        finally:
            _join(flooder)
        assert _server_alive(m)
        _use_from_child(m)
        m["after"] = 3
        assert m["after"] == 3 and m["during"] == 2
        info = m.info()
        assert info["failed_handshakes"] > 0
        assert info["rejected_foreign"] == 0
    finally:
        m.close()
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_burst_of_legitimate_clients_is_not_turned_away(backend: str) -> None:
    """More clients than the server lets handshake at once: those it turns away retry
    (within timeout) instead of reporting the data lost."""
    # A generous timeout: 100 handshakes at once on 2 shared cores may take seconds, and
    # what is tested is that clients turned away retry rather than report the data lost.
    m = _open(backend, timeout=30.0)
    try:
        m["a"] = 1
        n = 100  # threads (more than MAX_PENDING = 32): one connection each, all at once
        start, errors = threading.Barrier(n), []

        def first_call() -> None:
            start.wait(TIMEOUT)
            try:
                assert m["a"] == 1 and len(m) == 1
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=first_call) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
    finally:
        m.close()


# ---------------------------------------------------------------------- garbage


def _misbehave(address: str, how: str, rng: random.Random, authkey: bytes) -> None:
    """One connection that fails the handshake in the way ``how`` names."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT / 2)
    sock.connect(address)
    try:
        if how == "garbage":
            sock.sendall(rng.randbytes(rng.randrange(1, 600)))
        elif how == "framed_garbage":  # a well-formed message that is no answer
            sock.recv(4096)
            payload = rng.randbytes(rng.randrange(1, 200))
            sock.sendall(struct.pack("!i", len(payload)) + payload)
            sock.recv(4096)  # the server's #FAILURE#
        elif how == "huge_header":
            sock.recv(4096)
            sock.sendall(b"\x7f\xff\xff\xff")
        elif how == "wrong_key":
            conn = Connection(sock.detach())
            with pytest.raises(AuthenticationError):
                answer_challenge(conn, b"not the key".ljust(32, b"?"))
            conn.close()
        elif how == "half":  # answers with the right key, then leaves mid-handshake
            conn = Connection(sock.detach())
            answer_challenge(conn, authkey)
            conn.close()
    except OSError:
        pass  # the server may close first: that is what it is for
    finally:
        sock.close()


HOW = ["close", "garbage", "framed_garbage", "huge_header", "wrong_key", "half"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_handshakes_are_counted_not_printed(backend: str, capfd) -> None:
    m = _open(backend)
    try:
        m["a"] = 1
        rng = random.Random(1234)
        rounds = 30
        for _ in range(rounds):
            for how in HOW:
                _misbehave(m._address, how, rng, m._authkey)

        def turned_away() -> int:
            info = m.info()
            return info["failed_handshakes"] + info["rejected_busy"]

        wait_until(lambda: turned_away() == rounds * len(HOW), what="every attempt counted",
                   timeout=TIMEOUT / 2)
        assert m.info()["failed_handshakes"] > 0
        assert _server_alive(m)
        m["b"] = 2
        assert m["a"] == 1 and m["b"] == 2
        _use_from_child(m)
    finally:
        m.close()
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dribbled_handshake_is_cut_off_at_the_limit(backend: str) -> None:
    """A peer sending a byte now and then never trips a per-read timeout; the server's
    handshake limit (min(timeout, 5 s)) bounds the whole handshake instead."""
    m = _open(backend, timeout=1.0)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT / 2)
        started = time.monotonic()
        sock.connect(m._address)
        sock.recv(4096)  # the challenge
        closed = False
        for byte in struct.pack("!i", 200) + b"x" * 40:  # 44 bytes, 0.3 s apart: 13 s in all
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if select.select([sock], [], [], 0.3)[0]:  # paces the dribble; wakes on a close
                try:
                    closed = sock.recv(4096) == b""
                except ConnectionResetError:
                    closed = True
                if closed:
                    break
        elapsed = time.monotonic() - started
        sock.close()
        assert closed, "the server let the dribbling handshake go on"
        assert elapsed < 6.0, f"closed only after {elapsed:.1f} s (limit: 1 s)"
        wait_until(lambda: m.info()["failed_handshakes"] == 1, what="the cut counted")
        m["x"] = 1
        assert m["x"] == 1 and _server_alive(m)
    finally:
        m.close()


# ---------------------------------------------------------------------- other users

root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run a process as another user (nobody)"
)


@root_only
@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_another_users_connection_is_closed_before_any_handshake(backend: str, capfd) -> None:
    m = _open(backend)
    try:
        m["a"] = 1
        parent_end, child_end = FORK.Pipe()
        p = FORK.Process(target=_connect_as_nobody, args=(m._address, child_end))
        p.start()
        try:
            assert parent_end.poll(TIMEOUT), "the nobody child never reported"
            assert parent_end.recv() == "denied", "another user could connect to the socket"
        finally:
            _join(p)
        # Defence in depth: were the socket reachable, the server still closes the
        # connection before any handshake.
        dirs = [os.path.dirname(m._address), os.path.dirname(os.path.dirname(m._address))]
        modes = [os.stat(x).st_mode & 0o7777 for x in dirs]
        for x in dirs:
            os.chmod(x, 0o711)
        os.chmod(m._address, 0o666)
        parent_end, child_end = FORK.Pipe()
        p = FORK.Process(target=_connect_as_nobody, args=(m._address, child_end))
        p.start()
        try:
            assert parent_end.poll(TIMEOUT), "the nobody child never reported"
            got = parent_end.recv()
        finally:
            _join(p)
            for x, mode in zip(dirs, modes):
                os.chmod(x, mode)
            os.chmod(m._address, 0o600)
        assert got in (b"", "reset"), f"another user's connection got {got!r}, not a close"
        wait_until(lambda: m.info()["rejected_foreign"] == 1, what="rejected_foreign counted")
        info = m.info()
        assert info["failed_handshakes"] == 0, "it never got as far as a handshake"
        assert _server_alive(m) and m["a"] == 1
    finally:
        m.close()
    assert "Traceback" not in capfd.readouterr().err


@root_only
@pytest.mark.timeout(60)
def test_a_server_of_another_user_is_refused() -> None:
    """Someone else listening on a mapping's address (say, after its server died) gets
    nothing: the client checks the server's uid before the handshake."""
    m = _open("manager")
    address = f"\0shareit-hostile-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    parent_end, child_end = FORK.Pipe()
    p = FORK.Process(target=_listen_as_nobody, args=(address, child_end))
    p.start()
    try:
        assert parent_end.poll(TIMEOUT) and parent_end.recv() == "listening"
        victim = ManagerMapping(None, m.config, address, b"x" * 32)
        with pytest.raises(shareit.PermissionDeniedError,
                           match=f"belongs to uid {NOBODY}, not you"):
            len(victim)
        victim.close()
    finally:
        parent_end.send("done")
        _join(p)
        m.close()
