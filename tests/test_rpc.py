"""The protocol module shared by the manager server and the queue hub (``backends._rpc``)."""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection

import pytest

import shareit
from shareit.backends import _rpc


def _pair() -> tuple[Connection, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(a.detach()), b


def test_the_frame_reader_reads_what_a_connection_writes_however_it_arrives() -> None:
    writer, sock = _pair()
    try:
        msgs = [("set", "k", 1), b"x" * 200_000, {"n": list(range(1000))}]
        for msg in msgs:
            writer.send_bytes(_rpc.encode(msg))
        reader = _rpc.FrameReader(sock.fileno())
        got: list[object] = []
        while len(got) < len(msgs):
            got += reader.read(5.0)
        assert got == msgs and reader.read(0) == []  # nothing more, and no wait for it
    finally:
        writer.close()
        sock.close()


def test_the_frame_reader_keeps_a_partial_frame_until_the_rest_arrives() -> None:
    raw_writer, sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        body = _rpc.encode(("change", 7))
        frame = len(body).to_bytes(4, "big") + body
        reader = _rpc.FrameReader(sock.fileno())
        for i in range(len(frame) - 1):  # every byte but the last, one at a time
            raw_writer.send(frame[i:i + 1])
            assert reader.read(0) == []
        raw_writer.send(frame[-1:] + frame)  # the end of one, and a whole second one
        got: list[object] = []
        while len(got) < 2:
            got += reader.read(5.0)
        assert got == [("change", 7), ("change", 7)]
        raw_writer.close()
        with pytest.raises(EOFError):
            reader.read(5.0)
    finally:
        raw_writer.close()
        sock.close()


def _cmdline(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


@pytest.mark.parametrize("backend,module", [("manager", "_manager_server"),
                                            ("queue", "_queue_hub")])
def test_each_server_boots_from_its_own_module_isolated_and_marked(backend, module) -> None:
    d = shareit.open(backend=backend, timeout=5)
    try:
        cmd = _cmdline(d.info()["pid"])
        assert cmd[1] == b"-I" and f"from shareit.backends.{module} import main".encode() in cmd[3]
        assert _rpc.SERVER_MARK.encode() in cmd  # how records and lifetime recognise it
        assert os.readlink(f"/proc/{d.info()['pid']}/cwd") == "/"
    finally:
        d.close()
