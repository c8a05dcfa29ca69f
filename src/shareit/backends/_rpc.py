"""The protocol of shareit's server processes (the manager server, the queue hub) and
their clients: framing, the handshake, the accept loop, the isolated boot.

- **Frames** are ``multiprocessing.connection``'s: a 4-byte big-endian signed length
  (or -1, then an 8-byte length, for 2 GiB and more), then a pickle. A
  :class:`~multiprocessing.connection.Connection` reads and writes them blocking;
  :class:`FrameReader` parses them from a stream read without blocking (a replica's
  pushes). Every read and write is bounded (:func:`set_timeouts`).
- **The handshake**: the client checks the server's uid (``SO_PEERCRED``) before
  sending anything; then the HMAC challenge both ways, as ``multiprocessing`` managers
  do; then the client's ``hello``. The server closes a peer of another uid at once,
  lets at most ``MAX_PENDING`` connections handshake at a time, each for at most
  ``HANDSHAKE_LIMIT`` seconds (:class:`Gate`), and backs off instead of dying when out
  of descriptors or threads (:class:`Listener`). Nothing a hostile peer does prints to
  the owner's stderr: it is logged at DEBUG on ``shareit.server`` and counted
  (``COUNTERS``, in ``info()``).
- **Per-connection state** is typed: :class:`Session` on the server (one thread per
  connection), :class:`Link` on the client (one connection per thread).
- **The boot** (:func:`start_server`): a server runs isolated (``python -I``, from
  ``/``), its parameters pickled on its stdin; it prints ``ready`` once it listens.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any, NoReturn

from ..errors import BackendUnavailableError

PROTO = pickle.HIGHEST_PROTOCOL
log = logging.getLogger("shareit.server")
MAX_PENDING = 32  # connections in the handshake phase at once; more are closed unheard
HANDSHAKE_LIMIT = 5.0  # seconds a connection may take to authenticate (or timeout, if less)
ACCEPT_BACKOFF = 0.05  # seconds to pause accepting when out of descriptors, memory or threads
COUNTERS = ("rejected_foreign", "rejected_busy", "failed_handshakes", "accept_errors")
_PEER_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO})  # accept() failures not worth a pause
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
READ_CHUNK = 1 << 16  # below malloc's mmap threshold: no mmap/munmap per read


def encode(obj: object) -> bytes:
    return pickle.dumps(obj, PROTO)


decode = pickle.loads


# ------------------------------------------------------------------ sockets


def set_timeouts(conn: Connection, recv_timeout: float, send_timeout: float) -> None:
    """Bound reads and writes on ``conn`` (0: no bound), so a stalled peer cannot hang us.

    With SO_RCVTIMEO/SO_SNDTIMEO a stalled read fails with EAGAIN, which costs
    nothing per call, unlike a ``poll()`` before every ``recv()``.
    """
    sock = socket.socket(fileno=conn.fileno())  # no dup(): it must work with no descriptor to spare
    try:
        for opt, t in ((socket.SO_RCVTIMEO, recv_timeout), (socket.SO_SNDTIMEO, send_timeout)):
            sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", int(t), int((t % 1) * 1e6)))
    finally:
        sock.detach()


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (when it connected or listened)."""
    return int(_UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1])


def shut(fd: int) -> None:
    """shutdown() the socket ``fd`` without closing it (its owner does that): its peer, and
    a thread of ours blocked on it, see EOF at once."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


class FrameReader:
    """Whole frames from a socket read without blocking, buffering any partial one."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()

    def read(self, timeout: float) -> list[Any]:
        """Every whole frame now available, decoded, waiting up to ``timeout`` s for one
        (0: look once). EOFError once the peer has hung up."""
        buf: bytearray = self.buf
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while True:
            pos, end = 0, len(buf)
            while end - pos >= 4:
                size = int.from_bytes(buf[pos:pos + 4], "big", signed=True)
                start = pos + 4
                if size == -1:  # the header for 2 GiB and more
                    if end - pos < 12:
                        break
                    size, start = int.from_bytes(buf[pos + 4:pos + 12], "big"), pos + 12
                if end - start < size:
                    break
                out.append(decode(buf[start:start + size]))
                pos = start + size
            if pos:
                del buf[:pos]
            if out:
                return out
            left = max(0.0, deadline - time.monotonic())
            if not select.select([self.fd], [], [], left)[0]:
                return out
            chunk = os.read(self.fd, READ_CHUNK)
            if not chunk:
                raise EOFError
            buf += chunk


# ------------------------------------------------------------------ the client's end


class ForeignServerError(Exception):
    """The server socket belongs to another user: nothing was sent to it."""

    def __init__(self, uid: int):
        super().__init__(uid)
        self.uid = uid


class WrongKeyError(Exception):
    """The server at the address does not know our key: it serves another mapping (the
    name was destroyed and created again since this handle was made)."""


