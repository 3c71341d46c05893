"""``python -m aioxen.demo`` (``make demo``): two processes talk over vchan on the unix platform.

Theory of operation
-------------------
Domain 0 (this process) creates a private world -- a temporary ``$XEN_ROOT`` and an
in-process xenstored ([`EmbeddedRoot`][aioxen.apps.embedded.EmbeddedRoot]) -- and serves an echo
service on vchan port ``echo`` for domain 2 with [`aioxen.vchan.start_server`][].  It
then starts domain 2, a second Python process (``python -m aioxen.demo --child vchan``)
whose environment holds the world's export lines, so that ``vchan.connect(0, "echo")``
with no platform argument finds everything on its own.  Domain 2 measures

* round-trip latency: small messages sent one at a time, each awaited in full;
* throughput: a stream written and read back concurrently (full duplex through both
  rings), checked with SHA-256 on the way back;

and reports the numbers to domain 0 as one JSON line on its stdout.

A second, shorter section shows the layer below vchan: domain 0 shares 4 grant pages and
offers an event-channel port; domain 2 (``--child grants``) maps the pages in *reverse*
order into one contiguous view and answers pings; strict alternation means every
notification must arrive, so the counts prove none was lost.  Finally the world is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from aioxen import PAGE_SIZE, vchan
from aioxen.apps.embedded import EmbeddedRoot
from aioxen.native import SharedBuffer
from aioxen.platforms.base import EventChannel
from aioxen.platforms.unix import UnixPlatform

SERVER_DOMID = 0
CLIENT_DOMID = 2
PORT = "echo"
TIMEOUT = 60.0

LATENCY_ROUNDS = 2000
LATENCY_SIZE = 64
THROUGHPUT_BYTES = 64 * 1024 * 1024
CHUNK = 64 * 1024

# -- the grants + event channel section ------------------------------------------------------
NPAGES = 4
GRANT_ROUNDS = 500
STOP = 0xFFFFFFFF
# header field offsets (in domain 0's page 0)
PING_SEQ, DATA_PAGE, LENGTH, PONG_SEQ, ANSWERED, EVENTS = 0, 4, 8, 12, 16, 20


def _us(seconds: float) -> str:
    unit = "\u00b5s" if (sys.stdout.encoding or "").lower().replace("-", "") == "utf8" else "us"
    return f"{seconds * 1e6:.1f} {unit}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- domain 0 ------------------------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The service: everything read is written back; EOF is passed on; then close."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    finally:
        writer.close()


async def _child(kind: str, env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    """Run domain 2 (``--child kind args``); return its pid and its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aioxen.demo",
        "--child",
        kind,
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"domain {CLIENT_DOMID} ({kind}) exited with status {proc.returncode}")
    report: dict[str, Any] = json.loads(out)
    return proc.pid, report


async def run_demo(loop_name: str) -> int:
    print(f"aioxen demo: two processes on the unix platform, {loop_name} event loop")
    async with EmbeddedRoot(prefix="aioxen-demo-") as world:
        root = world.root
        print(f"world: XEN_ROOT={root} (mode 0700), its xenstored running inside domain 0")
        async with world.platform(SERVER_DOMID) as plat:
            server = await vchan.start_server(_echo, CLIENT_DOMID, PORT, platform=plat)
            async with server:
                print(
                    f"domain {SERVER_DOMID} (pid {os.getpid()}): echo service on vchan port "
                    f"{PORT!r} for domain {CLIENT_DOMID}, {vchan.DEFAULT_SIZE // 1024} KiB "
                    f"rings each way"
                )
                pid, r = await _child("vchan", world.environ(CLIENT_DOMID))
            ok = _print_vchan(pid, r)
            ok = await _grants_section(plat, world) and ok
    print(f"removed {root}")
    return 0 if ok else 1


def _print_vchan(pid: int, r: dict[str, Any]) -> bool:
    rtts = r["rtts"]
    print(
        f"domain {CLIENT_DOMID} (pid {pid}): vchan.connect({SERVER_DOMID}, {PORT!r}) "
        f"connected in {r['connect_ms']:.1f} ms"
    )
    p99 = statistics.quantiles(rtts, n=100)[98]
    print(
        f"  latency:    {len(rtts)} round trips of {LATENCY_SIZE} bytes: mean "
        f"{_us(statistics.fmean(rtts))}, median {_us(statistics.median(rtts))}, p99 {_us(p99)}"
    )
    verdict = "SHA-256 verified" if r["verified"] else "MISMATCH"
    print(
        f"  throughput: {_mib(r['bytes'])} each way in {r['seconds']:.2f} s = "
        f"{r['bytes'] / r['seconds'] / 2**20:.1f} MiB/s each way, full duplex ({verdict})"
    )
    return bool(r["verified"]) and len(rtts) == LATENCY_ROUNDS


