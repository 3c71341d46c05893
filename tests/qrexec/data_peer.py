"""A qrexec data-channel peer process for test_data_crossprocess.py (``unix`` platform).

Usage: ``data_peer.py LOOP ROLE PEER_DOMID PORT`` with ``XEN_ROOT``, ``XENSTORED_PATH``,
``AIOXEN_PLATFORM=unix`` and ``AIOXEN_DOMID`` in the environment.  LOOP is ``asyncio`` or
``uvloop``.  Prints ``READY`` once the data phase runs, then works until killed:

  service   connect to PORT offered by PEER_DOMID, ServiceEnd: echo stdin to stdout
  caller    listen on PORT for PEER_DOMID, CallerEnd: send stdin forever, read stdout
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aioxen
from aioxen.qrexec.channels import VchanChannels
from aioxen.qrexec.data import CallerEnd, ServiceEnd


async def platform() -> Any:
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent / "vchan"), str(here.parent)]
    from vchan_harness import wire_store

    plat = wire_store(aioxen.platform())
    await plat.open()
    return plat


async def run(role: str, peer: int, port: int) -> None:
    chans = VchanChannels(await platform())
    if role == "service":
        reader, writer = await chans.connect(peer, port)
        service = await ServiceEnd.open(reader, writer)
        print("READY", flush=True)
        while data := await service.stdin.read(65536):
            service.stdout.write(data)
            await service.stdout.drain()
        await service.exit(0)
    else:
        pending = await chans.listen(peer, port, buffer_size=65536)
        print("LISTENING", flush=True)
        reader, writer = await pending.accept(timeout=60)
        caller = await CallerEnd.open(reader, writer)
        print("READY", flush=True)
        block = bytes(65536)
        while True:
            caller.stdin.write(block)
            await caller.stdin.drain()


def main() -> None:
    loop_name, role, peer, port = sys.argv[1:]
    if loop_name == "uvloop":
        import uvloop

        factory: Any = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run(role, int(peer), int(port)))


if __name__ == "__main__":
    main()