@dataclass(eq=False)
class Link:
    """A client's authenticated connection (one per thread of a process)."""

    conn: Connection
    pid: int  # the process that opened it: a forked child must not close its parent's
    generation: int  # ``_runtime.fork_generation`` when opened
    server_pid: int  # the server's answer to the hello
    locks: int = 0  # lock() levels this connection holds on the server (a client's count)


def connect(address: str, authkey: bytes, timeout: float, bound: float,
            hello: tuple[Any, ...], generation: int) -> Link:
    """Connect, check the server is ours, authenticate both ways and say hello.

    The server may turn the connection away while too many are handshaking (a burst
    of clients, or a flood): try again, until ``bound``, then TimeoutError. Raises
    :class:`ForeignServerError`, OSError or EOFError."""
    deadline = time.monotonic() + bound  # beyond the server's handshake limit
    pause = 0.002
    while (sock := _dial(address, timeout, bound)) is None:
        if time.monotonic() + pause > deadline:
            raise TimeoutError("the server is overloaded")
        time.sleep(pause)  # the server is shedding load: try again shortly, until the bound
        pause = min(pause * 2, 0.1)
    conn = Connection(sock.detach())
    try:
        set_timeouts(conn, bound, bound)
        try:
            answer_challenge(conn, authkey)
            deliver_challenge(conn, authkey)
        except AuthenticationError:
            raise WrongKeyError() from None
        conn.send_bytes(encode(hello))
        server_pid = decode(conn.recv_bytes())[1]
    except BaseException:
        conn.close()
        raise
    return Link(conn, os.getpid(), generation, server_pid)


def _dial(address: str, timeout: float, bound: float) -> socket.socket | None:
    """Connect, check the server's uid, and wait for its first byte; None if it closed the
    connection before sending any (it is shedding load)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        uid = peer_uid(sock)  # defence in depth: the socket is in our private directory
        if uid != os.geteuid():
            raise ForeignServerError(uid)
        sock.settimeout(bound)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except ConnectionResetError:
            first = b""
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    if not first:
        sock.close()
        return None
    return sock


# ------------------------------------------------------------------ the server's end


@dataclass(eq=False)
class Session:
    """One authenticated client connection, as the server thread serving it sees it."""

    conn: Connection
    thread: threading.Thread  # the one thread serving it: ends when the client goes
    timeout: float  # how long this client's writes wait for the user lock (its hello says)
    pid: int | None = None  # the client's pid, from its hello


class Gate:
    """The handshake phase: at most ``MAX_PENDING`` connections at once, each for at
    most ``limit`` seconds in all (a per-read timeout alone would let a peer that
    sends a byte now and then take forever). Connections are known by descriptor,
    which stays open while it is here: a thread leaves the gate before closing it."""

    def __init__(self, limit: float):
        self.limit = limit
        self.cond = threading.Condition(threading.Lock())
        self.pending: dict[int, float] = {}  # fd -> deadline (inf once shut down)

    def enter(self, fd: int) -> bool:
        with self.cond:
            if len(self.pending) >= MAX_PENDING:
                return False
            self.pending[fd] = time.monotonic() + self.limit
            self.cond.notify()
            return True

    def leave(self, fd: int) -> None:
        with self.cond:
            self.pending.pop(fd, None)

    def reap(self) -> NoReturn:
        """Shut down connections past their deadline; their thread then sees EOF."""
        with self.cond:
            while True:
                now = time.monotonic()
                for fd, deadline in self.pending.items():
                    if deadline <= now:
                        shut(fd)
                        self.pending[fd] = math.inf
                soonest = min(self.pending.values(), default=math.inf)
                self.cond.wait(None if soonest == math.inf else soonest - now)


class Listener:
    """A server's socket and accept loop: each admitted connection is authenticated in a
    thread of its own (so a stalled client cannot block ``accept``), which then runs
    ``serve(session)`` until the client goes. Nothing escapes that thread: the default
    excepthook would print a traceback to the owner's stderr."""

    def __init__(self, address: str, authkey: bytes, timeout: float,
                 serve: Callable[[Session], None]):
        self.address = address
        self.authkey = authkey
        self.timeout = timeout
        self.serve = serve
        self.gate = Gate(min(timeout, HANDSHAKE_LIMIT))
        self.uid = os.geteuid()
        self.counts = dict.fromkeys(COUNTERS, 0)  # see ``admit``; reported by ``info()``
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def listen(self) -> None:
        try:
            os.unlink(self.address)  # a dead server's, in our private dir (its record is gone)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # the socket file: 0600 (its directory is 0700 too)
        try:
            self.sock.bind(self.address)
        finally:
            os.umask(old)
        self.sock.listen(128)

    def run(self) -> NoReturn:
        threading.Thread(target=self.gate.reap, daemon=True).start()
        sys.stdout.write("ready\n")  # to start_server(), waiting for it
        sys.stdout.flush()
        while True:
            self.admit()

    def admit(self) -> None:
        """Accept one connection and hand it to a thread of its own -- unless it is
        another user's, or too many are already handshaking. Never raises: the accept
        loop dying would make the mapping look lost to every process using it."""
        try:
            sock, _ = self.sock.accept()
        except OSError as exc:
            self.back_off("accept", exc, exc.errno not in _PEER_GONE)  # EMFILE, ENFILE, ENOMEM...
            return
        try:
            uid = peer_uid(sock)
        except OSError:
            uid = -1
        if uid != self.uid:
            sock.close()
            self.count("rejected_foreign")
            log.debug("closed a connection from uid %s", uid)
            return
        if not self.gate.enter(sock.fileno()):
            sock.close()
            self.count("rejected_busy")
            return
        conn = Connection(sock.detach())
        try:
            threading.Thread(target=self.connection, args=(conn,), daemon=True).start()
        except RuntimeError as exc:  # can't start new thread
            self.gate.leave(conn.fileno())
            conn.close()
            self.back_off("start a thread", exc, True)

    def connection(self, conn: Connection) -> None:
        """A connection's thread: the handshake, then ``serve``."""
        try:
            if self.admitted(conn):
                self.serve(Session(conn, threading.current_thread(), self.timeout))
        except BaseException:
            log.debug("connection thread failed", exc_info=True)
        finally:
            conn.close()

    def admitted(self, conn: Connection) -> bool:
        """The HMAC challenge both ways, within the gate's time limit; False if it failed."""
        fd = conn.fileno()
        limit = self.gate.limit
        try:
            set_timeouts(conn, limit, limit)
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
        except Exception as exc:  # wrong key, garbage, EOF, reaped by the gate: all the same
            self.count("failed_handshakes")
            log.debug("handshake failed: %s: %s", type(exc).__name__, exc)
            return False
        finally:
            self.gate.leave(fd)  # before any close: the gate knows connections by descriptor
        return True

    def back_off(self, what: str, exc: BaseException, pause: bool) -> None:
        """Count a failure of the accept loop; pause briefly if it was resource exhaustion
        (or unknown), so that the loop neither dies nor spins until it passes."""
        self.count("accept_errors")
        log.debug("could not %s: %s", what, exc)
        if pause:
            time.sleep(ACCEPT_BACKOFF)  # a server shedding load, not waiting on another process

    def count(self, key: str) -> None:
        with self.gate.cond:  # from the accept thread and handshaking threads alike
            self.counts[key] += 1


