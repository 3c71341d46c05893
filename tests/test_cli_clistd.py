"""The pieces of the CLI standard, :mod:`aioxen.apps.clistd`, one by one (in process;
the commands that use them are covered by test_cli_standard.py and test_cli_daemons.py)."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from aioxen.apps import clistd
from aioxen.apps.addresses import TcpAddress, UnixAddress, VchanAddress, parse_address


@pytest.mark.parametrize(
    ("fn", "text", "value"),
    [
        (clistd.domid, "0", 0),
        (clistd.domid, "32751", 32751),
        (clistd.domid, "0x10", 16),
        (clistd.tcp_port, "1", 1),
        (clistd.tcp_port, "65535", 65535),
        (clistd.tcp_port_or_any, "0", 0),
        (clistd.vchan_port, "web-1_x", "web-1_x"),
        (clistd.vchan_port, "p" * 64, "p" * 64),
        (clistd.size, "4096", 4096),
        (clistd.size, "64k", 65536),
        (clistd.size, "1M", 1 << 20),
        (clistd.size, "2GiB", 2 << 30),
        (clistd.seconds, "0.5", 0.5),
        (clistd.positive_int, "3", 3),
        (clistd.nonnegative_int, "0", 0),
        (clistd.size_in(1, 1 << 20, "ring size"), "64k", 65536),
        (clistd.size_in(1, 1 << 20, "ring size"), "0x1000", 4096),
    ],
)
def test_validators_accept(fn: object, text: str, value: object) -> None:
    assert callable(fn)
    assert fn(text) == value


@pytest.mark.parametrize(
    ("fn", "text", "says"),
    [
        (clistd.domid, "-1", "out of range 0..32751"),
        (clistd.domid, "32752", "out of range"),  # DOMID_FIRST_RESERVED: DOMID_SELF & co
        (clistd.domid, "0x7ff0", "out of range"),
        (clistd.domid, "dom0", "not a whole number"),
        (clistd.tcp_port, "0", "1..65535"),
        (clistd.tcp_port, "65536", "1..65535"),
        (clistd.tcp_port_or_any, "99999", "0..65535"),
        (clistd.vchan_port, "p" * 65, "at most 64"),
        (clistd.vchan_port, "a b", "[A-Za-z0-9_-]+"),
        (clistd.vchan_port, "", "[A-Za-z0-9_-]+"),
        (clistd.size, "0", "positive"),
        (clistd.size, "-5", "invalid size"),
        (clistd.size, "lots", "invalid size"),
        (clistd.seconds, "0", "positive"),
        (clistd.seconds, "-1", "positive"),
        (clistd.seconds, "nan", "positive"),
        (clistd.seconds, "inf", "positive"),
        (clistd.seconds, "soon", "invalid number of seconds"),
        (clistd.positive_int, "0", "1 or more"),
        (clistd.inherited_fd, "2", "3 or above"),
        (clistd.size_in(1, 1 << 20, "ring size"), "2M", "ring size 2097152 out of range"),
        (clistd.size_in(1, 1 << 20, "ring size"), "0", "out of range 1..1048576"),
    ],
)
def test_validators_refuse(fn: object, text: str, says: str) -> None:
    assert callable(fn)
    with pytest.raises(argparse.ArgumentTypeError, match=None) as info:
        fn(text)
    assert says in str(info.value)


def test_inherited_fd_must_be_open() -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        assert clistd.inherited_fd(str(r)) == r if r >= 3 else True
    finally:
        os.close(r)
    with pytest.raises(argparse.ArgumentTypeError, match="Bad file descriptor"):
        clistd.inherited_fd(str(r))


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("tcp:127.0.0.1:80", TcpAddress("127.0.0.1", 80)),
        ("127.0.0.1:80", TcpAddress("127.0.0.1", 80)),
        ("localhost:8080", TcpAddress("localhost", 8080)),
        ("tcp:[::1]:80", TcpAddress("::1", 80)),
        ("[::1]:80", TcpAddress("::1", 80)),
        ("unix:/run/x.sock", UnixAddress("/run/x.sock")),
        ("vchan:2/web", VchanAddress(2, "web")),
    ],
)
def test_addresses(text: str, address: object) -> None:
    assert clistd.address(text) == address
    assert clistd.listen_address(text) == address


def test_port_zero_only_where_listening() -> None:
    assert clistd.listen_address("tcp:127.0.0.1:0") == TcpAddress("127.0.0.1", 0)
    with pytest.raises(argparse.ArgumentTypeError, match=r"1\.\.65535"):
        clistd.connect_address("tcp:127.0.0.1:0")
    # the library's own parser keeps its old behaviour (scheme required, port 0 allowed)
    assert parse_address("tcp:h:0") == TcpAddress("h", 0)
    with pytest.raises(ValueError, match="unknown scheme"):
        parse_address("h:80")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("garbage", "expected tcp:HOST:PORT"),
        ("tcp:127.0.0.1:99999", "out of range"),
        ("tcp:127.0.0.1:http", "not a number"),
        ("tcp:::1:80", "brackets"),
        ("unix:", "expected unix:PATH"),
        ("vchan:2", "expected vchan:DOMID/PORT"),
        ("vchan:x/web", "not a number"),
        ("vchan:32752/web", "out of range"),
        ("vchan:2/" + "p" * 4000, "at most 64"),
    ],
)
def test_bad_addresses(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as info:
        clistd.address(text)
    assert says in str(info.value)
    assert len(str(info.value)) < 300  # a long input is not echoed in full


def test_plain() -> None:
    text = "Use ``aioxen cat``, :func:`aioxen.platform` and [`StopSignals`][] or [`x`][a.b]::"
    assert clistd.plain(text) == "Use aioxen cat, aioxen.platform and StopSignals or x:"


def test_describe() -> None:
    assert clistd.describe(TimeoutError()) == "timed out"
    assert clistd.describe(TimeoutError("no reply within 3 s")) == "no reply within 3 s"
    exc = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")
    assert clistd.describe(exc) == "/x: No such file or directory"
    assert clistd.describe(OSError(errno.EADDRINUSE, "Address in use")) == "Address in use"
    assert clistd.describe(ValueError()) == "ValueError"


def test_export_lines_are_quoted() -> None:
    text = clistd.export_lines({"A": "/tmp/a b", "B": "x'y"})
    assert text == "A='/tmp/a b'; export A;\nB='x'\"'\"'y'; export B;\n"


def test_notify_ready_every_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        r, w = os.pipe()
        env_file = tmp_path / "env"
        args = argparse.Namespace(env_file=str(env_file), ready_fd=w)
        ready = clistd.notify_ready(args, exports={"X": "1"}, status="up")
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(w)  # closed by notify_ready
        with os.fdopen(r, "rb") as f:
            assert f.read() == b"X=1; export X;\n"
        assert env_file.read_text() == "X=1; export X;\n"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
        ready.stopping()
        assert sock.recv(100) == b"STOPPING=1"
        assert not env_file.exists()


def test_stopping_leaves_a_replaced_env_file_alone(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    ready = clistd.notify_ready(argparse.Namespace(env_file=str(env_file), ready_fd=None))
    env_file.unlink()
    env_file.write_text("another daemon's\n")  # a successor wrote its own
    ready.stopping()
    assert env_file.read_text() == "another daemon's\n"


def test_unwritable_env_file_is_a_command_error(tmp_path: Path) -> None:
    args = argparse.Namespace(env_file=str(tmp_path / "missing" / "env"), ready_fd=None)
    with pytest.raises(clistd.CommandError, match=r"--env-file .*missing/env"):
        clistd.notify_ready(args)


def test_no_notify_socket_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert clistd.sd_notify("READY=1") is False
    with pytest.raises(OSError, match="not a Unix socket path"):
        clistd.sd_notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:5"})
