"""aioxen vchan against the real libxenvchan (``vchan-socket-proxy``) in dom0, both roles,
on real grants and event channels; and a killed peer detected through the unmap notify."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal

import pytest

from aioxen import vchan
from aioxen.platforms.xen import XenPlatform

HANG = 30.0  # hang guard only
PROXY = "/usr/lib/xen-4.17/bin/vchan-socket-proxy"
_ids = itertools.count()


def port_name() -> str:
    return f"lab{os.getpid()}x{next(_ids)}"


async def start_proxy(mode: str, port: str) -> asyncio.subprocess.Process:
    """``vchan-socket-proxy -m MODE 0 <path> -``: the vchan bridged to its stdin/stdout."""
    path = vchan.vchan_path(0, 0, port)
    return await asyncio.create_subprocess_exec(
        PROXY,
        "-m",
        mode,
        "0",
        path,
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def wait_advertised(plat: XenPlatform, port: str) -> None:
    path = f"/local/domain/0/data/vchan/0/{port}/event-channel"
    async with plat.store.watch(path) as w:
        while not await plat.store.exists(path):
            await w.next(timeout=HANG)


async def test_aioxen_client_to_libxenvchan_server(plat: XenPlatform) -> None:
    port = port_name()
    proxy = await start_proxy("server", port)
    try:
        assert proxy.stdin and proxy.stdout
        await wait_advertised(plat, port)
        reader, writer = await vchan.open_connection(0, port, platform=plat, timeout=HANG)
        writer.write(b"hello from aioxen\n")
        await writer.drain()
        assert await asyncio.wait_for(proxy.stdout.readline(), HANG) == b"hello from aioxen\n"
        big = bytes(range(256)) * 64  # 16 KiB: larger than libxenvchan's in-page rings
        proxy.stdin.write(big)
        await proxy.stdin.drain()
        assert await asyncio.wait_for(reader.readexactly(len(big)), HANG) == big
        writer.write(big)
        await writer.drain()
        assert await asyncio.wait_for(proxy.stdout.readexactly(len(big)), HANG) == big
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), HANG)
    finally:
        await stop(proxy)


async def test_libxenvchan_client_to_aioxen_server(plat: XenPlatform) -> None:
    port = port_name()
    got: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await got.put((reader, writer))

    server = await vchan.start_server(on_client, 0, port, platform=plat)
    proxy = await start_proxy("client", port)
    try:
        assert proxy.stdin and proxy.stdout
        reader, writer = await asyncio.wait_for(got.get(), HANG)
        proxy.stdin.write(b"ping from libxenvchan\n")
        await proxy.stdin.drain()
        assert await asyncio.wait_for(reader.readline(), HANG) == b"ping from libxenvchan\n"
        payload = os.urandom(200_000)  # several times the 64 KiB ring
        writer.write(payload)
        await writer.drain()
        assert await asyncio.wait_for(proxy.stdout.readexactly(len(payload)), HANG) == payload
        writer.close()
    finally:
        await stop(proxy)
        server.close()
        await server.wait_closed()


async def test_killed_libxenvchan_peer_is_detected(plat: XenPlatform) -> None:
    """SIGKILL the C client: its unmap notify clears cli_live and fires the event channel,
    so our reader ends (EOF or ConnectionResetError) instead of hanging."""
    port = port_name()
    got: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await got.put((reader, writer))

    server = await vchan.start_server(on_client, 0, port, platform=plat)
    proxy = await start_proxy("client", port)
    try:
        assert proxy.stdin
        reader, _writer = await asyncio.wait_for(got.get(), HANG)
        proxy.stdin.write(b"last words\n")
        await proxy.stdin.drain()
        assert await asyncio.wait_for(reader.readline(), HANG) == b"last words\n"
        proxy.send_signal(signal.SIGKILL)
        await proxy.wait()
        try:
            rest = await asyncio.wait_for(reader.read(), HANG)
        except ConnectionResetError:
            rest = b""
        assert rest == b""
    finally:
        await stop(proxy)
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("size", [4096, 65536, 1 << 20])
async def test_aioxen_to_aioxen_over_real_grants(
    plat: XenPlatform, plat2: XenPlatform, size: int
) -> None:
    port = port_name()
    payload = os.urandom(3 * size + 17)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await vchan.start_server(echo, 0, port, platform=plat, read_size=size, write_size=size)
    try:
        async with vchan.connect(0, port, platform=plat2, timeout=HANG) as (reader, writer):

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()

            sender = asyncio.ensure_future(send())
            echoed = await asyncio.wait_for(reader.read(-1), HANG)
            await sender
        assert echoed == payload
    finally:
        server.close()
        await server.wait_closed()
