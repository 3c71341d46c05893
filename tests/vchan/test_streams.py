"""Stream API over real platforms (``inheap`` and ``unix``), in one process."""

from __future__ import annotations

import asyncio

from vchan_harness import World

from aioxen import vchan

SERVER, CLIENT = 1, 2


async def test_roundtrip_and_eof(world: World) -> None:
    srv_plat = await world.platform(SERVER)
    cli_plat = await world.platform(CLIENT)
    got: list[bytes] = []
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        got.append(data)
        writer.write(data[::-1])
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await vchan.start_server(handle, CLIENT, "rt", platform=srv_plat)
    async with server:
        async with vchan.connect(SERVER, "rt", platform=cli_plat) as (reader, writer):
            writer.write(b"hello vchan")
            writer.write_eof()
            assert await reader.read() == b"nahcv olleh"
        await done.wait()
    assert got == [b"hello vchan"]
