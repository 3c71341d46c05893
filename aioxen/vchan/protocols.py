"""Protocol-level API: ``create_connection`` and ``create_server`` over vchan.

Theory of operation
-------------------
The same shape as `asyncio.loop.create_connection` / ``create_server``, with a vchan
([`VchanTransport`][aioxen.vchan.transport.VchanTransport]) in place of a socket.  The client side
([`create_connection`][]) waits for the server's advertisement, maps its pages and goes
live; the server side ([`create_server`][]) shares pages and re-advertises after each
client ([`VchanServer`][aioxen.vchan.server.VchanServer]).  ``connection_made`` is scheduled
with ``call_soon`` like every asyncio transport, and ``create_connection`` returns after it
ran.  ``platform=None`` means ``await aioxen.platforms.resolve(None)`` (the loop's default
platform).
A server still serving when its platform closes is closed by the platform first (its
waiting endpoint pins shared pages): [`_EndsWithPlatform`][], a
[`PlatformUser`][aioxen.platforms.base.PlatformUser] that holds the server weakly.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from typing import TypeVar

from aioxen.platforms import resolve
from aioxen.platforms.base import Platform
from aioxen.vchan.client import DEFAULT_CONNECT_TIMEOUT, connect_client
from aioxen.vchan.endpoint import DEFAULT_SIZE, Connection
from aioxen.vchan.server import DEFAULT_HANDSHAKE_TIMEOUT, VchanServer, abandon
from aioxen.vchan.transport import VchanTransport, check_busy_poll

_P = TypeVar("_P", bound=asyncio.BaseProtocol)
_T = TypeVar("_T", bound=VchanTransport)


async def create_connection(
    protocol_factory: Callable[[], _P],
    domid: int,
    port: str,
    *,
    platform: Platform | None = None,
    read_size: int | None = None,
    write_size: int | None = None,
    timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    busy_poll: float | None = None,
) -> tuple[VchanTransport, _P]:
    """Connect to vchan ``port`` served by domain ``domid``; return ``(transport, protocol)``.

    The *server* chose the ring sizes; ``read_size``/``write_size`` here are minimums
    (``ConnectionRefusedError`` if the server offers less).  ``timeout`` bounds the wait
    for the server to advertise (``TimeoutError``; ``None`` = until cancelled).
    ``protocol_factory`` may build an `asyncio.BufferedProtocol`, which then gets
    bytes copied once from the ring into its buffer.  ``busy_poll``: the transport's
    maximum busy-poll window in seconds (``None``: the default,
    `DEFAULT_BUSY_POLL`; 0 disables polling).
    """
    plat = await resolve(platform)
    check_busy_poll(busy_poll, plat.peer_runs_concurrently)
    conn = await connect_client(
        plat, domid, port, read_size=read_size, write_size=write_size, timeout=timeout
    )
    return await start_transport(conn, protocol_factory, VchanTransport, busy_poll=busy_poll)


async def start_transport(
    conn: Connection,
    protocol_factory: Callable[[], _P],
    transport_class: Callable[..., _T],
    *,
    busy_poll: float | None,
) -> tuple[_T, _P]:
    """Put a live ``conn`` under a new transport and protocol; return once
    ``connection_made`` ran.  ``conn`` is abandoned if the factory fails, the transport
    aborted if the wait for ``connection_made`` is cancelled or fails."""
    loop = asyncio.get_running_loop()
    try:
        protocol = protocol_factory()
    except BaseException:
        abandon(conn)
        raise
    waiter: asyncio.Future[None] = loop.create_future()
    transport = transport_class(loop, conn, protocol, waiter, busy_poll=busy_poll)
    try:
        await waiter
    except BaseException:
        transport.abort()
        raise
    return transport, protocol


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    domid: int,
    port: str,
    *,
    platform: Platform | None = None,
    read_size: int = DEFAULT_SIZE,
    write_size: int = DEFAULT_SIZE,
    start_serving: bool = True,
    initial_index: int = 0,
    busy_poll: float | None = None,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
) -> VchanServer:
    """Serve vchan ``port`` to clients of domain ``domid``; one protocol per connection.

    ``read_size`` (client -> server) and ``write_size`` (server -> client) are the minimum
    ring sizes the server offers (1..1 MiB, default 64 KiB; rounded up as libxenvchan does:
    in-page rings of 1/2 KiB for small sizes, else a power of two of at least 4 KiB).
    With ``start_serving`` (default) this returns once the first endpoint is advertised.
    ``initial_index`` seeds the ring indices of every connection (any u32 is wire-legal;
    tests use values near 2**32).  ``busy_poll``: as for [`create_connection`][], for
    every accepted connection.  ``handshake_timeout``: a client that binds the advertised
    endpoint and does not complete the handshake within it is dropped and a fresh endpoint
    advertised (see [`VchanServer`][aioxen.vchan.server.VchanServer]).  A second server for the
    same port raises [`ResourceBusy`][aioxen.ownership.ResourceBusy] (``EADDRINUSE``).
    """
    plat = await resolve(platform)
    server = VchanServer(
        plat,
        domid,
        port,
        protocol_factory,
        read_size=read_size,
        write_size=write_size,
        initial_index=initial_index,
        busy_poll=busy_poll,
        handshake_timeout=handshake_timeout,
    )
    _EndsWithPlatform.attach(plat, server)
    if start_serving:
        try:
            await server.start_serving()
        except BaseException:
            server.close()
            await server.wait_closed()
            raise
    return server


class _EndsWithPlatform:
    """Closes ``server`` (if it still exists) when its platform closes, waiting at most the
    platform's ``close_timeout`` for it to withdraw and release its endpoints."""

    def __init__(self, server: VchanServer) -> None:
        self._server = weakref.ref(server)

    @classmethod
    def attach(cls, plat: Platform, server: VchanServer) -> None:
        user = cls(server)
        plat.add_user(user)
        weakref.finalize(server, plat.remove_user, user)  # no registry growth

    async def platform_closing(self, timeout: float) -> None:
        server = self._server()
        if server is None:
            return
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await server.wait_closed()


__all__ = ["create_connection", "create_server"]
