"""A netfront in its own process for crash tests: ``net_peer.py DOMID``.

Connects vif DOMID/0 (platform from the environment), prints ``READY``, broadcasts one
frame (and one more at every SIGUSR1), then sleeps until killed.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aioxen
from aioxen.net.front import create_frontend


async def main(domid: int) -> None:
    async with aioxen.platform() as plat:
        transport, _ = await create_frontend(asyncio.DatagramProtocol, 0, 0, platform=plat)
        mac = transport.get_extra_info("mac")

        def broadcast() -> None:
            transport.sendto(b"\xff" * 6 + mac + b"\x08\x06" + bytes([domid]) * 46)

        broadcast()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, broadcast)
        print("READY", flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
