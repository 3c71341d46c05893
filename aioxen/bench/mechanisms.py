"""The byte-stream mechanisms compared by the ``streams`` and ``protocol`` suites.

Each mechanism can be opened two ways by *identical* benchmark code:

* streams: ``(StreamReader, StreamWriter)`` pairs;
* protocols: ``transport, protocol = await mech.create_connection(factory)`` on the client,
  ``await mech.serve_protocol(factory)`` on the server.

Two-process mechanisms run the server in a child process ([`aioxen.bench.peer`][]) that
prints ``READY <address>`` once it listens.  ``vchan-inheap`` runs both ends in one process
on one loop (that is what the ``inheap`` platform is for).

Baselines: asyncio TCP loopback, Unix stream sockets and ``os.pipe`` pairs.  Ours: vchan on
the ``unix`` platform (two processes, one ``aioxen xenstored``) and on ``inheap``, with the
library's defaults (ring size, busy-poll window) -- what users get.  Variants with a
non-default setting are mechanisms of their own whose [`Mechanism.note`][] says so beside
every figure: ``vchan/unix 1 MiB rings`` and ``vchan/unix no-poll`` (busy-polling off, as
the poll policy itself turns it off when the CPUs are contended; the harness compares it
with ``vchan/unix`` to flag figures that need a free core, see
[`aioxen.bench.harness.NO_POLL`][]).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aioxen.bench.harness import NO_POLL, end_process, make_temp_dir, shm_dir, spawn

StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]
StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

VCHAN_PORT = "bench"
VCHAN_PORT_1M = "bench-1m"
"""The ``setup`` peer serves default-size rings on [`VCHAN_PORT`][] and 1 MiB rings here."""
VCHAN_SERVER_DOMID = 0
VCHAN_CLIENT_DOMID = 1
RING_SIZE = 1 << 20
BUSY_POLL_ENV = "AIOXEN_VCHAN_BUSY_POLL"
"""The library's environment override of the default busy-poll window (seconds)."""


@dataclass
class Mechanism:
    """One way of moving bytes.  ``kind`` is the transport (``name`` unless this is a
    variant of it); a vchan variant has a ``port`` of its own (each peer process claims
    its ports exclusively), ``ring_size`` (``None``: the library's default), ``env``
    for both processes, and a ``note`` shown beside its figures when a setting is not
    the default."""

    name: str
    ours: bool
    two_process: bool = True
    env: dict[str, str] = field(default_factory=dict)
    kind: str = ""
    port: str = VCHAN_PORT
    ring_size: int | None = None
    note: str = ""

    def __post_init__(self) -> None:
        self.kind = self.kind or self.name


VCHAN_1M = "vchan/unix 1 MiB rings"
VCHAN_NO_POLL = "vchan/unix" + NO_POLL

MECHANISMS: dict[str, Mechanism] = {
    "vchan/unix": Mechanism("vchan/unix", ours=True),
    "vchan/inheap": Mechanism("vchan/inheap", ours=True, two_process=False),
    "tcp": Mechanism("tcp", ours=False),
    "unix-socket": Mechanism("unix-socket", ours=False),
    "pipe": Mechanism("pipe", ours=False),
    VCHAN_1M: Mechanism(
        VCHAN_1M,
        ours=True,
        kind="vchan/unix",
        port="bench-1m",
        ring_size=RING_SIZE,
        note="1 MiB rings each way (non-default)",
    ),
    VCHAN_NO_POLL: Mechanism(
        VCHAN_NO_POLL,
        ours=True,
        kind="vchan/unix",
        port="bench-np",
        env={BUSY_POLL_ENV: "0"},
        note="busy_poll=0 (non-default): what a machine without a free core gets",
    ),
}
DEFAULT_MECHANISMS = ["vchan/unix", "tcp", "unix-socket", "pipe"]
"""Measured for every case when ``--mechanisms`` does not say otherwise; the variants
are added by each suite where they matter.  ``vchan/inheap`` (both ends in one process,
no IPC at all) only on request: it is no alternative to the baselines, and leaving it out
keeps the full run within minutes."""


@contextlib.contextmanager
def mechanism_env(mech: str) -> Iterator[None]:
    """``os.environ`` with ``mech``'s settings (for the client half, in this process)."""
    extra = MECHANISMS[mech].env
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------------------
# process management