# ------------------------------------------------------------------ the boot

#: In every server's command line (the manager server's and the queue hub's): how
#: ``_records`` cleanup and ``_lifetime`` recognise a server of ours. Its value is the
#: manager server's module name, which older servers carried: a record they wrote
#: still names a process that this mark proves to be ours.
SERVER_MARK = "shareit.backends._manager_server"
_BOOT = "import sys; sys.path.insert(0, sys.argv[2]); from {module} import main; main()"


#: Servers this process started. A server outlives the handle that started it (others use
#: the mapping), yet stays this process's child: it is kept here, not dropped while
#: running (Python warns about that), and reaped once it has exited.
_started: list[subprocess.Popen[bytes]] = []


def reap_started() -> None:
    """Reap the servers this process started that have exited (one ``waitpid(WNOHANG)``
    each): called when a server is started, and when a manager/queue handle is opened,
    closed or destroyed, so that one exiting by itself is not left a zombie for long."""
    _started[:] = [p for p in _started if p.poll() is None]


_reap_started = reap_started  # (the name the tests use)


def _forget_started_in_child() -> None:
    _started.clear()  # a forked child's: they are its parent's children, not its own


os.register_at_fork(after_in_child=_forget_started_in_child)


def start_server(module: str, params: dict[str, Any], timeout: float) -> subprocess.Popen[bytes]:
    """Start ``module``'s ``main()`` as a server process and wait until it listens
    (BackendUnavailableError, with the exit status, if it does not)."""
    import shareit

    reap_started()

    root = os.path.dirname(os.path.dirname(os.path.abspath(shareit.__file__)))
    # Isolated (-I: no cwd, no PYTHON* variables, no user site) and run from /: with
    # ``python -m`` the caller's working directory would come first on the server's
    # import path, and whoever can write there (/tmp) would run code as the caller.
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", _BOOT.format(module=module), SERVER_MARK, root],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd="/",
        close_fds=True,
        start_new_session=True,  # it outlives its creator while others use the mapping
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(pickle.dumps(params))
    proc.stdin.close()
    deadline = time.monotonic() + max(timeout, 10.0)
    line = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if ready:
            line = proc.stdout.readline()
            break
    proc.stdout.close()
    if line != b"ready\n":
        proc.kill()
        proc.wait()
        raise BackendUnavailableError(
            f"the server process ({module}) did not start (exit status {proc.returncode}); "
            f"see its error output above"
        )
    _started.append(proc)
    return proc


def boot_params() -> dict[str, Any]:
    """In a server process just started by :func:`start_server`: its parameters."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the owner, who shuts us down
    params: dict[str, Any] = pickle.loads(sys.stdin.buffer.read())
    return params
