"""``python -m aioxen.demo``: two processes talk through grant pages and an event channel.

Theory of operation
-------------------
Domain 0 (this process) creates a temporary ``$XEN_ROOT``, shares 4 pages with domain 2,
offers domain 2 an event-channel port, and starts domain 2 as a second Python process
(``sys.executable -m aioxen.demo --child ROOT PORT REFS``).  Domain 2 maps the 4 refs in
*reverse* order into one contiguous view, binds to the port, and answers pings.

Page layout as domain 0 sees it (domain 2 sees page ``i`` at its page ``3 - i``):

* page 0 — header, little-endian u32s: ``[0] ping seq, [4] data page, [8] length,
  [12] pong seq, [16] pings answered, [20] events seen by domain 2``;
* pages 1..3 — data pages, used in rotation.

Each round domain 0 writes a message into a data page, publishes it with a release store of
``ping seq`` and notifies; domain 2 waits, reads it, writes the bytes reversed back into the
same page, stores ``pong seq`` and notifies; domain 0 checks the reply.  Strict alternation
means every notification must arrive (a lost one would stall the round and hit the timeout),
so the counts printed at the end prove none was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from aioxen import PAGE_SIZE
from aioxen.native import SharedBuffer
from aioxen.platform.base import EventChannel
from aioxen.platform.unix import UnixPlatform

SERVER_DOMID = 0
CLIENT_DOMID = 2
NPAGES = 4
ROUNDS = 2000
STOP = 0xFFFFFFFF
TIMEOUT = 10.0

# header field offsets (in domain 0's page 0)
PING_SEQ, DATA_PAGE, LENGTH, PONG_SEQ, ANSWERED, EVENTS = 0, 4, 8, 12, 16, 20


def _message(i: int) -> bytes:
    """Round ``i``'s payload: a recognisable pattern of 1..4096 bytes."""
    n = 1 + (i * 997) % PAGE_SIZE
    return (f"ping {i:06d} ".encode() * (n // 12 + 1))[:n]


def _us(seconds: float) -> str:
    unit = "\u00b5s" if (sys.stdout.encoding or "").lower().replace("-", "") == "utf8" else "us"
    return f"{seconds * 1e6:.1f} {unit}"


async def run_server(loop_name: str) -> int:
    root = tempfile.mkdtemp(prefix="aioxen-demo-")
    os.chmod(root, 0o700)
    proc: asyncio.subprocess.Process | None = None
    print(f"aioxen demo: unix platform, {loop_name} event loop, XEN_ROOT={root}")
    try:
        async with UnixPlatform(SERVER_DOMID, root) as plat:
            share = plat.grants.share(CLIENT_DOMID, NPAGES)
            ch = await plat.events.listen(CLIENT_DOMID)
            refs = ",".join(map(str, share.refs))
            print(
                f"domain {SERVER_DOMID}: shared {NPAGES} pages (grant refs {refs}) with domain "
                f"{CLIENT_DOMID}, offered event channel port {ch.port}"
            )
            env = dict(os.environ, AIOXEN_DOMID=str(CLIENT_DOMID), XEN_ROOT=root)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aioxen.demo", "--child", root, str(ch.port), refs, env=env
            )
            hdr = SharedBuffer(share.buf[:PAGE_SIZE])
            try:
                rounds, nbytes, rtts, received = await _ping_pong(share.buf, hdr, ch)
                status = await asyncio.wait_for(proc.wait(), TIMEOUT)
                answered, client_events = hdr.load_u32(ANSWERED), hdr.load_u32(EVENTS)
            finally:
                hdr.release()
            print(
                f"domain {CLIENT_DOMID} (pid {proc.pid}): mapped refs "
                f"{','.join(map(str, share.refs[::-1]))} in reverse order as one "
                f"{NPAGES * PAGE_SIZE // 1024} KiB view, bound port {ch.remote_port}, "
                f"answered {answered} pings"
            )
            print(f"{rounds} round trips: {nbytes:,} bytes moved through shared pages")
            lost = (rounds + 1 - client_events) + (rounds - received)
            print(
                f"notifications: domain {SERVER_DOMID} sent {rounds + 1}, domain {CLIENT_DOMID} "
                f"received {client_events}; domain {CLIENT_DOMID} sent {answered}, domain "
                f"{SERVER_DOMID} received {received} ({lost} lost)"
            )
            print(f"round trip: {_us(sum(rtts) / len(rtts))} mean, {_us(min(rtts))} best")
            try:
                await ch.wait(timeout=TIMEOUT)
                outcome = "an unexpected event"
            except ConnectionResetError:
                outcome = "ConnectionResetError, as expected"
            print(
                f"domain {CLIENT_DOMID} exited (status {status}); domain {SERVER_DOMID}'s event "
                f"channel reports {outcome}"
            )
            share.close()
            ch.close()
            if status != 0 or answered != rounds or lost:
                return 1
        return 0
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")


async def _ping_pong(
    buf: memoryview, hdr: SharedBuffer, ch: EventChannel
) -> tuple[int, int, list[float], int]:
    """Domain 0's side: ``(rounds, bytes moved, round-trip times, events received)``."""
    nbytes, events = 0, 0
    rtts: list[float] = []
    for i in range(1, ROUNDS + 1):
        msg = _message(i)
        page = 1 + i % (NPAGES - 1)
        off = page * PAGE_SIZE
        buf[off : off + len(msg)] = msg
        hdr.store_u32(DATA_PAGE, page)
        hdr.store_u32(LENGTH, len(msg))
        t0 = time.perf_counter()
        hdr.store_u32(PING_SEQ, i)
        ch.notify()
        while True:  # one event per pong: consume it before the next ping can coalesce
            await ch.wait(timeout=TIMEOUT)
            events += 1
            if hdr.load_u32(PONG_SEQ) == i:
                break
        rtts.append(time.perf_counter() - t0)
        if bytes(buf[off : off + len(msg)]) != msg[::-1]:
            raise RuntimeError(f"round {i}: wrong reply in page {page}")
        nbytes += 2 * len(msg)
    hdr.store_u32(PING_SEQ, STOP)
    ch.notify()
    return ROUNDS, nbytes, rtts, events


async def run_client(root: str, port: int, refs: Sequence[int]) -> int:
    async with UnixPlatform(CLIENT_DOMID, root) as plat:
        m = plat.grants.map(SERVER_DOMID, list(reversed(refs)))
        ch = await plat.events.connect(SERVER_DOMID, port)
        buf = m.buf
        # domain 0's page i is our page NPAGES-1-i
        hdr = SharedBuffer(buf[(NPAGES - 1) * PAGE_SIZE : NPAGES * PAGE_SIZE])
        try:
            seen, events = 0, 0
            while True:
                await ch.wait(timeout=TIMEOUT)
                events += 1
                hdr.store_u32(EVENTS, events)
                seq = hdr.load_u32(PING_SEQ)
                if seq == STOP:
                    break
                if seq == seen:
                    continue  # a spurious wake-up: nothing new
                page = hdr.load_u32(DATA_PAGE)
                n = hdr.load_u32(LENGTH)
                if not 1 <= page < NPAGES or not 0 <= n <= PAGE_SIZE:
                    raise RuntimeError(f"bad ping header: page {page} length {n}")
                off = (NPAGES - 1 - page) * PAGE_SIZE
                buf[off : off + n] = bytes(buf[off : off + n])[::-1]
                seen = seq
                hdr.store_u32(ANSWERED, hdr.load_u32(ANSWERED) + 1)
                hdr.store_u32(PONG_SEQ, seq)
                ch.notify()
        finally:
            hdr.release()
            del buf
    return 0


def _loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        return "asyncio", asyncio.new_event_loop
    return "uvloop", uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aioxen.demo",
        description="Two processes exchange data through grant pages and an event channel "
        "on the unix platform.",
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("ROOT", "PORT", "REFS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    name, factory = _loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        if args.child:
            root, port, refs = args.child
            return runner.run(run_client(root, int(port), [int(r) for r in refs.split(",")]))
        return runner.run(run_server(name))


if __name__ == "__main__":
    sys.exit(main())
