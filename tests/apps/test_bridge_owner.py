"""``aioxen bridge`` listeners have one owner (issue 13, finding 2), every process real.

A second ``--listen vchan:2/web`` or ``--listen unix:PATH`` fails with rc 1 and one line
naming the holder; the first keeps working and keeps its advertisement / socket after the
second exits.  A killed bridge's socket is reclaimed; links, non-sockets and other users'
sockets are never replaced.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from apps_harness import AIOXEN
from support.xenstored import XenstoredProcess

from aioxen.platforms.unix import root_leaks

pytestmark = pytest.mark.crossprocess


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server in a thread of the test process."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class Bridge:
    """``aioxen bridge`` in the background; waits for its "listening on" line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*AIOXEN, "bridge", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        m = re.fullmatch(r"aioxen bridge: listening on (\S+)\n", line)
        assert m, (line, self.proc.poll())
        self.address = m.group(1)

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err.decode()


def run_bridge(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    p = subprocess.run(
        [*AIOXEN, "bridge", *args], capture_output=True, timeout=60, check=False, env=env
    )
    assert p.stdout == b""
    return p.returncode, p.stderr.decode()


def exchange(connect: int | str, payload: bytes) -> bytes:
    """Send ``payload`` to a Unix socket path or a local TCP port, return the echo."""
    family = socket.AF_UNIX if isinstance(connect, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(connect if isinstance(connect, str) else ("127.0.0.1", connect))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while data := s.recv(65536):
            out += data
    return out


def tcp_port(address: str) -> int:
    m = re.fullmatch(r"tcp:127\.0\.0\.1:(\d+)", address)
    assert m, address
    return int(m.group(1))


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_second_vchan_listener_is_refused(
    xenstored: XenstoredProcess, echo_port: int, tmp_path: Path
) -> None:
    offer_args = ["--listen", "vchan:2/web", "--connect", f"tcp:127.0.0.1:{echo_port}"]
    offer = Bridge(offer_args, env=xenstored.env(0))
    use: Bridge | None = None
    try:
        rc, err = run_bridge(offer_args, env=xenstored.env(0))
        assert rc == 1, err
        line = one_error_line(err)
        assert line.startswith("aioxen bridge: cannot listen on vchan:2/web: "), line
        assert f"in use by pid {offer.proc.pid}" in line, line
        assert "/local/domain/0/data/vchan/2/web" in line, line
        # the first bridge still advertises and serves (through a client-side bridge)
        read = subprocess.run(
            [*AIOXEN, "xenstore", "read", "/local/domain/0/data/vchan/2/web/ring-ref"],
            capture_output=True,
            timeout=60,
            check=False,
            env=xenstored.env(0),
        )
        assert read.returncode == 0 and read.stdout.strip().isdigit(), read
        use = Bridge(
            ["--listen", "tcp:127.0.0.1:0", "--connect", "vchan:0/web"], env=xenstored.env(2)
        )
        port = tcp_port(use.address)
        for i in range(2):
            payload = os.urandom(100_000 + i)
            assert exchange(port, payload) == payload
        rc, err = use.stop()
        assert rc == 143, err
        rc, err = offer.stop()
        assert rc == 143, err
        gone = subprocess.run(
            [*AIOXEN, "xenstore", "ls", "/local/domain/0/data/vchan/2"],
            capture_output=True,
            timeout=60,
            check=False,
            env=xenstored.env(0),
        )
        assert b"web" not in gone.stdout
        assert root_leaks(str(xenstored.root)) == []
    finally:
        for b in (use, offer):
            if b is not None:
                b.stop()


def test_second_unix_listener_is_refused(echo_port: int, tmp_path: Path) -> None:
    sock = str(tmp_path / "web.sock")
    args = ["--listen", f"unix:{sock}", "--connect", f"tcp:127.0.0.1:{echo_port}"]
    first = Bridge(args)
    try:
        inode = os.stat(sock).st_ino
        rc, err = run_bridge(args)
        assert rc == 1, err
        line = one_error_line(err)
        assert line.startswith(f"aioxen bridge: cannot listen on unix:{sock}: "), line
        assert f"in use by pid {first.proc.pid}" in line, line
        # the socket is still the first's, and still works
        assert os.stat(sock).st_ino == inode
        assert exchange(sock, b"still here") == b"still here"
        rc, err = first.stop()
        assert (rc, err) == (143, "")
        assert not os.path.exists(sock) and not os.path.exists(sock + ".lock")
    finally:
        first.stop()


def test_live_socket_of_another_program_is_not_replaced(echo_port: int, tmp_path: Path) -> None:
    """No lock file, but something accepts connections on PATH: in use."""
    sock = str(tmp_path / "other.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(sock)
        listener.listen()
        rc, err = run_bridge(
            ["--listen", f"unix:{sock}", "--connect", f"tcp:127.0.0.1:{echo_port}"]
        )
        assert rc == 1, err
        assert "is in use" in one_error_line(err)
        assert os.path.exists(sock)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(sock)  # still the other program's listener
    os.unlink(sock)


def test_killed_bridge_socket_is_reclaimed(echo_port: int, tmp_path: Path) -> None:
    sock = str(tmp_path / "k.sock")
    args = ["--listen", f"unix:{sock}", "--connect", f"tcp:127.0.0.1:{echo_port}"]
    first = Bridge(args)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    first.stop()
    assert os.path.exists(sock)  # left behind, nobody listens
    second = Bridge(args)
    try:
        assert exchange(sock, b"reclaimed") == b"reclaimed"
    finally:
        rc, err = second.stop()
    assert (rc, err) == (143, "")
    assert not os.path.exists(sock)


def test_links_files_and_foreign_sockets_are_refused(echo_port: int, tmp_path: Path) -> None:
    connect = ["--connect", f"tcp:127.0.0.1:{echo_port}"]
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    rc, err = run_bridge(["--listen", f"unix:{plain}", *connect])
    assert rc == 1 and "is not a socket" in one_error_line(err), err
    assert plain.read_text() == "keep me"

    # a stale socket reached through a symbolic link is not followed or replaced
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))
    link = tmp_path / "link.sock"
    link.symlink_to(stale)
    rc, err = run_bridge(["--listen", f"unix:{link}", *connect])
    assert rc == 1 and "symbolic link" in one_error_line(err), err
    assert link.is_symlink() and stale.exists()

    # a lock file planted as a link is refused too (nothing written through it)
    target = tmp_path / "target"
    target.write_text("untouched")
    (tmp_path / "x.sock.lock").symlink_to(target)
    rc, err = run_bridge(["--listen", f"unix:{tmp_path / 'x.sock'}", *connect])
    assert rc == 1 and "symbolic link" in one_error_line(err), err
    assert target.read_text() == "untouched"

    if os.geteuid() == 0:  # CI runs as root: another user's stale socket is left alone
        foreign = tmp_path / "foreign.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(foreign))
        os.chown(foreign, 4242, 4242)
        rc, err = run_bridge(["--listen", f"unix:{foreign}", *connect])
        assert rc == 1 and "not ours" in one_error_line(err), err
        assert foreign.exists() and foreign.stat().st_uid == 4242

    # a stale socket of ours is replaced
    rc_bridge = Bridge(["--listen", f"unix:{stale}", *connect])
    try:
        assert exchange(str(stale), b"ok") == b"ok"
    finally:
        rc, err = rc_bridge.stop()
    assert (rc, err) == (143, "")


def test_tcp_port_in_use_is_one_clean_line(echo_port: int) -> None:
    rc, err = run_bridge(
        ["--listen", f"tcp:127.0.0.1:{echo_port}", "--connect", f"tcp:127.0.0.1:{echo_port}"]
    )
    assert rc == 1, err
    line = one_error_line(err)
    assert line.startswith(f"aioxen bridge: cannot listen on tcp:127.0.0.1:{echo_port}: "), line
    assert "address already in use" in line and "Errno" not in line, line
