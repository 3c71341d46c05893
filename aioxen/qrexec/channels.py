"""Channels: how qrexec opens its byte streams (control and data vchans).

Theory of operation
-------------------
qrexec needs exactly two things from a transport: *listen* on a numbered port for one
peer domain and later accept that peer's one connection, and *connect* to a numbered
port a server domain offers.  The control channel is port 512 (the VM's agent listens,
dom0's daemon connects); every call gets a data channel on a port from 513 up (the
caller side listens, the service side connects).  Nothing else about the transport
matters to the protocol code, so the agent, the daemon and the client receive a
[`ChannelFactory`][aioxen.qrexec.channels.ChannelFactory] and never import a backend.

Two factories exist:

* [`VchanChannels`][aioxen.qrexec.channels.VchanChannels] -- aioxen's vchan over a
  [`Platform`][aioxen.platforms.base.Platform] (``xen``, ``unix``, ``inheap``): the port
  number becomes the vchan port name (``"512"``), so the advertisement is at
  ``/local/domain/<server>/data/vchan/<client>/<port>`` exactly where libxenvchan (and
  so Qubes' own qrexec) puts it.
* ``VchanSocketChannels`` (``aioxen.qrexec.vchan_socket``) -- Qubes' "vchan-socket"
  test transport, for talking to Qubes' programs built without Xen.

``listen`` is split from ``accept`` because the qrexec caller must be *advertised*
before it tells the other side (through the daemon) to connect: ``listen`` returns once
the peer could connect, ``accept`` awaits that peer.  Streams are stdlib
`asyncio.StreamReader`/`asyncio.StreamWriter` pairs.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol, runtime_checkable

from aioxen.platforms.base import Platform
from aioxen.vchan.server import VchanServer
from aioxen.vchan.streams import open_connection, start_server

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

CONTROL_PORT = 512
"""The control channel's port (``VCHAN_BASE_PORT``)."""
CONTROL_BUFFER_SIZE = 4096
"""Ring size each way of the control channel (the agent is its server)."""
DATA_BUFFER_SIZE = 65536
"""Default ring size each way of a data channel (Qubes' ``VCHAN_BUFFER_SIZE``)."""
DEFAULT_ACCEPT_TIMEOUT = 120.0
"""How long a listening side waits for its peer (Qubes' vchan connection timeout)."""


@runtime_checkable
class PendingChannel(Protocol):
    """A listening endpoint for one peer (returned by ``ChannelFactory.listen``)."""

    async def accept(self, timeout: float | None = DEFAULT_ACCEPT_TIMEOUT) -> Streams:
        """Await the one peer; return its ``(reader, writer)``.  Stops listening.
        ``TimeoutError`` (naming the port and domain) if it does not come in time."""
        ...

    def close(self) -> None:
        """Stop listening (idempotent; no effect on an accepted connection)."""
        ...


@runtime_checkable
class ChannelFactory(Protocol):
    """What qrexec needs from a transport (see the module docstring)."""

    @property
    def local_domid(self) -> int:
        """The domain this side plays."""
        ...

    async def listen(self, peer_domid: int, port: int, *, buffer_size: int) -> PendingChannel:
        """Offer ``port`` to domain ``peer_domid`` (rings of ``buffer_size`` bytes each
        way); returns once the peer can connect.  ``OSError(EADDRINUSE)`` if the port is
        already offered to that domain."""
        ...

    async def connect(self, server_domid: int, port: int) -> Streams:
        """Connect to ``port`` offered by ``server_domid``; waits (bounded) for the
        offer to appear."""
        ...


def port_name(port: int) -> str:
    """The vchan port name of a numbered qrexec port (``512`` -> ``"512"``)."""
    if not 0 <= port <= 0xFFFFFFFF:
        raise ValueError(f"qrexec port {port} out of range")
    return str(port)


class _VchanPending:
    """A [`VchanServer`][aioxen.vchan.VchanServer] that hands out its first client."""

    def __init__(self, peer_domid: int, port: int) -> None:
        self._peer = peer_domid
        self._port = port
        self._server: VchanServer | None = None
        self._first: asyncio.Future[Streams] = asyncio.get_running_loop().create_future()

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._first.done():  # a second client: not ours to serve
            writer.transport.abort()
            return
        self._first.set_result((reader, writer))
        self.close()

    async def accept(self, timeout: float | None = DEFAULT_ACCEPT_TIMEOUT) -> Streams:
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self._first)
        except TimeoutError:
            raise TimeoutError(
                f"qrexec: domain {self._peer} did not connect to vchan port {self._port} "
                f"within {timeout} s"
            ) from None
        finally:
            self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if not self._first.done():
            self._first.cancel()


class VchanChannels:
    """[`ChannelFactory`][aioxen.qrexec.channels.ChannelFactory] over aioxen vchan on
    ``platform`` (any platform; its ``domid`` is the local domain)."""

    def __init__(self, platform: Platform, *, connect_timeout: float = DEFAULT_ACCEPT_TIMEOUT):
        self.platform = platform
        self.connect_timeout = connect_timeout

    @property
    def local_domid(self) -> int:
        return self.platform.domid

    async def listen(self, peer_domid: int, port: int, *, buffer_size: int) -> PendingChannel:
        pending = _VchanPending(peer_domid, port)
        pending._server = await start_server(
            pending._connected,
            peer_domid,
            port_name(port),
            platform=self.platform,
            read_size=buffer_size,
            write_size=buffer_size,
        )
        return pending

    async def connect(self, server_domid: int, port: int) -> Streams:
        return await open_connection(
            server_domid, port_name(port), platform=self.platform, timeout=self.connect_timeout
        )

    def __repr__(self) -> str:
        return f"VchanChannels(domid={self.local_domid})"


async def close_streams(writer: asyncio.StreamWriter) -> None:
    """Close ``writer`` and wait, ignoring a peer that is already gone."""
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


__all__ = [
    "CONTROL_BUFFER_SIZE",
    "CONTROL_PORT",
    "DATA_BUFFER_SIZE",
    "ChannelFactory",
    "PendingChannel",
    "Streams",
    "VchanChannels",
    "close_streams",
    "port_name",
]
