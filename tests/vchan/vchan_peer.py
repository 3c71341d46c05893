"""A vchan peer process for the cross-process tests (``unix`` platform).

Usage: ``vchan_peer.py LOOP COMMAND ARGS...`` with ``XEN_ROOT``, ``XENSTORED_PATH`` and
``AIOXEN_DOMID`` in the environment.  LOOP is ``asyncio`` or ``uvloop``.  Servers print
``READY`` once advertised and run until stdin closes; every command prints one result line.

Commands:
  serve-echo CLIENTS PORT READ WRITE INDEX   echo server for each domid in CLIENTS (a,b,..);
                                             on exit prints "ACCEPTED n"
  serve-source CLIENT PORT                   stream the pattern forever to each client
  source SERVER PORT TOTAL SEED              client: send TOTAL pattern bytes in random
                                             chunks, write_eof, wait for the server's close
  clients SERVER PORT N                      N concurrent clients: open all, then each sends
                                             a unique message + EOF and checks the echo
The pattern is block(seed) repeated, block = 1 MiB of random.Random(seed).randbytes.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path
from typing import Any

import aioxen
from aioxen import vchan

BLOCK = 1 << 20


def pattern_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


async def platform() -> Any:
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]  # vchan_harness, and the support it uses
    from vchan_harness import wire_store

    plat = wire_store(aioxen.platform())
    await plat.open()
    return plat


async def stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()
    except ConnectionError:
        writer.close()


async def serve_echo(clients: str, port: str, rsize: str, wsize: str, index: str) -> None:
    plat = await platform()
    servers = [
        await vchan.start_server(
            echo,
            int(domid),
            port,
            platform=plat,
            read_size=int(rsize),
            write_size=int(wsize),
            initial_index=int(index),
        )
        for domid in clients.split(",")
    ]
    print("READY", flush=True)
    await stdin_closed()
    for s in servers:
        s.close()
        await s.wait_closed()
    print("ACCEPTED", sum(s.accepted for s in servers), flush=True)
    await plat.close()


async def serve_source(client: str, port: str) -> None:
    plat = await platform()
    block = pattern_block(1)
    double = memoryview(block + block)

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pos = 0
        try:
            while True:
                writer.write(double[pos : pos + 65536])
                pos = (pos + 65536) % BLOCK
                await writer.drain()
        except ConnectionError:
            writer.close()

    server = await vchan.start_server(source, int(client), port, platform=plat, write_size=1 << 16)
    print("READY", flush=True)
    await stdin_closed()
    server.close()
    await plat.close()


async def source(server: str, port: str, total: str, seed: str) -> None:
    plat = await platform()
    block = pattern_block(int(seed))
    double = memoryview(block + block)
    rng = random.Random(int(seed) + 1)
    reader, writer = await vchan.open_connection(int(server), port, platform=plat)
    print("CONNECTED", flush=True)
    left = int(total)
    pos = 0
    while left:
        n = min(left, rng.randint(1, 256 * 1024))
        writer.write(double[pos : pos + n])
        pos = (pos + n) % BLOCK
        left -= n
        await writer.drain()
    writer.write_eof()
    await reader.read()
    writer.close()
    await writer.wait_closed()
    print("SENT", total, flush=True)
    await plat.close()


async def clients(server: str, port: str, count: str) -> None:
    plat = await platform()
    n = int(count)
    conns = await asyncio.gather(
        *(vchan.open_connection(int(server), port, platform=plat, timeout=60) for _ in range(n))
    )

    async def talk(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        msg = f"domain {plat.domid} connection {i} ".encode() * (i + 1)
        writer.write(msg)
        writer.write_eof()
        ok = await reader.read() == msg
        writer.close()
        await writer.wait_closed()
        return ok

    results = await asyncio.gather(*(talk(i, r, w) for i, (r, w) in enumerate(conns)))
    print("OK" if all(results) else f"BAD {results}", sum(results), flush=True)
    await plat.close()


COMMANDS = {
    "serve-echo": serve_echo,
    "serve-source": serve_source,
    "source": source,
    "clients": clients,
}


def main() -> None:
    loop_name, command, *args = sys.argv[1:]
    if loop_name == "uvloop":
        import uvloop

        factory: Any = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(COMMANDS[command](*args))


if __name__ == "__main__":
    main()
