"""Test worlds for vchan: platforms with a XenStore attached, on ``inheap`` and ``unix``.

``Platform.store`` is provided by :class:`StoreWired`, a thin delegating platform that
adds a given :class:`~aioxen.xenstore.XenStoreClient` to any platform (the in-process
engine for ``inheap``, a real ``aioxen xenstored`` process for ``unix``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from support.xenstored import Xenstored

from aioxen.platforms.base import Platform
from aioxen.vchan.endpoint import Connection
from aioxen.vchan.transport import VchanTransport
from aioxen.xenstore import XenStoreClient
from aioxen.xenstore.engine import Engine, Quotas

HERE = Path(__file__).resolve().parent


def raw_streams(conn: Connection) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Stdlib streams straight over a raw :class:`Connection` (no server/client helpers)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = VchanTransport(loop, conn, protocol)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A stream server handler that echoes everything, then closes."""
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


class StoreWired(Platform):
    """``inner``'s events and grants plus ``store``; closing closes both."""

    def __init__(self, inner: Platform, store: XenStoreClient) -> None:
        super().__init__(inner.domid)
        self.inner = inner
        self._store = store
        self.name = inner.name

    @property
    def events(self) -> Any:
        return self.inner.events

    @property
    def grants(self) -> Any:
        return self.inner.grants

    @property
    def store(self) -> XenStoreClient:
        return self._store

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self._store.close()
        await self.inner.close()

    def leaks(self) -> list[str]:
        return list(self.inner.leaks())  # type: ignore[attr-defined]


class World:
    """Platforms sharing one hypervisor + XenStore; :meth:`close` checks for leaks."""

    name = "?"

    def __init__(self) -> None:
        self.platforms: list[StoreWired] = []

    async def platform(self, domid: int) -> StoreWired:
        raise NotImplementedError

    def leaks(self) -> list[str]:
        out: list[str] = []
        for p in self.platforms:
            out += [f"{p!r}: {leak}" for leak in p.leaks()]
        return out

    async def close(self) -> None:
        for p in self.platforms:
            await p.close()

    def world_leaks(self) -> list[str]:
        return []


class InHeapWorld(World):
    name = "inheap"

    def __init__(self) -> None:
        super().__init__()
        from aioxen.platforms.inheap import InHeapWorld as _World

        self.world = _World()
        self.engine = Engine(Quotas())

    async def platform(self, domid: int) -> StoreWired:
        from aioxen.platforms.inheap import InHeapPlatform

        inner = InHeapPlatform(domid=domid, world=self.world)
        p = StoreWired(inner, XenStoreClient.in_process(self.engine, domid, timeout=10))
        await p.open()
        self.platforms.append(p)
        return p

    def world_leaks(self) -> list[str]:
        return self.world.leaks()

    async def read_store(self, path: str) -> bytes:
        c = XenStoreClient.in_process(self.engine, 0, timeout=10)
        try:
            return bytes(await c.read(path))
        finally:
            await c.close()


class UnixWorld(World):
    name = "unix"

    def __init__(self, xenstored: Xenstored) -> None:
        super().__init__()
        self.xenstored = xenstored

    async def platform(self, domid: int) -> StoreWired:
        from aioxen.platforms.unix import UnixPlatform

        inner = UnixPlatform(domid=domid, root=str(self.xenstored.root))
        store = XenStoreClient.for_unix_socket(self.xenstored.socket, domid, timeout=10)
        p = StoreWired(inner, store)
        await p.open()
        self.platforms.append(p)
        return p

    def world_leaks(self) -> list[str]:
        from aioxen.platforms.unix import root_leaks

        return list(root_leaks(str(self.xenstored.root)))

    async def read_store(self, path: str) -> bytes:
        c = XenStoreClient.for_unix_socket(self.xenstored.socket, 0, timeout=10)
        try:
            return bytes(await c.read(path))
        finally:
            await c.close()


def wire_store(plat: Platform) -> Platform:
    """In a child process: the environment's platform with a socket XenStore client."""
    sock = os.environ["XENSTORED_PATH"]
    try:
        plat.store  # noqa: B018 - the lead may have wired it already
        return plat
    except NotImplementedError:
        return StoreWired(plat, XenStoreClient.for_unix_socket(sock, plat.domid, timeout=10))
