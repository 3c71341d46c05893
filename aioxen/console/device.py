"""The PV console device (``io/console.h``): back end and front end as asyncio streams.

Theory of operation
-------------------
A console device ``console/N`` is one shared page (``struct xencons_interface``: ``in``
1024 bytes towards the guest, ``out`` 2048 bytes from it) and one event channel.  The
front end (the guest) grants the page, allocates the channel and publishes them as
``ring-ref`` and ``port`` in its device directory (the keys Linux's ``hvc_xen`` uses for
consoles other than the primary one), then goes ``Initialised``; the back end (the role of
``xenconsoled``) maps the page, binds the channel and goes ``Connected``.  The xenbus side
is [`DeviceRunner`][aioxen.xenbus.driver.DeviceRunner]; this module supplies the two drivers and
wraps each connection in a [`ByteRingTransport`][aioxen.rings.stream.ByteRingTransport] with the
stdlib ``StreamReader``/``StreamWriter``:

* [`ConsoleBackend`][] — ``await be.accept()`` returns ``(reader, writer)`` for the next
  connection: the reader yields what the guest writes, the writer types into the guest.
  When the front end closes (or its process dies) the reader sees EOF and the back end
  waits for the next front end (a restarted guest reconnects).
* [`ConsoleFrontend`][] — ``reader``/``writer`` the other way round; ``close()`` is
  the orderly xenbus close (``Closing`` → ``Closed``).  It first makes sure no other
  front end (a guest kernel's ``hvc_xen``) holds the device (``aioxen.console.inuse``).

The device is created by the toolstack step (``aioxen device add console FRONT --devid N``
or [`create_console`][]).  Device numbers default to 1: on Xen, console 0 is the
primary console at ``/local/domain/<id>/console``, which is not a xenbus device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from aioxen.console.inuse import check_frontend_free
from aioxen.errors import ProtocolError
from aioxen.platforms import resolve
from aioxen.platforms.base import EventChannel, Platform, Share
from aioxen.platforms.base import Mapping as GrantMapping
from aioxen.rings.byte import CONSOLE, ByteRing
from aioxen.rings.stream import ByteRingTransport, open_streams
from aioxen.xenbus.driver import (
    BackendDriver,
    DeviceRunner,
    FrontendDriver,
    XenbusDevice,
    backend_device,
    frontend_device,
    read_int,
)
from aioxen.xenbus.state import XenbusState
from aioxen.xenbus.toolstack import add_device, remove_device

log = logging.getLogger(__name__)

TYPE = "console"
DEFAULT_DEVID = 1
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Session:
    """One connection's resources, released in order by [`close`][]."""

    def __init__(self) -> None:
        self.ring: ByteRing | None = None
        self.memory: Share | GrantMapping | None = None
        self.channel: EventChannel | None = None
        self.transport: ByteRingTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def end(self, orderly: bool) -> None:
        """Stop the stream: orderly (drain, EOF) or at once."""
        t = self.transport
        if t is not None:
            if orderly:
                t.peer_closed()
            else:
                t.abort()

    def release(self) -> None:
        for r in (self.ring, self.memory, self.channel):
            if r is not None:
                with contextlib.suppress(Exception):
                    r.close()
        self.ring = self.memory = self.channel = None


async def _streams(dev: XenbusDevice, session: _Session, side: str) -> Streams:
    assert session.ring is not None and session.channel is not None

    def on_close(exc: BaseException | None) -> None:
        if not session.closed.done():
            session.closed.set_result(None)
        if exc is not None or (session.channel is not None and session.channel.peer_lost):
            dev.peer_lost(exc)

    reader, writer, transport = await open_streams(
        session.ring,
        session.channel,
        extra={"peername": (dev.peer_domid, dev.devid), "xenbus": dev.own_dir, "side": side},
        on_close=on_close,
    )
    session.transport = transport
    return reader, writer


