"""The redis password appears in no repr, message, ``info()`` or log.

Every form a password can take in a URL is tried (userinfo, ``?password=``,
``@`` inside the password, ``unix://``, bytes), against a live server that
requires it and against addresses where nothing answers.
"""

from __future__ import annotations

import logging
import signal
import socket
import traceback
import uuid
from urllib.parse import quote

import pytest

import shareit
from shareit.config import redact_url
from test_redis import free_port, start_tcp_server

#: Distinctive, and with an ``@`` and a ``:``: ``user:pw@`` parsing that splits at the
#: first ``@`` (or ``:``) shows a piece of it. Each piece is checked on its own.
PASSWORD = "Hu:nt@er2Zq"
PIECES = ("Hu:nt@er2Zq", "er2Zq", "Hu:nt", "nt@er")


def assert_no_secret(text: str) -> None:
    for piece in PIECES + (quote(PASSWORD, safe=""),):
        assert piece not in text, f"password piece {piece!r} in: {text}"


def everything_about(err: BaseException) -> str:
    """An error as a user sees it: its str and repr, its traceback, and any chained cause."""
    seen = [str(err), repr(err), "".join(traceback.format_exception(err))]
    for chained in (err.__cause__, err.__context__):
        if chained is not None:
            seen += [str(chained), repr(chained)]
    return "\n".join(seen)


# ------------------------------------------------------------------ redact_url alone


