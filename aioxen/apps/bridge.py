"""``aioxen bridge``: accept on one address, connect each client to another, pump both ways.

The implementation of the ``aioxen bridge`` command; programs import the same classes from
the public [`aioxen.bridge`][].

Theory of operation
-------------------
A [`Bridge`][] listens on one [`Address`][aioxen.apps.addresses.Address] and, for every
accepted connection, opens a new connection to the other; the pair is a [`_Link`][] of
two [`_Side`][] protocols, each the other's *peer*.  Everything happens in protocol
callbacks -- no task per direction, no intermediate buffer:

* ``data_received`` on one side writes the bytes to the peer's transport;
* **back-pressure**: when a transport's write buffer passes its high-water mark it calls
  ``pause_writing`` on its protocol, which pauses *reading* on the peer transport (where
  the bytes come from); ``resume_writing`` resumes it.  So each direction holds at most
  one transport write buffer (64 KiB by default) plus one read chunk, however fast one end
  and however slow the other;
* **half-close**: ``eof_received`` on one side becomes ``write_eof()`` on the peer (the
  vchan EOF bit, a TCP/Unix ``shutdown(SHUT_WR)``) and returns true to keep the
  connection open for the other direction; once both directions saw EOF both transports
  are closed (flushing what is queued);
* a side that is lost takes its peer with it: ``close()`` (flush, then end) after a clean
  close, ``abort()`` after an error, so a reset is not disguised as a clean end.

Until the outgoing connection is up, the accepted one is paused (bytes a transport still
delivers while paused -- a vchan whose peer is gone hands over what is left in its ring --
are held, at most one ring).  If connecting fails, the accepted connection is aborted.

[`Bridge.close`][] stops listening and closes every bridged connection; the bridge
tracks its links itself because ``asyncio.Server.wait_closed`` (3.11, uvloop) does not wait
for connections.  [`Bridge.aclose`][] waits ``grace`` seconds for the flushes, then
aborts what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self, cast

import aioxen
from aioxen import vchan
from aioxen.apps.addresses import Address, parse_address
from aioxen.apps.clistd import CommandError, check_root_env
from aioxen.apps.stderr_log import StderrLogHandler
from aioxen.cli import StopSignals
from aioxen.errors import PlatformError, ProtocolError
from aioxen.platforms.base import Platform

logger = logging.getLogger("aioxen.bridge")

DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds to wait for the outgoing connection (a vchan server to advertise, a TCP
handshake) before the accepted connection is aborted."""

DEFAULT_GRACE = 5.0
"""Seconds [`Bridge.aclose`][] lets bridged connections flush before aborting them."""


def _peer_name(transport: asyncio.BaseTransport) -> str:
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}" if not isinstance(name[0], int) else f"domain {name[0]}"
    return str(name) if name else "?"


@dataclass(frozen=True)
class ConnectionInfo:
    """A snapshot of one bridged connection ([`Bridge.connections`][])."""

    number: int
    origin: str
    """Who connected (``host:port``, ``domain N``, ...)."""
    bytes_in: int
    """Bytes received from the accepted side so far (forwarded to the target)."""
    bytes_out: int
    """Bytes received from the target so far (forwarded to the accepted side)."""
    queued: int
    """Bytes waiting in the bridge's two transport write buffers."""
    reading: tuple[bool, bool]
    """Whether the accepted and the outgoing transport are reading (false: paused by
    back-pressure, or closed)."""


def _reading(side: _Side) -> bool:
    t = side.transport
    return t is not None and not side.lost and t.is_reading()


def _queued(side: _Side) -> int:
    t = side.transport
    return t.get_write_buffer_size() if t is not None and not side.lost else 0


class _Side(asyncio.Protocol):
    """One end of a bridged pair."""

    def __init__(self, link: _Link, name: str) -> None:
        self.link = link
        self.name = name
        self.peer: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.lost = False
        self.bytes_in = 0  # bytes received from this side's connection
        self.held: list[bytes] = []  # received before the peer connected
        self.held_eof = False

    def usable(self) -> bool:
        return self.transport is not None and not self.lost

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        self.link.side_made(self)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if not self.link.linked:
            # Not bridged yet.  The accepted side was paused in connection_made, but uvloop
            # starts reading after connection_made regardless, a vchan whose peer is gone
            # hands over what is left in its ring, and the target may speak first: hold the
            # chunk and pause until the link is up.
            self.held.append(bytes(data))
            if self.usable():
                assert self.transport is not None
                self.transport.pause_reading()
            return
        peer = self.peer
        if peer is not None and peer.usable():
            assert peer.transport is not None
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if not self.link.linked:
            self.held_eof = True
        elif peer is not None:
            self.link.forward_eof(self, peer)
        return True

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.usable():
            assert peer.transport is not None
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.usable():
            assert peer.transport is not None
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link.side_lost(self, exc)


