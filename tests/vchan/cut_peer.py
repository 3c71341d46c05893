"""A vchan writer process for the cut-stream tests (``unix`` platform, issue 13 finding 4).

Usage: ``cut_peer.py LOOP MODE SERVER PORT TOTAL CLOSE_TIMEOUT`` with ``XEN_ROOT``,
``XENSTORED_PATH`` and ``AIOXEN_DOMID`` in the environment.  LOOP is ``asyncio`` or
``uvloop``.  The process connects to vchan PORT of domain SERVER, reads the reader's ``G`` (it
accepted us), prints ``CONNECTED``,
writes TOTAL pattern bytes (``pattern(TOTAL)``) in one ``write()`` and then, by MODE:

  close    ``writer.close()`` and leave ``async with aioxen.platform()`` without
           ``wait_closed()`` (the platform flushes, bounded by CLOSE_TIMEOUT)
  open     leave the platform without closing the writer at all
  abort    ``transport.abort()`` and leave the platform
  forever  keep writing (write + drain) until killed

Leaving the platform must not raise: the process exits 0 with nothing on stderr.
"""

from __future__ import annotations

import asyncio
import sys

import aioxen
from aioxen import vchan


def pattern(total: int) -> bytes:
    return bytes(range(251)) * (total // 251) + bytes(range(total % 251))


async def main(mode: str, server: int, port: str, total: int, close_timeout: float) -> None:
    data = pattern(total)
    async with aioxen.platform() as plat:
        plat.close_timeout = close_timeout
        reader, writer = await vchan.open_connection(server, port, platform=plat)
        assert await reader.readexactly(1) == b"G"  # the reader accepted us
        print("CONNECTED", flush=True)
        if mode == "forever":
            while True:
                writer.write(data)
                await writer.drain()
        writer.write(data)
        if mode == "close":
            writer.close()
        elif mode == "abort":
            writer.transport.abort()
        else:
            assert mode == "open", mode
    print("LEFT", flush=True)


if __name__ == "__main__":
    loop_name, mode, server, port, total, timeout = sys.argv[1:]
    args = (mode, int(server), port, int(total), float(timeout))
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main(*args))
    else:
        asyncio.run(main(*args))
