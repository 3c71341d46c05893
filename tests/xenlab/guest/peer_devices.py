"""The peer domU's half of the cross-domain device tests: aioxen's front ends (blkfront,
netfront, the PV console's guest side) in a real domU, against aioxen's back ends in dom0.

Run in the domU as ``python -S -m peer_devices LOOP ACTION ARGS...``
(``tests/xenlab/guest/test_crossdomain_devices.py`` starts it over the peer's console,
:mod:`peerdomu`).  Its actions join ``peer.ACTIONS`` and :func:`peer.run` runs them, so
like :mod:`peer`'s each prints ``READY ...`` once its device is connected and ``RESULT
key=value ...`` at the end, or ``ERROR Type: message`` and exits 1.  dom0 created each
device (the toolstack step) and
serves it; the domU only opens its front end, through ``/dev/xen/xenbus`` with a guest's
permissions, and its grants and event channels cross to dom0.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from peer import ACTIONS, HANG, run, say, stream

MIB = 1 << 20
ETHERTYPE = 0x88B5  # IEEE "local experimental"
DOM0_MAC = b"\xfe\xff\xff\xff\xff\xff"  # where the domU's own frames go
NET_SIZES = (60, 61, 100, 1000, 1514, 4096, 4097, 9014)  # 9014: a multi-slot (SG) frame


def net_frame(seed: int, i: int, src: bytes, dst: bytes) -> bytes:
    """Frame ``i`` of a numbered stream: Ethernet header, then ``stream(seed*1000+i)``
    padding it to ``NET_SIZES[i % len]`` bytes (the same in dom0 and the domU)."""
    size = NET_SIZES[i % len(NET_SIZES)]
    head = dst + src + ETHERTYPE.to_bytes(2, "big") + i.to_bytes(4, "big")
    return head + stream(seed * 1000 + i, size - len(head))


async def act_blk(plat: Any, devid: str, seed: str, sector: str, nbytes: str) -> None:
    """Open vbd ``devid`` (dom0's blkback), SHA-256 the whole device; unless it is
    read-only, write ``stream(seed, nbytes)`` at ``sector``, flush and read it back;
    on a read-only device, check that a write is refused."""
    from aioxen.blk.vbd import open_blkfront

    async with open_blkfront(int(devid), platform=plat, backend_domid=0, timeout=HANG) as dev:
        say(f"READY size={dev.size} sector_size={dev.sector_size} readonly={dev.readonly}")
        h = hashlib.sha256()
        buf = bytearray(MIB)
        for off in range(0, dev.size, MIB):
            view = memoryview(buf)[: min(MIB, dev.size - off)]
            await dev.read_into(off // dev.sector_size, view)
            h.update(view)
        result = f"size={dev.size} sha256={h.hexdigest()} readonly={dev.readonly}"
        data = stream(int(seed), int(nbytes))
        if dev.readonly:
            try:
                await dev.write(int(sector), data)
                result += " write=accepted"
            except PermissionError as exc:
                result += f" write=refused:{type(exc).__name__}"
            # the back end must refuse too: a raw write request, past blkfront's own check
            from aioxen.blk.blkif import BLKIF_OP_WRITE

            try:
                await dev._io(BLKIF_OP_WRITE, int(sector), memoryview(data[:4096]))
                result += " backend=accepted"
            except OSError as exc:
                result += (
                    f" backend=refused:{type(exc).__name__}:{errno.errorcode.get(exc.errno or 0)}"
                )
        else:
            await dev.write(int(sector), data)
            await dev.flush()
            back = await dev.read(int(sector), len(data) // dev.sector_size)
            result += f" write=done flush={dev.can_flush} readback={back == data}"
    say(f"RESULT {result}")


async def act_blk_hold(plat: Any, devid: str) -> None:
    """Open vbd ``devid`` and keep reading it (requests in flight) until killed."""
    from aioxen.blk.vbd import open_blkfront

    async with open_blkfront(int(devid), platform=plat, backend_domid=0, timeout=HANG) as dev:
        await dev.read(0, 8)
        say("READY")
        while True:  # 64 KiB reads, 4 at a time, over and over
            await asyncio.gather(*(dev.read(i * 128, 128) for i in range(4)))


async def act_write_file(plat: Any, path: str, seed: str, n: str) -> None:
    """Write ``stream(seed, n)`` to ``path`` in the domU (input for a CLI)."""
    with open(path, "wb") as f:
        f.write(stream(int(seed), int(n)))
    say(f"RESULT wrote={n}")


async def act_net(plat: Any, devid: str, seed: str, count: str, echo: str) -> None:
    """Connect vif ``devid`` (dom0's netback); echo back each of dom0's ``echo`` frames
    (source and destination swapped) while sending ``count`` numbered frames of our own."""
    from aioxen.net import create_frontend

    got: asyncio.Queue[bytes] = asyncio.Queue()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            got.put_nowait(data)

    transport, _ = await create_frontend(Proto, 0, int(devid), platform=plat, timeout=HANG)
    mac: bytes = transport.get_extra_info("mac")
    say(f"READY mac={mac.hex(':')} mtu={transport.get_extra_info('mtu')}")
    for i in range(int(count)):
        transport.sendto(net_frame(int(seed), i, mac, DOM0_MAC))
    h = hashlib.sha256()
    echoed = 0
    while echoed < int(echo):
        frame = await asyncio.wait_for(got.get(), HANG)
        if frame[12:14] != ETHERTYPE.to_bytes(2, "big"):
            continue  # not the test's (e.g. a dom0 kernel's frame on its TAP)
        echoed += 1
        h.update(frame)
        transport.sendto(frame[6:12] + frame[0:6] + frame[12:])
    stats = transport.get_extra_info("stats")
    say(f"RESULT echoed={echo} sha256={h.hexdigest()} stats={stats}")
    await asyncio.sleep(1)  # let the last echoes reach the ring before closing
    transport.close()
    await asyncio.wait_for(transport.wait_closed(), HANG)


async def act_console(
    plat: Any, devid: str, seed_in: str, n_in: str, seed_out: str, n_out: str
) -> None:
    """Be the guest side of ``console/devid`` (dom0 is the back end): read ``n_in`` bytes
    (checked against ``stream(seed_in)``) while writing ``stream(seed_out, n_out)``."""
    from aioxen.console import ConsoleFrontend

    fe = await ConsoleFrontend.open(0, int(devid), platform=plat, timeout=HANG, reconnect=False)
    say("READY")

    async def send() -> None:
        data = stream(int(seed_out), int(n_out))
        for i in range(0, len(data), 4096):
            fe.writer.write(data[i : i + 4096])
            await fe.writer.drain()

    sender = asyncio.ensure_future(send())
    got = await asyncio.wait_for(fe.reader.readexactly(int(n_in)), HANG)
    await asyncio.wait_for(sender, HANG)
    ok = got == stream(int(seed_in), int(n_in))
    say(f"RESULT received={len(got)} match={ok} sha256={hashlib.sha256(got).hexdigest()}")
    await asyncio.sleep(1)  # let dom0 drain the out ring before the orderly close
    await fe.close(timeout=HANG)


async def act_console_open(plat: Any, devid: str) -> None:
    """Try to open ``console/devid``'s front end once: ``RESULT opened=1`` (then an
    orderly close), or for an ``OSError`` a ``MESSAGE`` line and ``RESULT errno=NAME
    type=... driver=... module=...`` (:class:`aioxen.console.inuse.FrontendInUse`)."""
    from aioxen.console import ConsoleFrontend

    try:
        fe = await ConsoleFrontend.open(0, int(devid), platform=plat, timeout=HANG, reconnect=False)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        say(f"MESSAGE {exc}")
        driver, module = getattr(exc, "driver", None), getattr(exc, "module", None)
        say(f"RESULT errno={name} type={type(exc).__name__} driver={driver} module={module}")
        return
    say("RESULT opened=1")
    await fe.close(timeout=HANG)


DEVICE_ACTIONS: dict[str, Callable[..., Awaitable[None]]] = {
    "blk": act_blk,
    "blk-hold": act_blk_hold,
    "write-file": act_write_file,
    "net": act_net,
    "console": act_console,
    "console-open": act_console_open,
}
assert not DEVICE_ACTIONS.keys() & ACTIONS.keys()
ACTIONS.update(DEVICE_ACTIONS)  # peer.run() dispatches through peer.ACTIONS


if __name__ == "__main__":
    os.environ.setdefault("AIOXEN_PLATFORM", "xen")
    sys.exit(run(sys.argv[1:]))