async def _grants_section(plat: UnixPlatform, world: EmbeddedRoot) -> bool:
    share = plat.grants.share(CLIENT_DOMID, NPAGES)
    ch = await plat.events.listen(CLIENT_DOMID)
    try:
        refs = ",".join(map(str, share.refs))
        hdr = SharedBuffer(share.buf[:PAGE_SIZE])
        try:
            child = asyncio.ensure_future(
                _child("grants", world.environ(CLIENT_DOMID), world.root, str(ch.port), refs)
            )
            try:
                rtts, received = await _ping_pong(share.buf, hdr, ch)
            except BaseException:
                child.cancel()
                await asyncio.gather(child, return_exceptions=True)
                raise
            await child
            answered, client_events = hdr.load_u32(ANSWERED), hdr.load_u32(EVENTS)
        finally:
            hdr.release()
    finally:
        share.close()
        ch.close()
    lost = (GRANT_ROUNDS + 1 - client_events) + (GRANT_ROUNDS - received)
    reverse = ",".join(refs.split(",")[::-1])
    print(
        f"below vchan: {GRANT_ROUNDS} ping-pongs through {NPAGES} grant pages and an event "
        f"channel; domain {CLIENT_DOMID} mapped refs {reverse} (reverse order) as one view"
    )
    print(
        f"  {answered} answered, {lost} notifications lost, round trip "
        f"{_us(statistics.fmean(rtts))} mean, {_us(min(rtts))} best"
    )
    return answered == GRANT_ROUNDS and lost == 0


def _message(i: int) -> bytes:
    """Round ``i``'s payload: a recognisable pattern of 1..4096 bytes."""
    n = 1 + (i * 997) % PAGE_SIZE
    return (f"ping {i:06d} ".encode() * (n // 12 + 1))[:n]


async def _ping_pong(
    buf: memoryview, hdr: SharedBuffer, ch: EventChannel
) -> tuple[list[float], int]:
    """Domain 0's side: ``(round-trip times, events received)``."""
    events = 0
    rtts: list[float] = []
    for i in range(1, GRANT_ROUNDS + 1):
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
    hdr.store_u32(PING_SEQ, STOP)
    ch.notify()
    return rtts, events


# -- domain 2 ------------------------------------------------------------------------------------


async def child_vchan() -> dict[str, Any]:
    """Connect to the echo service (platform from the environment) and measure."""
    t0 = time.perf_counter()
    async with vchan.connect(SERVER_DOMID, PORT, timeout=TIMEOUT) as (reader, writer):
        connect_ms = (time.perf_counter() - t0) * 1e3
        rtts: list[float] = []
        msg = bytes(range(LATENCY_SIZE))
        for _ in range(LATENCY_ROUNDS):
            t = time.perf_counter()
            writer.write(msg)
            reply = await reader.readexactly(LATENCY_SIZE)
            rtts.append(time.perf_counter() - t)
            if reply != msg:
                raise RuntimeError("echo returned different bytes")
        block = hashlib.sha256(b"aioxen").digest() * (CHUNK // 32)

        async def send() -> str:
            h = hashlib.sha256()
            for i in range(THROUGHPUT_BYTES // CHUNK):
                chunk = i.to_bytes(8, "little") + block[8:]
                h.update(chunk)
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            return h.hexdigest()

        async def receive() -> tuple[str, int]:
            h = hashlib.sha256()
            n = 0
            while data := await reader.read(CHUNK):
                h.update(data)
                n += len(data)
            return h.hexdigest(), n

        t = time.perf_counter()
        sent, (got, n) = await asyncio.gather(send(), receive())
        seconds = time.perf_counter() - t
    return {
        "connect_ms": connect_ms,
        "rtts": rtts,
        "bytes": n,
        "seconds": seconds,
        "verified": sent == got and n == THROUGHPUT_BYTES,
    }


async def child_grants(root: str, port: int, refs: Sequence[int]) -> dict[str, Any]:
    async with UnixPlatform(CLIENT_DOMID, root) as plat:
        m = plat.grants.map(SERVER_DOMID, list(reversed(refs)))
        ch = await plat.events.connect(SERVER_DOMID, port)
        await ch.wait(timeout=TIMEOUT)  # a connector starts with one event, as on Xen
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
    return {"events": events}


async def _run_child(args: Sequence[str]) -> int:
    kind, *rest = args
    if kind == "vchan":
        report = await child_vchan()
    elif kind == "grants":
        root, port, refs = rest
        report = await child_grants(root, int(port), [int(r) for r in refs.split(",")])
    else:
        raise SystemExit(f"unknown child {kind!r}")
    sys.stdout.write(json.dumps(report) + "\n")
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
        description="Two processes talk over vchan (and, below it, grant pages and an event "
        "channel) on the unix platform; prints latency and throughput.",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), help="event loop (default: uvloop if installed)"
    )
    args = parser.parse_args(argv)
    name, factory = _loop_factory()
    if args.loop == "asyncio":
        name, factory = "asyncio", asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        if args.child:
            return runner.run(_run_child(args.child))
        return runner.run(run_demo(name))


if __name__ == "__main__":
    sys.exit(main())