class ConsoleBackendDriver(BackendDriver):
    """Maps the guest's console page; each connection goes to ``self.connections``."""

    type = TYPE

    def __init__(self) -> None:
        self.connections: asyncio.Queue[Streams] = asyncio.Queue()
        self._session: _Session | None = None

    async def advertise(self, dev: XenbusDevice) -> Mapping[str, str]:
        return {"protocol": "vt100"}

    async def connect(self, dev: XenbusDevice) -> None:
        ref = read_int(await dev.read_peer("ring-ref"), f"{dev.peer_dir}/ring-ref", -1)
        port = read_int(await dev.read_peer("port"), f"{dev.peer_dir}/port", -1, 1, 2**31)
        if ref < 0 or port < 0:
            raise ProtocolError(
                f"{dev.peer_dir}: front end is Initialised without ring-ref/port", field="ring-ref"
            )
        session = _Session()
        try:
            mapping = dev.platform.grants.map(dev.peer_domid, [ref])
            session.memory = mapping
            session.ring = ByteRing(mapping.buf, CONSOLE, side="back")
            session.channel = await dev.platform.events.connect(dev.peer_domid, port)
            streams = await _streams(dev, session, "back")
        except BaseException:
            session.release()
            raise
        self._session = session
        self.connections.put_nowait(streams)

    async def disconnect(self, dev: XenbusDevice) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        session.end(orderly=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await session.closed
        session.release()


class ConsoleFrontendDriver(FrontendDriver):
    """Grants the console page and offers it to the back end."""

    type = TYPE

    def __init__(self) -> None:
        self.connections: asyncio.Queue[Streams] = asyncio.Queue()
        self._session: _Session | None = None

    def published_keys(self) -> tuple[str, ...]:
        return ("ring-ref", "port")

    async def connect(self, dev: XenbusDevice) -> Mapping[str, str]:
        await self.disconnect(dev)
        session = _Session()
        try:
            share = dev.platform.grants.share(dev.peer_domid, 1)
            session.memory = share
            session.ring = ByteRing(share.buf, CONSOLE, side="front", init=True)
            session.channel = await dev.platform.events.listen(dev.peer_domid)
        except BaseException:
            session.release()
            raise
        self._session = session
        return {"ring-ref": str(share.refs[0]), "port": str(session.channel.port)}

    async def connected(self, dev: XenbusDevice) -> None:
        session = self._session
        if session is None:
            raise ConnectionResetError(f"{dev!r}: connected without a console page")
        self.connections.put_nowait(await _streams(dev, session, "front"))

    async def disconnect(self, dev: XenbusDevice) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if session.transport is not None:
            session.end(orderly=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await session.closed
        session.release()


class _Endpoint:
    """A runner task plus the queue of connections its driver produces."""

    def __init__(self, runner: DeviceRunner, driver: Any) -> None:
        self.runner = runner
        self.driver = driver
        self.task = asyncio.ensure_future(runner.run())

    @property
    def device(self) -> XenbusDevice:
        return self.runner.dev

    async def _next(self, timeout: float | None) -> Streams:
        queue: asyncio.Queue[Streams] = self.driver.connections
        async with asyncio.timeout(timeout):
            get = asyncio.ensure_future(queue.get())
            try:
                done, _ = await asyncio.wait({get, self.task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not get.done():
                    get.cancel()
            if get in done:
                return get.result()
            exc = self.task.exception() if not self.task.cancelled() else None
            raise ConnectionResetError(
                f"console {self.device.own_dir}: device runner stopped"
                + (f": {exc}" if exc else "")
            )

    async def close(self, timeout: float | None = 10.0) -> None:
        """Orderly close (``Closing`` → ``Closed``), then stop the runner."""
        if not self.task.done():
            with contextlib.suppress(Exception):
                await self.runner.close(timeout=timeout)
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ConsoleBackend(_Endpoint):
    """The back end of ``console/devid`` of ``frontend_domid`` (this domain serves it)."""

    @classmethod
    async def start(
        cls,
        frontend_domid: int,
        devid: int = DEFAULT_DEVID,
        *,
        platform: Platform | None = None,
        create: bool = False,
    ) -> ConsoleBackend:
        """Start serving.  With ``create``, first run the toolstack step if the device
        does not exist (needs toolstack rights)."""
        plat = await resolve(platform)
        if create:
            with contextlib.suppress(FileExistsError):
                await create_console(frontend_domid, devid, platform=plat)
        dev = await backend_device(plat, TYPE, frontend_domid, devid)
        driver = ConsoleBackendDriver()
        return cls(DeviceRunner(dev, driver), driver)

    async def accept(self, timeout: float | None = None) -> Streams:
        """The next front end connection: ``(reader of guest output, writer to guest)``."""
        return await self._next(timeout)


class ConsoleFrontend(_Endpoint):
    """The front end (guest side) of this domain's ``console/devid``."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(
        cls,
        backend_domid: int | None = None,
        devid: int = DEFAULT_DEVID,
        *,
        platform: Platform | None = None,
        timeout: float | None = 30.0,
        reconnect: bool = True,
        force: bool = False,
    ) -> ConsoleFrontend:
        """Connect this domain's console ``devid`` and wait (bounded) until the back end
        is ``Connected``.

        Refuses with ``aioxen.console.inuse.FrontendInUse``
        (``OSError(EBUSY)``), before writing anything, if a kernel driver is bound to the
        device (``hvc_xen``; the message says how to unbind it) or its XenStore state says
        a front end without an aioxen owner record is at work; ``force`` takes over such
        a state (left by a front end that died), never a bound kernel driver.  See
        ``aioxen.console.inuse``."""
        plat = await resolve(platform)
        dev = await frontend_device(plat, TYPE, devid, backend_domid=backend_domid, timeout=timeout)
        await check_frontend_free(dev, force=force)
        driver = ConsoleFrontendDriver()
        self = cls(DeviceRunner(dev, driver, reconnect=reconnect), driver)
        try:
            self.reader, self.writer = await self._next(timeout)
        except BaseException:
            await self.close(timeout=2)
            raise
        return self

    async def reconnected(self, timeout: float | None = None) -> Streams:
        """After the back end restarted: the streams of the new connection."""
        self.reader, self.writer = await self._next(timeout)
        return self.reader, self.writer


async def create_console(
    frontend_domid: int,
    devid: int = DEFAULT_DEVID,
    *,
    backend_domid: int | None = None,
    platform: Platform | None = None,
    replace: bool = False,
) -> None:
    """The toolstack step for a console (back end: this domain unless given)."""
    plat = await resolve(platform)
    be = plat.domid if backend_domid is None else backend_domid
    await add_device(
        plat.store, TYPE, frontend_domid, be, devid,
        frontend_keys={"type": "aioxen", "limit": "1048576"},
        backend_keys={"protocol": "vt100"}, replace=replace,
    )  # fmt: skip


async def remove_console(
    frontend_domid: int,
    devid: int = DEFAULT_DEVID,
    *,
    backend_domid: int | None = None,
    platform: Platform | None = None,
    force: bool = False,
) -> bool:
    plat = await resolve(platform)
    be = plat.domid if backend_domid is None else backend_domid
    return await remove_device(plat.store, TYPE, frontend_domid, be, devid, force=force)


__all__ = [
    "DEFAULT_DEVID",
    "ConsoleBackend",
    "ConsoleBackendDriver",
    "ConsoleFrontend",
    "ConsoleFrontendDriver",
    "XenbusState",
    "create_console",
    "remove_console",
]
