"""Bridge addresses: ``tcp:HOST:PORT``, ``unix:PATH``, ``vchan:DOMID/PORT``.

Theory of operation
-------------------
An [`Address`][] knows how to *listen* (return an `asyncio.AbstractServer` that
makes one protocol per accepted connection) and how to *connect* (return the transport of
one new connection) -- the same two calls, ``create_server`` and ``create_connection``,
that asyncio offers for TCP and Unix sockets and [`aioxen.vchan`][] offers for vchans.
[`parse_address`][] turns the command-line spelling into one; ``str()`` gives it back.

Listeners are exclusive: a ``unix:PATH`` listener claims PATH through
[`aioxen.ownership.UnixSocketClaim`][] and removes only the socket it bound; a
``vchan:D/P`` listener claims the advertisement ([`aioxen.vchan.advertise`][]); a TCP
port in use fails in ``bind``.  All three fail with ``OSError(EADDRINUSE)``.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from aioxen import vchan
from aioxen.ownership import UnixSocketClaim
from aioxen.platforms.base import Platform

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

MAX_VCHAN_PORT = 64
"""The longest vchan port name the commands accept (XenStore paths are bounded; a port
name is a name, not a payload)."""


def check_vchan_port(name: str) -> str:
    """A vchan port name for a command line: ``[A-Za-z0-9_-]+`` and at most
    [`MAX_VCHAN_PORT`][] characters; ``ValueError`` saying which rule it breaks."""
    if len(name) > MAX_VCHAN_PORT:
        raise ValueError(
            f"vchan port name of {len(name)} characters: at most {MAX_VCHAN_PORT} allowed"
        )
    return vchan.check_port(name)


class Address(abc.ABC):
    """Somewhere to listen or to connect to."""

    @abc.abstractmethod
    async def listen(
        self, factory: ProtocolFactory, *, platform: Platform | None, buffer_size: int
    ) -> asyncio.AbstractServer:
        """Start accepting; one ``factory()`` protocol per connection."""

    @abc.abstractmethod
    async def connect(
        self, factory: ProtocolFactory, *, platform: Platform | None, timeout: float | None
    ) -> asyncio.BaseTransport:
        """Open one connection driving ``factory()``; ``TimeoutError`` after ``timeout``."""

    def bound(self, server: asyncio.AbstractServer) -> Address:
        """The address ``server`` (from [`listen`][]) really listens on."""
        return self

    def cleanup(self, server: asyncio.AbstractServer) -> None:  # noqa: B027 - optional hook
        """Remove what listening left behind (a Unix socket file) once ``server`` closed."""

    @property
    def uses_vchan(self) -> bool:
        return False


@dataclass(frozen=True)
class TcpAddress(Address):
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    async def listen(
        self, factory: ProtocolFactory, *, platform: Platform | None, buffer_size: int
    ) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        return await loop.create_server(factory, self.host, self.port, reuse_address=True)

    async def connect(
        self, factory: ProtocolFactory, *, platform: Platform | None, timeout: float | None
    ) -> asyncio.BaseTransport:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(factory, self.host, self.port)
        except TimeoutError:
            raise TimeoutError(f"connecting to {self} took more than {timeout} s") from None
        return transport

    def bound(self, server: asyncio.AbstractServer) -> Address:
        sockets = getattr(server, "sockets", None) or ()
        for sock in sockets:
            name = sock.getsockname()
            return TcpAddress(str(name[0]), int(name[1]))
        return self


@dataclass(frozen=True)
class UnixAddress(Address):
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"

    async def listen(
        self, factory: ProtocolFactory, *, platform: Platform | None, buffer_size: int
    ) -> asyncio.AbstractServer:
        """Claim the path (`UnixSocketClaim`: ``PATH.lock``; a live
        socket is ``ResourceBusy``, a link/non-socket/foreign socket is refused, only a
        stale socket of ours is replaced), bind it ourselves and serve on that socket
        (asyncio would otherwise unlink whatever socket is at the path)."""
        loop = asyncio.get_running_loop()
        claim = UnixSocketClaim.acquire(self.path)
        try:
            sock = claim.bind()
            try:
                server = await loop.create_unix_server(factory, sock=sock)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            claim.release()
            raise
        _unix_claims[server] = claim
        return server

    async def connect(
        self, factory: ProtocolFactory, *, platform: Platform | None, timeout: float | None
    ) -> asyncio.BaseTransport:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_unix_connection(factory, self.path)
        except TimeoutError:
            raise TimeoutError(f"connecting to {self} took more than {timeout} s") from None
        except OSError as exc:
            if exc.filename is None and exc.strerror:
                raise type(exc)(exc.errno, f"{exc.strerror}: {self.path}") from None
            raise
        return transport

    def cleanup(self, server: asyncio.AbstractServer) -> None:
        """Unlink the socket we bound (only if the path still is that socket) and drop
        the claim."""
        claim = _unix_claims.pop(server, None)
        if claim is not None:
            claim.release()


_unix_claims: dict[asyncio.AbstractServer, UnixSocketClaim] = {}
"""The claim behind each Unix listener [`UnixAddress.listen`][] made, until cleanup."""


@dataclass(frozen=True)
class VchanAddress(Address):
    domid: int
    """The peer domain: the server's for `connect`, the clients' for `listen`."""
    port: str

    def __post_init__(self) -> None:
        check_vchan_port(self.port)
        if not 0 <= self.domid < 0x7FF0:
            raise ValueError(f"domid {self.domid} out of range 0..32751")

    def __str__(self) -> str:
        return f"vchan:{self.domid}/{self.port}"

    @property
    def uses_vchan(self) -> bool:
        return True

    async def listen(
        self, factory: ProtocolFactory, *, platform: Platform | None, buffer_size: int
    ) -> asyncio.AbstractServer:
        return await vchan.create_server(
            factory,
            self.domid,
            self.port,
            platform=platform,
            read_size=buffer_size,
            write_size=buffer_size,
        )

    async def connect(
        self, factory: ProtocolFactory, *, platform: Platform | None, timeout: float | None
    ) -> asyncio.BaseTransport:
        transport, _ = await vchan.create_connection(
            factory, self.domid, self.port, platform=platform, timeout=timeout
        )
        return transport


def _shown(text: str) -> str:
    """``text`` quoted for a message, cut short when long."""
    return repr(text) if len(text) <= 80 else repr(text[:60]) + f"... ({len(text)} characters)"


def parse_address(text: str, *, any_port: bool = True, bare_tcp: bool = False) -> Address:
    """``tcp:HOST:PORT`` (``tcp:[V6ADDR]:PORT``), ``unix:PATH`` or ``vchan:DOMID/PORT``;
    with ``bare_tcp`` also ``HOST:PORT`` / ``[V6ADDR]:PORT``.  TCP port 0 ("any free
    port", for listening) only with ``any_port``.  ``ValueError`` naming what is wrong."""
    if len(text) > 4096:
        raise ValueError(f"address {_shown(text)}: {len(text)} characters is too long")
    scheme, sep, rest = text.partition(":")
    if bare_tcp and scheme not in ("tcp", "unix", "vchan") and sep:
        scheme, rest = "tcp", text
    if not sep:
        raise ValueError(
            f"address {_shown(text)}: expected tcp:HOST:PORT, unix:PATH or vchan:DOMID/PORT"
        )
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"address {_shown(text)}: expected tcp:HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(
                f"address {_shown(text)}: write an IPv6 host in brackets: tcp:[{host}]:PORT"
            )
        if not port.isdecimal():
            raise ValueError(f"address {_shown(text)}: TCP port {port!r} is not a number")
        number = int(port)
        low = 0 if any_port else 1
        if not low <= number <= 65535:
            extra = " (0: any free port)" if any_port else ""
            raise ValueError(
                f"address {_shown(text)}: TCP port {number} out of range {low}..65535{extra}"
            )
        return TcpAddress(host, number)
    if scheme == "unix":
        if not rest:
            raise ValueError(f"address {_shown(text)}: expected unix:PATH")
        return UnixAddress(rest)
    if scheme == "vchan":
        domid, sep, port = rest.partition("/")
        if not sep:
            raise ValueError(f"address {_shown(text)}: expected vchan:DOMID/PORT")
        if not domid.isdecimal():
            raise ValueError(f"address {_shown(text)}: domid {domid!r} is not a number")
        try:
            return VchanAddress(int(domid), port)
        except ValueError as exc:
            raise ValueError(f"address {_shown(text)}: {exc}") from None
    raise ValueError(f"address {_shown(text)}: unknown scheme {scheme!r} (tcp, unix or vchan)")


__all__ = [
    "MAX_VCHAN_PORT",
    "Address",
    "TcpAddress",
    "UnixAddress",
    "VchanAddress",
    "check_vchan_port",
    "parse_address",
]
