"""aioxen's daemon and agent over vchan-socket against peers replaying Qubes' C programs.

CI has no Qubes binaries, so the peers here are small raw-socket Python processes (no
aioxen code) that do on the wire what Qubes' own programs were observed to do.  The
observation: QubesOS/qubes-core-qrexec (HEAD b2822df) and qubes-core-vchan-socket (HEAD
e1da6da) built beside the project, run unprivileged over vchan-socket against aioxen's
``Daemon``/``Agent`` with a recording ``VchanSocketChannels``; the recorded messages (all
little-endian ``{u32 type, u32 len}`` + body):

aioxen Daemon (dom0) <-> Qubes ``qrexec-agent`` (domain 1), a call of ``test.Svc+arg``
whose script prints ``he\\n`` to stdout, ``E\\n`` to stderr and exits 7::

    ctl  (vchan.1.0.512: agent listens, daemon connects)   HELLO {4} both ways
    ctl  daemon -> agent  EXEC_CMDLINE {0, 513, "user:QUBESRPC test.Svc+arg dom0\\0"}
    data (vchan.0.1.513: dom0 listens, the agent connects)  HELLO {4} both ways
    data dom0 -> agent    DATA_STDIN "hello", DATA_STDIN ""
    data agent -> dom0    DATA_STDOUT "he", DATA_STDOUT "\\n", DATA_STDOUT "",
                          DATA_STDERR "E\\n", DATA_STDERR "", DATA_EXIT_CODE {7}
    ctl  agent -> daemon  CONNECTION_TERMINATED {0, 513}

Qubes ``qrexec-daemon`` + ``qrexec-client`` (dom0) <-> aioxen Agent (domain 1)::

    ctl  HELLO {4} both ways; daemon -> agent EXEC_CMDLINE {0, 513,
         "user:QUBESRPC test.Py+a dom0\\0"}  (qrexec-client's request, relayed)
    data (vchan.0.1.513: qrexec-client listens, the agent connects) HELLO both ways;
         client -> agent DATA_STDIN "ping", DATA_STDIN ""; agent -> client DATA_STDOUT
         "ping", DATA_STDOUT "", DATA_STDERR "", DATA_EXIT_CODE {3}
    ctl  agent -> daemon CONNECTION_TERMINATED {0, 513}
    VM -> dom0 call allowed:  agent -> daemon TRIGGER_SERVICE4 {source[64] "",
         target[64] "dom0", ident[32] "SOCKET1", "test.Dom0+q\\0"};
         daemon -> agent SERVICE_CONNECT {0, 513, ident[32]}; data vchan.1.0.513
         (the agent, the caller, listens); the dom0 side sends DATA_STDERR "" first,
         then DATA_STDOUT..., DATA_STDOUT "", DATA_EXIT_CODE {6}
    refused:  daemon -> agent SERVICE_REFUSED {ident[32]}  (the call's status: 126)

The same exchanges (and 1 MiB of data each way) were also run with aioxen capped at protocol
versions 2 and 3 (HELLO {2}/{3}, TRIGGER_SERVICE / TRIGGER_SERVICE3); all passed.  The peers
below take the version as a parameter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from aioxen.qrexec.agent import Agent, ServiceRequest
from aioxen.qrexec.client import call
from aioxen.qrexec.daemon import Daemon
from aioxen.qrexec.vchan_socket import VchanSocketChannels

HANG = 60.0
PEER = [sys.executable, __file__]


async def _finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    _, err = await asyncio.wait_for(proc.communicate(), HANG)
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


async def _start_peer(role: str, vdir: Path, version: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *PEER,
        role,
        str(vdir),
        str(version),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.fixture
def vdir(tmp_path: Path) -> Path:
    d = tmp_path / "vchan"
    d.mkdir(mode=0o700)
    return d


@pytest.mark.parametrize("version", [2, 3, 4])
async def test_aioxen_daemon_against_a_qubes_style_agent(vdir: Path, version: int) -> None:
    peer = await _start_peer("agent", vdir, version)
    async with Daemon(VchanSocketChannels(vdir, 0), domains={"vm1": 1}) as daemon:
        await daemon.wait_connected("vm1", timeout=HANG)
        result = await call("vm1", "test.Svc+arg", input=b"hello", via=daemon, timeout=HANG)
        rc, err = await _finish(peer)
    assert rc == 0, err
    assert (result.stdout, result.stderr, result.exit_code) == (b"he\n", b"E\n", 7)


@pytest.mark.parametrize("version", [2, 3, 4])
async def test_aioxen_agent_against_a_qubes_style_daemon_and_client(
    vdir: Path, version: int
) -> None:
    agent = Agent(VchanSocketChannels(vdir, 1))

    @agent.service("test.Py")
    async def echo(stdin: asyncio.StreamReader, stdout: Any, request: ServiceRequest) -> int:
        data = await stdin.read()
        stdout.write(data)
        assert (request.argument, request.source) == ("a", "dom0")
        return 3

    async with agent:
        await agent.wait_listening(HANG)
        peer = await _start_peer("daemon", vdir, version)
        assert peer.stdout is not None
        assert await asyncio.wait_for(peer.stdout.readline(), HANG) == b"exec done\n"
        allowed = await agent.call("dom0", "test.Dom0+q", input=b"abc", timeout=HANG)
        refused = await agent.call("dom0", "test.Deny", timeout=HANG)
        rc, err = await _finish(peer)
    assert rc == 0, err
    assert (allowed.stdout, allowed.exit_code) == (b"abc" * 1000, 6)
    assert refused.exit_code == 126


# -- the peers: raw sockets and struct only ------------------------------------------------

HELLO, EXEC_CMDLINE, SERVICE_CONNECT, SERVICE_REFUSED = 0x300, 0x200, 0x202, 0x203
TRIGGER = {2: 0x210, 3: 0x212, 4: 0x213}
CONNECTION_TERMINATED = 0x211
STDIN, STDOUT, STDERR, EXIT_CODE = 0x190, 0x191, 0x192, 0x193
CHUNK = {2: 4096, 3: 65536, 4: 65536}


class Wire:
    """One vchan-socket stream as libvchan-socket makes it (see test_vchan_socket.py)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def serve(cls, path: str) -> Wire:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the C server removes whatever is there first
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        conn, _ = listener.accept()
        listener.close()
        return cls(conn)

    @classmethod
    def connect(cls, path: str) -> Wire:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                sock.connect(path)
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.0001)

    def send(self, t: int, body: bytes = b"") -> None:
        self.sock.sendall(struct.pack("<II", t, len(body)) + body)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"peer closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def recv(self) -> tuple[int, bytes]:
        t, n = struct.unpack("<II", self._exact(8))
        return t, self._exact(n)

    def expect(self, t: int, body: bytes | None = None) -> bytes:
        got_t, got = self.recv()
        if got_t != t or (body is not None and got != body):
            raise AssertionError(f"expected {t:#x} {body!r}, got {got_t:#x} {got[:120]!r}")
        return got

    def hello(self, version: int, *, first: bool) -> None:
        if first:
            self.send(HELLO, struct.pack("<I", version))
        self.expect(HELLO)  # the other side's version; both use the lower
        if not first:
            self.send(HELLO, struct.pack("<I", version))

    def close(self) -> None:
        self.sock.close()


