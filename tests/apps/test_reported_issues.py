"""Problems found in code this package uses (reported to the lead), pinned as strict
xfails: each one starts passing -- and so fails here -- once it is fixed upstream."""

from __future__ import annotations

import asyncio

import pytest

from aioxen import vchan
from aioxen.apps.embedded import EmbeddedRoot


@pytest.mark.xfail(
    strict=True,
    raises=BufferError,
    reason="UnixPlatform.close() right after a vchan transport closed (its release runs on "
    "the next loop turn) raises BufferError: cannot close exported pointers exist",
)
async def test_platform_close_right_after_transport_close() -> None:
    async with EmbeddedRoot() as world:
        p0, p2 = world.platform(0), world.platform(2)
        await p0.open()
        await p2.open()

        async def drain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server = await vchan.start_server(drain, 2, "x", platform=p0)
        try:
            _, writer = await vchan.open_connection(0, "x", platform=p2, timeout=10)
            writer.close()
            await p2.close()  # same loop turn as the close: the transport still holds views
        finally:
            server.close()
            await server.wait_closed()
            await asyncio.sleep(0.1)  # let the server's connection see the end and release
            await p0.close()
            await asyncio.sleep(0.1)
            await p2.close()
