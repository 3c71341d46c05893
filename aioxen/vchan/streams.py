"""Stream API: ``connect``, ``open_connection``, ``start_server``, ``accept``.

Theory of operation
-------------------
Exactly what `asyncio.open_connection` / `asyncio.start_server` do, over a
[`VchanTransport`][aioxen.vchan.transport.VchanTransport]: a stdlib `asyncio.StreamReader`
fed by a stdlib `asyncio.StreamReaderProtocol`, and a stdlib
`asyncio.StreamWriter` (so ``drain()``, ``write_eof()``, ``wait_closed()`` and
``get_extra_info()`` behave as they do on sockets).  ``limit`` is the StreamReader's
buffer limit (reading pauses above twice that, as for sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aioxen.platforms import resolve
from aioxen.platforms.base import Platform
from aioxen.vchan.client import DEFAULT_CONNECT_TIMEOUT
from aioxen.vchan.endpoint import DEFAULT_SIZE
from aioxen.vchan.protocols import create_connection, create_server, start_transport
from aioxen.vchan.server import DEFAULT_HANDSHAKE_TIMEOUT, VchanServer, accept_one
from aioxen.vchan.transport import VchanTransport, check_busy_poll

STREAM_LIMIT = 2**16

ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
]


async def open_connection(
    domid: int,
    port: str,
    *,
    platform: Platform | None = None,
    read_size: int | None = None,
    write_size: int | None = None,
    limit: int = STREAM_LIMIT,
    timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    busy_poll: float | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to vchan ``port`` of server domain ``domid``; return ``(reader, writer)``.

    ``read_size``/``write_size`` are minimum ring sizes the server must offer (it picks
    them); ``timeout`` bounds the wait for its advertisement; ``busy_poll`` is the
    transport's maximum busy-poll window (see [`VchanTransport`][aioxen.vchan.VchanTransport]).
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(
        lambda: protocol,
        domid,
        port,
        platform=platform,
        read_size=read_size,
        write_size=write_size,
        timeout=timeout,
        busy_poll=busy_poll,
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


@contextlib.asynccontextmanager
async def connect(
    domid: int,
    port: str,
    *,
    platform: Platform | None = None,
    read_size: int | None = None,
    write_size: int | None = None,
    limit: int = STREAM_LIMIT,
    timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    busy_poll: float | None = None,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``async with vchan.connect(domid, port) as (reader, writer):`` -- as
    [`open_connection`][]; on exit the writer is closed (flushing what was written)
    and ``wait_closed()`` awaited."""
    reader, writer = await open_connection(
        domid,
        port,
        platform=platform,
        read_size=read_size,
        write_size=write_size,
        limit=limit,
        timeout=timeout,
        busy_poll=busy_poll,
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def start_server(
    client_connected_cb: ClientConnectedCallback,
    domid: int,
    port: str,
    *,
    platform: Platform | None = None,
    read_size: int = DEFAULT_SIZE,
    write_size: int = DEFAULT_SIZE,
    limit: int = STREAM_LIMIT,
    start_serving: bool = True,
    initial_index: int = 0,
    busy_poll: float | None = None,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
) -> VchanServer:
    """Serve vchan ``port`` to clients of domain ``domid``, like
    `asyncio.start_server`: ``client_connected_cb(reader, writer)`` runs for every
    client (a coroutine becomes a task).  Any number of successive and concurrent clients
    are served.  ``read_size``/``write_size``: see
    [`create_server`][aioxen.vchan.protocols.create_server].
    """
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(
        factory,
        domid,
        port,
        platform=platform,
        read_size=read_size,
        write_size=write_size,
        start_serving=start_serving,
        initial_index=initial_index,
        busy_poll=busy_poll,
        handshake_timeout=handshake_timeout,
    )


async def accept(
    domid: int,
    port: str,
    *,
    platform: Platform | None = None,
    read_size: int = DEFAULT_SIZE,
    write_size: int = DEFAULT_SIZE,
    limit: int = STREAM_LIMIT,
    timeout: float | None = None,
    initial_index: int = 0,
    busy_poll: float | None = None,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Serve exactly one client (a libxenvchan-style single-connection server): advertise,
    wait up to ``timeout`` for the client, withdraw the advertisement, return its
    ``(reader, writer)``.  (``aioxen cat -l`` semantics.)"""
    plat = await resolve(platform)
    check_busy_poll(busy_poll, plat.peer_runs_concurrently)
    loop = asyncio.get_running_loop()
    conn = await accept_one(
        plat,
        domid,
        port,
        read_size=read_size,
        write_size=write_size,
        timeout=timeout,
        initial_index=initial_index,
        handshake_timeout=handshake_timeout,
    )
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await start_transport(
        conn, lambda: protocol, VchanTransport, busy_poll=busy_poll
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


__all__ = ["accept", "connect", "open_connection", "start_server"]
