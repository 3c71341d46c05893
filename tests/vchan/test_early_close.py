"""A client that connects, writes and closes before the server looks must not lose data.

The server's ``wait_connected`` used to take ``cli_live == 0`` for "client closed before
connecting" and drop the endpoint, silently discarding what the client had written.  Now a
closed client that left bytes in the left ring or announced its ends is delivered: the
server reads every byte, then EOF (clean close) or ``ConnectionResetError`` (abort).
"""

from __future__ import annotations

import asyncio

import pytest
from vchan_harness import World, raw_streams

from aioxen.vchan import wire
from aioxen.vchan.endpoint import PendingServer, attach_client

SERVER, CLIENT = 1, 2
PAYLOAD = bytes(range(256)) * 128  # 32 KiB: fits the 64 KiB ring, so close needs no reader
pytestmark = pytest.mark.timeout(120)


streams = raw_streams


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_client_gone_before_server_looks_still_delivers(world: World, how: str) -> None:
    srv = await world.platform(SERVER)
    cli = await world.platform(CLIENT)
    pending = await PendingServer.create(srv, CLIENT, "early")
    client = await attach_client(cli, SERVER, "early", pending.ring_ref, pending.event_channel)
    _, writer = streams(client)
    writer.write(PAYLOAD)
    await writer.drain()
    if how == "close":
        writer.close()
        async with asyncio.timeout(10):
            await writer.wait_closed()
    else:
        writer.transport.abort()
        await asyncio.sleep(0)
    server = await pending.wait_connected(timeout=10)  # the client is already gone
    reader, swriter = streams(server)
    async with asyncio.timeout(10):
        assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD
        if how == "close":
            assert await reader.read() == b""
        else:
            with pytest.raises(ConnectionResetError):
                await reader.read()
    swriter.close()


async def test_client_that_never_wrote_is_still_closed_before_connecting(world: World) -> None:
    srv = await world.platform(SERVER)
    pending = await PendingServer.create(srv, CLIENT, "never")
    pending._ctrl[wire.CLI_LIVE] = wire.LIVE_CLOSED  # cli_live = 0 with no data and no announcement
    with pytest.raises(ConnectionAbortedError, match="closed before connecting"):
        await pending.wait_connected(timeout=10)
    pending.close()