def _collect(w: Wire, version: int) -> tuple[bytes, bytes, int]:
    """Read a service side's DATA_STDOUT/DATA_STDERR (EOF each) until DATA_EXIT_CODE,
    checking the version's chunk limit."""
    out, err = b"", b""
    eof: set[int] = set()
    while True:
        t, body = w.recv()
        if t == EXIT_CODE:
            assert eof == {STDOUT, STDERR}, f"exit code before both EOFs ({eof})"
            return out, err, struct.unpack("<i", body)[0]
        assert t in (STDOUT, STDERR) and t not in eof, f"unexpected {t:#x} {body[:40]!r}"
        assert len(body) <= CHUNK[version], f"chunk of {len(body)} > {CHUNK[version]}"
        if not body:
            eof.add(t)
        elif t == STDOUT:
            out += body
        else:
            err += body


def _peer_agent(d: str, version: int) -> None:
    """Qubes' qrexec-agent as domain 1, one call (see the module docstring)."""
    ctl = Wire.serve(f"{d}/vchan.1.0.512.sock")
    ctl.hello(version, first=True)
    body = ctl.expect(EXEC_CMDLINE)
    domain, port = struct.unpack("<II", body[:8])
    assert (domain, body[8:]) == (0, b"user:QUBESRPC test.Svc+arg dom0\0"), body
    assert port >= 513, port
    data = Wire.connect(f"{d}/vchan.0.1.{port}.sock")
    data.hello(version, first=False)
    stdin = b""
    while chunk := data.expect(STDIN):
        stdin += chunk
    assert stdin == b"hello", stdin
    for t, b in ((STDOUT, b"he"), (STDOUT, b"\n"), (STDOUT, b""), (STDERR, b"E\n"), (STDERR, b"")):
        data.send(t, b)
    data.send(EXIT_CODE, struct.pack("<I", 7))
    data.close()
    ctl.send(CONNECTION_TERMINATED, struct.pack("<II", 0, port))
    ctl.close()