class _Link:
    """One bridged connection: ``inbound`` (accepted) and ``outbound`` (connected)."""

    def __init__(self, bridge: Bridge, number: int) -> None:
        self.bridge = bridge
        self.number = number
        self.inbound = _Side(self, "in")
        self.outbound = _Side(self, "out")
        self.inbound.peer = self.outbound
        self.outbound.peer = self.inbound
        self.connecting: asyncio.Task[None] | None = None
        self.linked = False  # both sides up: bytes flow instead of being held
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closing = False
        self.origin = "?"

    def __repr__(self) -> str:
        return f"<bridged connection {self.number} from {self.origin}>"

    def side_made(self, side: _Side) -> None:
        if side is self.inbound:
            assert side.transport is not None
            self.origin = _peer_name(side.transport)
            if self.closing:  # accepted while the bridge was closing
                side.transport.abort()
                return
            side.transport.pause_reading()  # until the outbound connection is up
            self.connecting = asyncio.ensure_future(self._connect())
            self.connecting.add_done_callback(lambda _: self._check_done())

    async def _connect(self) -> None:
        bridge = self.bridge
        inbound = self.inbound
        try:
            await bridge.connect_address.connect(
                lambda: self.outbound,
                platform=bridge.platform,
                timeout=bridge.connect_timeout,
            )
        except asyncio.CancelledError:
            self._abort_inbound()
            raise
        except Exception as exc:
            logger.warning(
                "connection %d from %s: cannot connect to %s: %s",
                self.number,
                self.origin,
                bridge.connect_address,
                exc,
            )
            self._abort_inbound()
            return
        outbound = self.outbound
        assert outbound.transport is not None
        self.linked = True
        logger.info(
            "connection %d: %s -> %s bridged to %s",
            self.number,
            self.origin,
            bridge.listen_address,
            bridge.connect_address,
        )
        if inbound.lost or self.closing:
            # the client left (or the bridge closed) while we were connecting
            self._release_held(inbound, outbound)
            if not outbound.lost:
                outbound.transport.close()
            return
        # Resume first (reading restarts on a later turn), then release what was held in
        # order; the writes may pause a side again through pause_writing.
        for side in (inbound, outbound):
            if side.usable() and not side.eof:
                assert side.transport is not None
                side.transport.resume_reading()
        self._release_held(inbound, outbound)
        self._release_held(outbound, inbound)

    def _release_held(self, src: _Side, dst: _Side) -> None:
        held, src.held = src.held, []
        if dst.transport is None or dst.lost:
            return
        for chunk in held:
            dst.transport.write(chunk)
        if src.held_eof:
            src.held_eof = False
            self.forward_eof(src, dst)

    def _abort_inbound(self) -> None:
        if self.inbound.usable():
            assert self.inbound.transport is not None
            self.inbound.transport.abort()

    def forward_eof(self, src: _Side, dst: _Side) -> None:
        """``src`` will send no more: end ``dst``'s write direction; close both once both
        directions are finished."""
        t = dst.transport
        if t is None or dst.lost:
            return
        if src.eof and dst.eof:
            self._close_both()
        elif t.can_write_eof():
            t.write_eof()
        else:
            t.close()

    def _close_both(self) -> None:
        for side in (self.inbound, self.outbound):
            if side.usable():
                assert side.transport is not None
                side.transport.close()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        peer = side.peer
        assert peer is not None
        if exc is not None:
            logger.info("connection %d: %s side failed: %s", self.number, side.name, exc)
        if peer.usable():
            assert peer.transport is not None
            if exc is None:
                peer.transport.close()  # flush what this side sent, then end
            else:
                peer.transport.abort()
        elif (
            side is self.inbound
            and self.connecting is not None
            and not self.connecting.done()
            # with bytes held back, connect anyway to deliver what the client sent
            and (exc is not None or not (side.held or side.held_eof))
        ):
            self.connecting.cancel()
        self._check_done()

    def _check_done(self) -> None:
        if self.done.done():
            return
        inbound_over = self.inbound.lost or self.inbound.transport is None
        connecting = self.connecting is not None and not self.connecting.done()
        outbound_over = self.outbound.lost or (self.outbound.transport is None and not connecting)
        if inbound_over and outbound_over:
            logger.info(
                "connection %d from %s closed: %d bytes in, %d bytes out",
                self.number,
                self.origin,
                self.inbound.bytes_in,
                self.outbound.bytes_in,
            )
            self.done.set_result(None)
            self.bridge._link_done(self)

    def close(self) -> None:
        """Flush and close both sides (stop connecting)."""
        self.closing = True
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()
        self._close_both()

    def abort(self) -> None:
        self.closing = True
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()
        for side in (self.inbound, self.outbound):
            if side.usable():
                assert side.transport is not None
                side.transport.abort()
        if self.inbound.transport is None and not self.done.done():
            # the listener made the protocol but never connected it
            self.done.set_result(None)
            self.bridge._link_done(self)


