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

No advertisement or grant outlives its owner.  Over vchan a pending channel is one
[`accept_one`][aioxen.vchan.server.accept_one] serving in a task, and giving it up takes
event-loop iterations (withdraw the XenStore advertisement, release the pages and the
port).  So ``accept`` returns or raises -- connected, timed out, cancelled -- only once
that is done, and the owner of a pending channel ends it with ``await aclose()`` on
every path (a synchronous ``close()`` only starts it): a platform closed right after
finds nothing still shared or advertised.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol, runtime_checkable

from aioxen.platforms.base import Platform
from aioxen.tasks import wait_out
from aioxen.vchan.endpoint import Connection
from aioxen.vchan.protocols import start_transport
from aioxen.vchan.server import abandon, accept_one
from aioxen.vchan.streams import STREAM_LIMIT, open_connection
from aioxen.vchan.transport import VchanTransport, check_busy_poll

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
        """Start to stop listening (idempotent; no effect on an accepted connection).
        What is left to release may take a few event-loop iterations: an owner that
        can await uses ``aclose``."""
        ...

    async def aclose(self) -> None:
        """Stop listening and return once everything is released -- the advertisement
        withdrawn, pages and ports given back -- and a peer that connected but was never
        accepted disconnected (idempotent; no effect on an accepted connection).
        Finishes even if the caller is cancelled meanwhile (the cancellation is
        re-raised afterwards)."""
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


async def aclose_pending(pending: PendingChannel) -> None:
    """``await pending.aclose()``, or ``pending.close()`` for a pending channel of a
    factory written before ``aclose`` was part of
    [`PendingChannel`][aioxen.qrexec.channels.PendingChannel]."""
    aclose = getattr(pending, "aclose", None)
    if aclose is None:
        pending.close()
    else:
        await aclose()


async def _reap(task: asyncio.Task[Connection]) -> None:
    """Cancel ``task`` and wait until it has ended, also through cancellations of our
    own caller (re-raised afterwards): its clean-up -- withdraw the advertisement,
    release the endpoint -- is a bounded number of XenStore round trips, and what it
    holds must not outlive whoever awaits this."""
    task.cancel()
    interrupted = await wait_out(task)
    if interrupted is not None:
        raise interrupted


def _retrieve(task: asyncio.Task[Connection]) -> None:
    if not task.cancelled():
        task.exception()  # reported by accept(); never "exception was never retrieved"


class _VchanPending:
    """One peer on one vchan port: [`accept_one`][aioxen.vchan.server.accept_one]
    serving in a task -- no spare endpoint, no re-advertisement after the bind: the
    cheapest one-shot server, and every qrexec data channel is one.  Every path out of
    ``accept`` (connected, timed out, cancelled, failed) and ``aclose`` returns only
    once that task has ended, i.e. its advertisement is withdrawn and its grants and
    port released."""

    def __init__(self, peer_domid: int, port: int, serving: asyncio.Task[Connection]) -> None:
        self._peer = peer_domid
        self._port = port
        self._serving = serving
        self._taken = False  # accept() took the connection, or it was abandoned
        serving.add_done_callback(_retrieve)

    async def accept(self, timeout: float | None = DEFAULT_ACCEPT_TIMEOUT) -> Streams:
        serving = self._serving
        if self._taken or serving.cancelled():
            raise ConnectionAbortedError(
                f"qrexec: vchan port {self._port} for domain {self._peer} is closed "
                "(or already accepted)"
            )
        try:
            done, _ = await asyncio.wait((serving,), timeout=timeout)
        except BaseException:  # cancelled: release before the cancellation goes on
            await self.aclose()
            raise
        if not done:
            await self.aclose()
            raise TimeoutError(
                f"qrexec: domain {self._peer} did not connect to vchan port {self._port} "
                f"within {timeout} s"
            )
        self._taken = True
        conn = serving.result()  # accept_one's error: it released everything itself
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        busy_poll = check_busy_poll(None, conn.platform.peer_runs_concurrently)
        # start_transport abandons or aborts the connection itself if it fails
        transport, _ = await start_transport(
            conn, lambda: protocol, VchanTransport, busy_poll=busy_poll
        )
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    def _drop_unaccepted(self, serving: asyncio.Task[Connection]) -> None:
        if self._taken or serving.cancelled() or serving.exception() is not None:
            return
        self._taken = True
        abandon(serving.result())  # connected, but nobody came for it

    def close(self) -> None:
        serving = self._serving
        if serving.done():
            self._drop_unaccepted(serving)
        else:
            serving.cancel()  # accept_one withdraws and releases in its next iterations
            serving.add_done_callback(self._drop_unaccepted)

    async def aclose(self) -> None:
        serving = self._serving
        try:
            if not serving.done():
                await _reap(serving)
        finally:
            if serving.done():
                self._drop_unaccepted(serving)


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
        loop = asyncio.get_running_loop()
        advertised: asyncio.Future[None] = loop.create_future()

        def on_advertised() -> None:
            if not advertised.done():
                advertised.set_result(None)

        serving = loop.create_task(
            accept_one(
                self.platform,
                peer_domid,
                port_name(port),
                read_size=buffer_size,
                write_size=buffer_size,
                on_advertised=on_advertised,
            ),
            name=f"qrexec vchan port {port} for domain {peer_domid}",
        )
        try:
            await asyncio.wait((advertised, serving), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # also ends a connection made meanwhile
            await _VchanPending(peer_domid, port, serving).aclose()
            raise
        if not advertised.done():  # ended before advertising: the claim failed, ...
            advertised.cancel()
            serving.result()  # raises what accept_one raised (it released everything)
        return _VchanPending(peer_domid, port, serving)

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
    "aclose_pending",
    "close_streams",
    "port_name",
]
