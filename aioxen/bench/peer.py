"""The server half of the stream benchmarks (run as ``python -m aioxen.bench.peer``).

Usage: ``python -m aioxen.bench.peer MECH API LOOP [PIPE_READ_FD PIPE_WRITE_FD]``.  It
listens, prints ``READY <address>`` on stdout, then serves until terminated.  API
``setup`` is the stream API; for vchan it serves the default ring size on ``bench`` and
1 MiB rings on ``bench-1m``.  Otherwise a vchan mechanism is served on its own port with
its ring size (the library's default unless the mechanism says otherwise, see
[`aioxen.bench.mechanisms.MECHANISMS`][]).

Stream API commands (one text line each, then data):

* ``BULK <n>`` — read exactly ``n`` bytes, then answer ``OK``;
* ``ECHO <count> <size>`` — ``count`` times: read ``size`` bytes, write them back.

Protocol API: a 9-byte header ``op`` + ``u64``: ``B`` + ``n`` switches the connection to
sink mode (every ``n`` bytes received are answered with one ``K`` byte); ``E`` + 0 switches
it to echo mode (everything received is written back).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

from aioxen.bench.mechanisms import (
    MECHANISMS,
    RING_SIZE,
    VCHAN_CLIENT_DOMID,
    VCHAN_PORT,
    VCHAN_PORT_1M,
    VCHAN_SERVER_DOMID,
    StreamPair,
)

HEADER = struct.Struct("<cQ")
BACKLOG = 4096
"""Listen backlog of the socket baselines: the ``setup`` suite connects 1,000 clients at
once, and a Unix socket refuses connects beyond the backlog (``EAGAIN``) instead of
queueing them (asyncio's default backlog is 100)."""
READ_CHUNK = 1 << 20


async def stream_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            words = line.split()
            if words[0] == b"BULK":
                remaining = int(words[1])
                while remaining:
                    data = await reader.read(min(remaining, READ_CHUNK))
                    if not data:
                        return
                    remaining -= len(data)
                writer.write(b"OK\n")
                await writer.drain()
            elif words[0] == b"ECHO":
                count, size = int(words[1]), int(words[2])
                for _ in range(count):
                    writer.write(await reader.readexactly(size))
                await writer.drain()
            else:
                raise ValueError(f"unknown benchmark command {line!r}")
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


class ServerProtocol(asyncio.BufferedProtocol):
    """Sink-or-echo server taking bytes straight into one preallocated buffer."""

    def __init__(self) -> None:
        self.buf = bytearray(READ_CHUNK)
        self.view = memoryview(self.buf)
        self.transport: Any = None
        self.mode = b""
        self.block = 0
        self.count = 0
        self.header = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if hasattr(transport, "write"):
            self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        data = self.view[:nbytes]
        while data:
            if not self.mode:
                need = HEADER.size - len(self.header)
                self.header += data[:need]
                data = data[need:]
                if len(self.header) == HEADER.size:
                    op, arg = HEADER.unpack(self.header)
                    self.mode, self.block, self.count = op, arg, 0
                continue
            if self.mode == b"E":
                self.transport.write(bytes(data))
                return
            take = min(len(data), self.block - self.count)
            self.count += take
            data = data[take:]
            if self.count == self.block:
                self.count = 0
                self.transport.write(b"K")

    def eof_received(self) -> bool:
        return False


def _vchan_unix_platform() -> Any:
    import aioxen

    return aioxen.platform(
        "unix",
        domid=VCHAN_SERVER_DOMID,
        root=os.environ["XEN_ROOT"],
        xenstored_path=os.environ["XENSTORED_PATH"],
    )


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def serve(mech: str, api: str, fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    server: Any = None
    extra: Any = None
    plat: Any = None
    sock_dir: str | None = None
    setup = api == "setup"
    if setup:
        api = "streams"
    mechanism = MECHANISMS[mech]
    mech = mechanism.kind
    sizes: dict[str, Any] = {}  # none: the library's default ring size
    if mechanism.ring_size is not None:
        sizes = {"read_size": mechanism.ring_size, "write_size": mechanism.ring_size}
    if mech == "tcp":
        if api == "streams":
            server = await asyncio.start_server(
                stream_handler, "127.0.0.1", 0, limit=1 << 20, backlog=BACKLOG
            )
        else:
            server = await loop.create_server(ServerProtocol, "127.0.0.1", 0, backlog=BACKLOG)
        host, port = server.sockets[0].getsockname()[:2]
        address = f"{host}:{port}"
    elif mech == "unix-socket":
        sock_dir = tempfile.mkdtemp(prefix="aioxen-bench-")
        path = os.path.join(sock_dir, "sock")
        if api == "streams":
            server = await asyncio.start_unix_server(
                stream_handler, path, limit=1 << 20, backlog=BACKLOG
            )
        else:
            server = await loop.create_unix_server(ServerProtocol, path, backlog=BACKLOG)
        address = path
    elif mech == "pipe":
        rfd, wfd = fds
        rfile, wfile = os.fdopen(rfd, "rb", buffering=0), os.fdopen(wfd, "wb", buffering=0)
        if api == "streams":
            reader = asyncio.StreamReader(limit=1 << 20)
            rproto = asyncio.StreamReaderProtocol(reader)
            await loop.connect_read_pipe(lambda: rproto, rfile)
            wtr, wpr = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wfile)
            writer = asyncio.StreamWriter(wtr, wpr, reader, loop)
            task = asyncio.ensure_future(stream_handler(reader, writer))
            task.add_done_callback(lambda _: _finish(stop))
        else:
            proto = ServerProtocol()
            await loop.connect_read_pipe(lambda: proto, rfile)
            await loop.connect_write_pipe(lambda: proto, wfile)
        address = "pipe"
    elif mech == "vchan/unix":
        from aioxen import vchan

        plat = _vchan_unix_platform()
        await plat.open()
        if setup:
            from aioxen.vchan import DEFAULT_SIZE

            server = await vchan.start_server(
                stream_handler,
                VCHAN_CLIENT_DOMID,
                VCHAN_PORT,
                platform=plat,
                read_size=DEFAULT_SIZE,
                write_size=DEFAULT_SIZE,
                limit=1 << 20,
            )
            extra = await vchan.start_server(
                stream_handler,
                VCHAN_CLIENT_DOMID,
                VCHAN_PORT_1M,
                platform=plat,
                read_size=RING_SIZE,
                write_size=RING_SIZE,
                limit=1 << 20,
            )
        elif api == "streams":
            server = await vchan.start_server(
                stream_handler,
                VCHAN_CLIENT_DOMID,
                mechanism.port,
                platform=plat,
                limit=1 << 20,
                **sizes,
            )
        else:
            server = await vchan.create_server(
                ServerProtocol, VCHAN_CLIENT_DOMID, mechanism.port, platform=plat, **sizes
            )
        address = f"{VCHAN_SERVER_DOMID}/{mechanism.port}"
    else:
        raise SystemExit(f"unknown mechanism {mech!r}")
    print(f"READY {address}", flush=True)
    loop.add_signal_handler(15, _finish, stop)
    try:
        await stop
    finally:
        for srv in (server, extra):
            if srv is None:
                continue
            srv.close()
            if hasattr(srv, "abort_clients"):
                srv.abort_clients()
            await srv.wait_closed()
            for _ in range(3):  # let connection_lost callbacks release the rings
                await asyncio.sleep(0)
        if plat is not None:
            await plat.close()
        if sock_dir is not None:  # the socket file and its private directory
            shutil.rmtree(sock_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------
# in-process (inheap) pairs for the vchan/inheap mechanism


@contextlib.asynccontextmanager
async def _inheap_platforms() -> AsyncIterator[tuple[Any, Any]]:
    import aioxen
    from aioxen.platforms.inheap import InHeapWorld

    world = InHeapWorld()
    async with (
        aioxen.platform("inheap", domid=VCHAN_SERVER_DOMID, world=world) as srv,
        aioxen.platform("inheap", domid=VCHAN_CLIENT_DOMID, world=world) as cli,
    ):
        yield srv, cli


@contextlib.asynccontextmanager
async def inheap_stream_pair() -> AsyncIterator[StreamPair]:
    from aioxen import vchan

    async with _inheap_platforms() as (srv, cli):
        server = await vchan.start_server(
            stream_handler, VCHAN_CLIENT_DOMID, VCHAN_PORT, platform=srv, limit=1 << 20
        )
        async with server:
            reader, writer = await vchan.open_connection(
                VCHAN_SERVER_DOMID, VCHAN_PORT, platform=cli, limit=1 << 20
            )
            try:
                yield reader, writer
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()


@contextlib.asynccontextmanager
async def inheap_protocol_pair(
    factory: Callable[[], asyncio.BaseProtocol],
) -> AsyncIterator[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]:
    from aioxen import vchan

    async with _inheap_platforms() as (srv, cli):
        server = await vchan.create_server(
            ServerProtocol, VCHAN_CLIENT_DOMID, VCHAN_PORT, platform=srv
        )
        async with server:
            transport, protocol = await vchan.create_connection(
                factory, VCHAN_SERVER_DOMID, VCHAN_PORT, platform=cli
            )
            try:
                yield transport, protocol
            finally:
                transport.close()


def main(argv: list[str]) -> None:
    mech, api, loop_name = argv[:3]
    fds = [int(x) for x in argv[3:]]
    if loop_name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(mech, api, fds))


if __name__ == "__main__":
    main(sys.argv[1:])