class _Refused(asyncio.Protocol):
    """A connection over the bridge's ``max_connections``: closed as soon as it is made."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        logger.warning(
            "%s: closed at once, %d connections open (--max-connections)",
            _peer_name(transport),
            self.bridge.active,
        )
        transport.close()


class Bridge:
    """Listen on ``listen``, bridge every connection to ``connect``.

    ::

        bridge = await start_bridge("tcp:127.0.0.1:8080", "vchan:0/web")
        async with bridge:
            await bridge.serve_forever()

    ``platform`` serves the vchan addresses (``None``: the environment's).  ``buffer_size``
    is the ring size each way of vchans the bridge serves; ``connect_timeout`` bounds each
    outgoing connection attempt.  ``max_connections`` (``None``: only the descriptor
    limit) bounds the bridged connections open at once: one more is closed as soon as it
    is accepted, logged and counted in [`refused`][aioxen.apps.bridge.Bridge.refused], so
    a client opening connections without end costs the others nothing once the cap is
    reached -- each bridged vchan holds two rings (2 x ``buffer_size``) and descriptors.
    """

    def __init__(
        self,
        listen: Address | str,
        connect: Address | str,
        *,
        platform: Platform | None = None,
        buffer_size: int = vchan.DEFAULT_SIZE,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        max_connections: int | None = None,
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.listen_address = parse_address(listen) if isinstance(listen, str) else listen
        """Where the bridge listens (after [`start`][]: the bound address, e.g. the
        real TCP port when 0 was asked for)."""
        self.connect_address = parse_address(connect) if isinstance(connect, str) else connect
        self.platform = platform
        self.buffer_size = buffer_size
        self.connect_timeout = connect_timeout
        self._requested = self.listen_address
        self._server: asyncio.AbstractServer | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._links: set[_Link] = set()
        self._numbers = itertools.count(1)
        self._stopped: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.max_connections = max_connections
        self.accepted = 0
        """Connections accepted so far."""
        self.refused = 0
        """Connections closed at once because ``max_connections`` were open."""

    def __repr__(self) -> str:
        return (
            f"<Bridge {self.listen_address} -> {self.connect_address} "
            f"{len(self._links)} connections>"
        )

    @property
    def active(self) -> int:
        """Bridged connections currently open."""
        return len(self._links)

    def connections(self) -> list[ConnectionInfo]:
        """A snapshot of every open bridged connection, oldest first."""
        return [
            ConnectionInfo(
                number=link.number,
                origin=link.origin,
                bytes_in=link.inbound.bytes_in,
                bytes_out=link.outbound.bytes_in,
                queued=_queued(link.inbound) + _queued(link.outbound),
                reading=(_reading(link.inbound), _reading(link.outbound)),
            )
            for link in sorted(self._links, key=lambda link: link.number)
        ]

    def _factory(self) -> asyncio.BaseProtocol:
        if self.max_connections is not None and len(self._links) >= self.max_connections:
            self.refused += 1
            return _Refused(self)
        link = _Link(self, next(self._numbers))
        self.accepted += 1
        self._links.add(link)
        link.closing = self._closed
        return link.inbound

    def _link_done(self, link: _Link) -> None:
        self._links.discard(link)

    async def start(self) -> None:
        """Start listening (returns once the listener is ready)."""
        if self._server is not None:
            return
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        server = await self._requested.listen(
            self._factory, platform=self.platform, buffer_size=self.buffer_size
        )
        self._server = server
        self.listen_address = self._requested.bound(server)
        self._watcher = loop.create_task(self._watch(server))
        logger.info("listening on %s, connecting to %s", self.listen_address, self.connect_address)

    async def _watch(self, server: asyncio.AbstractServer) -> None:
        """Surface a listener that stops by itself (e.g. a vchan server losing XenStore)."""
        try:
            await server.serve_forever()
        except asyncio.CancelledError:
            pass  # asyncio.Server.serve_forever raises this when the server is closed
        except Exception as exc:
            if not self._closed:
                logger.error("listener %s failed: %s", self.listen_address, exc)
                self._error = exc
                self.close()

    async def serve_forever(self) -> None:
        """Run until [`close`][] or cancellation (which closes the bridge); raises the
        listener's error if it failed."""
        await self.start()
        stopped = self._stopped
        assert stopped is not None
        try:
            await asyncio.shield(stopped)
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop listening and close every bridged connection (each flushes what it has
        queued, then ends).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        if self._watcher is not None:
            self._watcher.cancel()  # uvloop's serve_forever() does not end on close()
        for link in list(self._links):
            link.close()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def abort(self) -> None:
        """Like [`close`][], discarding queued data."""
        self.close()
        for link in list(self._links):
            link.abort()

    async def wait_closed(self) -> None:
        """Wait until the listener is gone and every bridged connection has closed."""
        server = self._server
        if server is not None:
            await server.wait_closed()
            if self._watcher is not None:
                await asyncio.gather(self._watcher, return_exceptions=True)
            self._requested.cleanup(server)
        while self._links:
            await asyncio.gather(*(link.done for link in list(self._links)))

    async def aclose(self, grace: float | None = DEFAULT_GRACE) -> None:
        """[`close`][], wait up to ``grace`` seconds for the connections to flush, then
        [`abort`][] the rest and wait for them."""
        self.close()
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(self.wait_closed())
        except TimeoutError:
            if self.active:
                logger.warning("aborting %d bridged connections that did not close", self.active)
            self.abort()
            await self.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def start_bridge(
    listen: Address | str,
    connect: Address | str,
    *,
    platform: Platform | None = None,
    buffer_size: int = vchan.DEFAULT_SIZE,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    max_connections: int | None = None,
) -> Bridge:
    """Create a [`Bridge`][] and start listening."""
    bridge = Bridge(
        listen,
        connect,
        platform=platform,
        buffer_size=buffer_size,
        connect_timeout=connect_timeout,
        max_connections=max_connections,
    )
    await bridge.start()
    return bridge


async def run_bridge_command(
    listen: Address,
    connect: Address,
    *,
    buffer_size: int = vchan.DEFAULT_SIZE,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    grace: float | None = DEFAULT_GRACE,
    verbose: bool = False,
    max_connections: int | None = None,
    on_ready: Callable[[Address], Callable[[], None] | None] | None = None,
) -> int:
    """``aioxen bridge``: run until SIGTERM/SIGINT (exit 0; the command exits 128 + the
    signal) or a listener failure (1).  ``on_ready(address)`` is called once listening
    (readiness for a supervisor); what it returns is called when stopping."""
    # Never a blocking write to stderr from the event loop: a pipe nobody reads would
    # freeze the bridge after 64 KiB of warnings, which any client can cause.
    handler = StderrLogHandler()
    handler.setFormatter(logging.Formatter("aioxen bridge: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    loop_logger = logging.getLogger("asyncio")  # e.g. accept() at the descriptor limit
    loop_logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    stop = StopSignals()  # SIGINT/SIGTERM: orderly stop
    try:
        async with contextlib.AsyncExitStack() as stack:
            plat: Platform | None = None
            if listen.uses_vchan or connect.uses_vchan:
                check_root_env()  # a missing or non-directory $XEN_ROOT: before any I/O
                plat = await stack.enter_async_context(aioxen.platform())
            bridge = Bridge(
                listen,
                connect,
                platform=plat,
                buffer_size=buffer_size,
                connect_timeout=connect_timeout,
                max_connections=max_connections,
            )
            try:
                await bridge.start()
            except OSError as exc:
                # strerror alone: "[Errno 98]" adds nothing to a message naming the holder
                raise _Fatal(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
            except ProtocolError as exc:
                raise _Fatal(f"cannot listen on {listen}: {exc}") from exc
            print(f"aioxen bridge: listening on {bridge.listen_address}", flush=True)
            if on_ready is not None:
                try:
                    undo = on_ready(bridge.listen_address)
                except Exception as exc:  # e.g. an --env-file that cannot be written
                    await bridge.aclose(0)
                    raise _Fatal(str(exc)) from exc
                if undo is not None:
                    stack.callback(undo)
            serving = asyncio.ensure_future(bridge.serve_forever())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                await bridge.aclose(grace)
                if serving.done() and not serving.cancelled() and serving.exception():
                    raise _Fatal(f"listener {bridge.listen_address} failed: {serving.exception()}")
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)
    except (_Fatal, CommandError) as exc:
        handler.flush()  # the log lines before the message that ends the command
        print(f"aioxen bridge: {exc}", file=sys.stderr)
        return 1
    except (PlatformError, OSError, ProtocolError) as exc:
        handler.flush()
        print(f"aioxen bridge: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.close()
        logger.removeHandler(handler)
        loop_logger.removeHandler(handler)
        handler.close()
        logger.level, logger.propagate = saved
    return 0


class _Fatal(Exception):
    pass


__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_GRACE",
    "Bridge",
    "ConnectionInfo",
    "run_bridge_command",
    "start_bridge",
]