class XenstoredProcess:
    """``aioxen xenstored --root DIR`` as a child process (for the vchan/unix mechanism)."""

    def __init__(self) -> None:
        # Grant pages are files under the root: keep them in memory (tmpfs), as the
        # unix platform's docs recommend, so no disk writeback competes with the rings.
        self.root = make_temp_dir("aioxen-bench-", shm_dir())
        self.proc: subprocess.Popen[str] | None = None
        self.env: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        self.proc = spawn(
            [sys.executable, "-m", "aioxen", "xenstored", "--root", self.root],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        env: dict[str, str] = {}
        try:
            while len(env) < 2:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError("aioxen xenstored exited before printing its exports")
                assignment = line.split(";", 1)[0]
                key, _, value = assignment.partition("=")
                if key in ("XEN_ROOT", "XENSTORED_PATH"):
                    env[key] = value
        except BaseException:  # also a Ctrl-C while it starts: no orphan, no leftover root
            self.stop()
            raise
        self.env = env
        return env

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, 10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        shutil.rmtree(self.root, ignore_errors=True)


class Peer:
    """The server half of a two-process mechanism, in a child process."""

    def __init__(self, mech: str, api: str, loop: str, env: dict[str, str]) -> None:
        self.mech, self.api, self.loop, self.env = mech, api, loop, env
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self.pipe_fds: tuple[int, int] | None = None

    def start(self) -> None:
        env = dict(os.environ, **self.env, **MECHANISMS[self.mech].env)
        args = [sys.executable, "-m", "aioxen.bench.peer", self.mech, self.api, self.loop]
        pass_fds: tuple[int, ...] = ()
        if MECHANISMS[self.mech].kind == "pipe":
            c2s_r, c2s_w = os.pipe()
            s2c_r, s2c_w = os.pipe()
            args += [str(c2s_r), str(s2c_w)]
            pass_fds = (c2s_r, s2c_w)
            self.pipe_fds = (s2c_r, c2s_w)
        try:
            self.proc = spawn(args, stdout=subprocess.PIPE, text=True, env=env, pass_fds=pass_fds)
        finally:
            for fd in pass_fds:
                os.close(fd)
        assert self.proc.stdout is not None
        try:
            line = self.proc.stdout.readline().strip()
        except BaseException:  # a Ctrl-C while it starts: no orphan
            self.stop()
            raise
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"benchmark peer {self.mech}/{self.api} failed to start: {line!r}")
        self.address = line[len("READY") :].strip()

    def stop(self) -> None:
        if self.pipe_fds is not None:
            for fd in self.pipe_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.pipe_fds = None
        if self.proc is not None:
            end_process(self.proc, 10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        sock_dir = os.path.dirname(self.address)
        if MECHANISMS[self.mech].kind == "unix-socket" and os.path.basename(sock_dir).startswith(
            "aioxen-bench-"
        ):
            # the peer removes its socket directory when it stops; this covers a peer that
            # had to be killed
            shutil.rmtree(sock_dir, ignore_errors=True)
            self.address = ""


# --------------------------------------------------------------------------------------
# client side


async def _pipe_streams(read_fd: int, write_fd: int) -> StreamPair:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    rproto = asyncio.StreamReaderProtocol(reader)
    await loop.connect_read_pipe(lambda: rproto, os.fdopen(read_fd, "rb", buffering=0))
    wtransport, wproto = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(write_fd, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(wtransport, wproto, reader, loop)
    return reader, writer


def _vchan_platform(domid: int, env: dict[str, str]) -> Any:
    import aioxen

    return aioxen.platform(
        "unix", domid=domid, root=env["XEN_ROOT"], xenstored_path=env["XENSTORED_PATH"]
    )


@contextlib.asynccontextmanager
async def client_platform(mech: str, env: dict[str, str]) -> AsyncIterator[Any]:
    """The client process's platform for ``mech`` (``None`` unless vchan/unix), opened
    once for many connections -- as a program opens it once, not per connection."""
    if MECHANISMS[mech].kind != "vchan/unix":
        yield None
        return
    async with _vchan_platform(VCHAN_CLIENT_DOMID, env) as plat:
        yield plat


@contextlib.asynccontextmanager
async def open_streams(
    mech: str,
    peer: Peer | None,
    env: dict[str, str],
    platform: Any = None,
    port: str | None = None,
) -> AsyncIterator[StreamPair]:
    """Client-side streams to the peer of ``mech`` (or, for vchan/inheap, to an in-process
    echo/sink server started here).  For vchan/unix, ``platform`` (from
    [`client_platform`][]) is used if given, else one is opened for this connection;
    ``port`` defaults to the mechanism's."""
    mechanism = MECHANISMS[mech]
    port = port or mechanism.port
    mech = mechanism.kind
    if mech == "tcp":
        assert peer is not None
        host, port = peer.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
    elif mech == "unix-socket":
        assert peer is not None
        reader, writer = await asyncio.open_unix_connection(peer.address, limit=1 << 20)
    elif mech == "pipe":
        assert peer is not None and peer.pipe_fds is not None
        rfd, wfd = peer.pipe_fds
        peer.pipe_fds = None  # ownership moves to the transports
        reader, writer = await _pipe_streams(rfd, wfd)
    elif mech == "vchan/unix":
        from aioxen import vchan

        async with contextlib.AsyncExitStack() as stack:
            plat = platform
            if plat is None:
                plat = await stack.enter_async_context(_vchan_platform(VCHAN_CLIENT_DOMID, env))
            reader, writer = await vchan.open_connection(
                VCHAN_SERVER_DOMID, port, platform=plat, limit=1 << 20
            )
            try:
                yield reader, writer
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        return
    elif mech == "vchan/inheap":
        from aioxen.bench import peer as peer_mod

        async with peer_mod.inheap_stream_pair() as pair:
            yield pair
        return
    else:
        raise ValueError(f"unknown mechanism {mech!r}")
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def open_protocol(
    mech: str,
    peer: Peer | None,
    env: dict[str, str],
    factory: Callable[[], asyncio.BaseProtocol],
) -> AsyncIterator[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]:
    """Client-side ``(transport, protocol)`` connected to the peer of ``mech``."""
    loop = asyncio.get_running_loop()
    mechanism = MECHANISMS[mech]
    mech = mechanism.kind
    if mech == "tcp":
        assert peer is not None
        host, port = peer.address.rsplit(":", 1)
        transport, protocol = await loop.create_connection(factory, host, int(port))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif mech == "unix-socket":
        assert peer is not None
        transport, protocol = await loop.create_unix_connection(factory, peer.address)
    elif mech == "pipe":
        assert peer is not None and peer.pipe_fds is not None
        rfd, wfd = peer.pipe_fds
        peer.pipe_fds = None
        protocol = factory()
        _rt, _ = await loop.connect_read_pipe(lambda: protocol, os.fdopen(rfd, "rb", buffering=0))
        wtransport, _ = await loop.connect_write_pipe(
            lambda: protocol, os.fdopen(wfd, "wb", buffering=0)
        )
        try:
            yield wtransport, protocol
        finally:
            wtransport.close()
            _rt.close()
        return
    elif mech == "vchan/unix":
        from aioxen import vchan

        plat = _vchan_platform(VCHAN_CLIENT_DOMID, env)
        async with plat:
            transport, protocol = await vchan.create_connection(
                factory, VCHAN_SERVER_DOMID, mechanism.port, platform=plat
            )
            try:
                yield transport, protocol
            finally:
                transport.close()
        return
    elif mech == "vchan/inheap":
        from aioxen.bench import peer as peer_mod

        async with peer_mod.inheap_protocol_pair(factory) as pair:
            yield pair
        return
    else:
        raise ValueError(f"unknown mechanism {mech!r}")
    try:
        yield transport, protocol
    finally:
        transport.close()


__all__ = [
    "DEFAULT_MECHANISMS",
    "MECHANISMS",
    "RING_SIZE",
    "VCHAN_1M",
    "VCHAN_NO_POLL",
    "VCHAN_PORT_1M",
    "Mechanism",
    "Peer",
    "StreamHandler",
    "StreamPair",
    "XenstoredProcess",
    "client_platform",
    "mechanism_env",
    "open_protocol",
    "open_streams",
]