@pytest.mark.parametrize("url, shown", [
    (f"redis://:{PASSWORD}@host:6379/0", "redis://***@host:6379/0"),
    (f"redis://user:{PASSWORD}@host/0", "redis://***@host/0"),
    (f"rediss://:{PASSWORD}@host:6380/2?ssl_cert_reqs=none", "rediss://***@host:6380/2?ssl_cert_reqs=none"),
    (f"redis://host:6379/0?password={PASSWORD}", "redis://host:6379/0?password=***"),
    (f"redis://host/0?db=1&password={PASSWORD}&x=1", "redis://host/0?db=1&password=***&x=1"),
    (f"redis://host/0?password={quote(PASSWORD, safe='')}", "redis://host/0?password=***"),
    (f"redis://host/0?PASSWORD={PASSWORD}", "redis://host/0?PASSWORD=***"),
    (f"redis://host/0?pass%77ord={PASSWORD}", "redis://host/0?pass%77ord=***"),
    (f"redis://host/0?ssl_password={PASSWORD}", "redis://host/0?ssl_password=***"),
    (f"redis://host/0?password={PASSWORD};db=1", "redis://host/0?password=***"),
    (f"unix://:{PASSWORD}@/run/redis.sock?db=1", "unix://***@/run/redis.sock?db=1"),
    (f"unix:///run/redis.sock?db=1&password={PASSWORD}", "unix:///run/redis.sock?db=1&password=***"),
    (f"redis://:ab/cd?{PASSWORD}@host/0", "redis://***@host/0"),
    (f"redis://:{PASSWORD}@host/0?password={PASSWORD}", "redis://***@host/0?password=***"),
    (f"redis://:x?password={PASSWORD}@host/0", "redis://:x?password=***"),
    (f"redis://:{PASSWORD}://@host/0", "redis://***@host/0"),
    (f":{PASSWORD}@host", "***@host"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
])
def test_redact_url_forms(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact_url(url.encode()) == shown, "bytes are decoded, then redacted"
    assert_no_secret(redact_url(url))


def test_redact_url_odd_inputs() -> None:
    assert_no_secret(redact_url(f"redis://:{PASSWORD}\xff@h".encode("latin-1")))
    assert redact_url(None) == "<NoneType>" and redact_url(12) == "<int>"
    assert redact_url("") == ""


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("url", [
    f"redis://:{PASSWORD}@127.0.0.1:6379/0",
    f"redis://127.0.0.1:6379/0?password={PASSWORD}",
    f"unix://:{PASSWORD}@/run/redis.sock",
])
def test_config_repr_hides_the_password(url: str) -> None:
    cfg = shareit.config.resolve("x", {"backend": "redis", "url": url})
    assert cfg.url == url, "the value itself is intact"
    assert_no_secret(repr(cfg))
    assert_no_secret(str(cfg))
    assert_no_secret(repr(cfg.sources))
    assert "url='" in repr(cfg) and "***" in repr(cfg)


def test_bytes_url_is_refused_without_echo() -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:6379/0".encode()
    with pytest.raises(shareit.ConfigError, match="'url' must be a string") as err:
        shareit.open(backend="redis", url=url)
    assert_no_secret(everything_about(err.value))


def test_unparsable_url_is_a_config_error_without_echo() -> None:
    with pytest.raises(shareit.ConfigError, match="is not a redis URL") as err:
        shareit.open(backend="redis", url=f"redis://:{PASSWORD}@127.0.0.1:notaport/0")
    assert_no_secret(everything_about(err.value))


# ------------------------------------------------------------------ nothing answers


def silent_listener() -> socket.socket:
    """A loopback socket that accepts connections (the kernel does) but never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def _urls(host_port: str) -> list[str]:
    return [
        f"redis://:{PASSWORD}@{host_port}/0",
        f"redis://user:{PASSWORD}@{host_port}/0",
        f"redis://{host_port}/0?password={quote(PASSWORD, safe='')}",
        f"redis://{host_port}/0?db=0&password={quote(PASSWORD, safe='')}",
    ]


@pytest.mark.parametrize("form", range(4))
def test_unreachable_server_messages_hide_the_password(form: int, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    url = _urls(f"127.0.0.1:{free_port()}")[form]  # nothing listens there
    with pytest.raises(shareit.BackendDiedError) as err:
        shareit.open(f"s-{uuid.uuid4().hex[:8]}", backend="redis", url=url, timeout=0.5)
    assert not isinstance(err.value, shareit.BackendTimeoutError)
    assert "unreachable" in str(err.value)
    assert_no_secret(everything_about(err.value))
    assert_no_secret(caplog.text)


@pytest.mark.parametrize("form", range(4))
def test_silent_server_timeout_messages_hide_the_password(form: int, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with silent_listener() as s:
        url = _urls(f"127.0.0.1:{s.getsockname()[1]}")[form]
        with pytest.raises(shareit.BackendTimeoutError) as err:
            shareit.open(f"s-{uuid.uuid4().hex[:8]}", backend="redis", url=url, timeout=0.5)
    assert "did not answer within" in str(err.value)
    assert_no_secret(everything_about(err.value))
    assert_no_secret(caplog.text)


def test_unix_socket_url_messages_hide_the_password(tmp_path) -> None:
    for url in (f"unix://:{PASSWORD}@{tmp_path}/none.sock",
                f"unix://{tmp_path}/none.sock?password={quote(PASSWORD, safe='')}"):
        with pytest.raises(shareit.BackendDiedError) as err:
            shareit.open(backend="redis", url=url, timeout=0.5)
        assert_no_secret(everything_about(err.value))


# ------------------------------------------------------------------ a live server that needs it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    proc = start_tcp_server(str(tmp_path_factory.mktemp("redis")), port, "--requirepass", PASSWORD)
    yield port, proc
    if proc.poll() is None:
        proc.terminate()
    proc.wait(30)


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_live_mapping_shows_no_password(server, form: str, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    port, _ = server
    url = (f"redis://:{PASSWORD}@127.0.0.1:{port}/0" if form == "userinfo"
           else f"redis://127.0.0.1:{port}/0?password={quote(PASSWORD, safe='')}")
    name = f"s-{uuid.uuid4().hex[:8]}"
    d = shareit.open(name, backend="redis", url=url, timeout=2.0)
    try:
        d["a"] = [1]
        assert d["a"] == [1], "the password in the URL works, @ and all"
        other = shareit.open(name, backend="redis", url=url, create=False)
        for m in (d, other):
            shown = [repr(m), str(m), repr(m.config), str(m.config), repr(m.info()),
                     str(m.config.sources)]
            for text in shown:
                assert_no_secret(text)
        assert d.info()["url"].startswith("redis://") and "***" in d.info()["url"]
        other.close()
        with pytest.raises(shareit.NotFoundError) as err:
            shareit.open(f"absent-{uuid.uuid4().hex[:8]}", backend="redis", url=url, create=False)
        assert_no_secret(everything_about(err.value))
        other = shareit.open(name, backend="redis", url=url, create=False)
        other.destroy()
        with pytest.raises(shareit.BackendDiedError, match="destroyed") as err:
            d["a"]
        assert_no_secret(everything_about(err.value))
    finally:
        d.close()
    assert_no_secret(caplog.text)


def test_wrong_password_is_refused_without_echo(server, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    port, _ = server
    with pytest.raises(shareit.BackendDiedError) as err:
        shareit.open(backend="redis", url=f"redis://:{PASSWORD}x@127.0.0.1:{port}/0", timeout=1.0)
    assert_no_secret(everything_about(err.value))
    assert_no_secret(caplog.text)


def test_dead_server_messages_hide_the_password(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    proc = start_tcp_server(str(tmp_path), port, "--requirepass", PASSWORD)
    try:
        d = shareit.open(backend="redis", url=f"redis://:{PASSWORD}@127.0.0.1:{port}/0",
                         timeout=0.5)
        d["a"] = 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    for op in (lambda: d["a"], lambda: d.__setitem__("b", 2), d.info, d.snapshot, lambda: len(d),
               lambda: d.incr("a"), lambda: d.transform("a", lambda v: v), d.close):
        with pytest.raises(shareit.BackendDiedError) as err:
            op()
        assert_no_secret(everything_about(err.value))
    assert_no_secret(repr(d))
    assert_no_secret(repr(d.config))
    assert_no_secret(caplog.text)