def _trigger(body: bytes, version: int) -> tuple[str, str, bytes]:
    """(service, target, ident) of a TRIGGER_SERVICE* body."""
    if version == 2:
        service, target, ident = struct.unpack("<64s32s32s", body)
        return service.rstrip(b"\0").decode(), target.rstrip(b"\0").decode(), ident
    if version == 3:
        target, ident = struct.unpack("<64s32s", body[:96])
        rest = body[96:]
    else:
        source, target, ident = struct.unpack("<64s64s32s", body[:160])
        assert source == b"\0" * 64, source
        rest = body[160:]
    assert rest.endswith(b"\0") and b"\0" not in rest[:-1], rest
    return rest[:-1].decode(), target.rstrip(b"\0").decode(), ident


def _peer_daemon(d: str, version: int) -> None:
    """Qubes' qrexec-daemon (+ qrexec-client) for domain 1 (see the module docstring)."""
    ctl = Wire.connect(f"{d}/vchan.1.0.512.sock")
    ctl.hello(version, first=False)
    # qrexec-client -d vm1 'user:QUBESRPC test.Py+a dom0', 200 KiB of stdin
    port = 513
    ctl.send(EXEC_CMDLINE, struct.pack("<II", 0, port) + b"user:QUBESRPC test.Py+a dom0\0")
    data = Wire.serve(f"{d}/vchan.0.1.{port}.sock")
    data.hello(version, first=True)
    payload = bytes(range(256)) * 800
    for i in range(0, len(payload), CHUNK[version]):
        data.send(STDIN, payload[i : i + CHUNK[version]])
    data.send(STDIN)
    assert _collect(data, version) == (payload, b"", 3)
    data.close()
    ctl.expect(CONNECTION_TERMINATED, struct.pack("<II", 0, port))
    print("exec done", flush=True)
    # the agent's call of dom0's test.Dom0+q: allowed; the dom0 side answers
    service, target, ident = _trigger(ctl.expect(TRIGGER[version]), version)
    assert (service, target) == ("test.Dom0+q", "dom0"), (service, target)
    port = 514
    ctl.send(SERVICE_CONNECT, struct.pack("<II", 0, port) + ident)
    data = Wire.connect(f"{d}/vchan.1.0.{port}.sock")
    data.hello(version, first=False)
    data.send(STDERR)
    stdin = b""
    while chunk := data.expect(STDIN):
        stdin += chunk
    assert stdin == b"abc", stdin
    for i in range(0, 3000, CHUNK[version]):
        data.send(STDOUT, (b"abc" * 1000)[i : i + CHUNK[version]])
    data.send(STDOUT)
    data.send(EXIT_CODE, struct.pack("<I", 6))
    data.close()
    ctl.expect(CONNECTION_TERMINATED, struct.pack("<II", 0, port))
    # ... and test.Deny: refused
    service, target, ident = _trigger(ctl.expect(TRIGGER[version]), version)
    assert service == "test.Deny", service
    ctl.send(SERVICE_REFUSED, ident)
    ctl.close()


if __name__ == "__main__":
    role, directory, ver = sys.argv[1], sys.argv[2], int(sys.argv[3])
    (_peer_agent if role == "agent" else _peer_daemon)(directory, ver)
    sys.exit(0)
