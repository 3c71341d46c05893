"""``streams``: bulk throughput and 64-byte ping-pong through StreamReader/StreamWriter.

Every mechanism runs the same client code against the same server code
([`aioxen.bench.peer.stream_handler`][]), two processes apart except ``vchan/inheap``.
Bulk: ``BULK n`` then ``n`` bytes in chunks of the given size, ``drain()`` after each, until
the server's ``OK``.  Ping-pong: 64 bytes out, 64 bytes back, each round trip timed.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

from aioxen.bench.harness import Collector, Context, Measurement
from aioxen.bench.mechanisms import (
    MECHANISMS,
    Peer,
    StreamPair,
    XenstoredProcess,
    open_streams,
)

NAME = "streams"
CHUNKS = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
QUICK_CHUNKS = [4 << 10, 64 << 10, 1 << 20]
GIB = float(1 << 30)
PING_SIZE = 64


async def bulk(pair: StreamPair, chunk: int, total: int) -> float:
    reader, writer = pair
    payload = b"\x5a" * chunk
    n = total // chunk
    writer.write(b"BULK %d\n" % (n * chunk))
    t0 = time.perf_counter()
    for _ in range(n):
        writer.write(payload)
        await writer.drain()
    line = await reader.readline()
    dt = time.perf_counter() - t0
    if line != b"OK\n":
        raise RuntimeError(f"bulk run ended with {line!r}")
    return n * chunk / dt / GIB


async def pingpong(pair: StreamPair, count: int) -> list[float]:
    reader, writer = pair
    payload = b"p" * PING_SIZE
    writer.write(b"ECHO %d %d\n" % (count, PING_SIZE))
    rtts: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        writer.write(payload)
        await writer.drain()
        await reader.readexactly(PING_SIZE)
        rtts.append((time.perf_counter() - t0) * 1e6)
    return rtts


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def record_pingpong(collector: Collector, mech: str, rtts: list[float], pings: int) -> None:
    """Add a ping-pong run's p50/p99/p99.9 round-trip times (µs) to ``collector``."""
    case, ours = f"ping-pong {PING_SIZE} B", MECHANISMS[mech].ours
    params = {"size": PING_SIZE, "count": pings}
    for label, pct in (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9)):
        collector.get(case, mech, label, "µs", False, ours, params).samples.append(
            percentile(rtts, pct)
        )


def mechanisms_for(ctx: Context, selected: list[str] | None) -> list[str]:
    names = list(MECHANISMS)
    return [m for m in names if selected is None or m in selected]


class Runner:
    """Starts peers once per mechanism and runs measurement coroutines against them."""

    def __init__(self, ctx: Context, api: str) -> None:
        self.ctx, self.api = ctx, api
        self.xenstored: XenstoredProcess | None = None
        self.peers: dict[str, Peer] = {}
        self.env: dict[str, str] = {}

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        for peer in self.peers.values():
            peer.stop()
        if self.xenstored is not None:
            self.xenstored.stop()

    def peer(self, mech: str) -> Peer | None:
        if not MECHANISMS[mech].two_process:
            return None
        if mech == "pipe":  # a pipe pair is consumed by one client: fresh peer each time
            old = self.peers.pop(mech, None)
            if old is not None:
                old.stop()
        if mech not in self.peers:
            env: dict[str, str] = {}
            if mech.startswith("vchan/"):
                if self.xenstored is None:
                    self.xenstored = XenstoredProcess()
                    self.env = self.xenstored.start()
                env = self.env
            p = Peer(mech, self.api, self.ctx.loop, env)
            p.start()
            self.peers[mech] = p
        return self.peers[mech]

    def run(self, mech: str, fn: Callable[[StreamPair], Any]) -> Any:
        peer = self.peer(mech)

        async def main() -> Any:
            async with open_streams(mech, peer, self.env) as pair:
                return await fn(pair)

        with asyncio.Runner(loop_factory=self.ctx.loop_factory()) as runner:
            return runner.run(main())


def run(ctx: Context, selected: list[str] | None = None) -> list[Measurement]:
    mechs = mechanisms_for(ctx, selected)
    chunks = QUICK_CHUNKS if ctx.quick else CHUNKS
    total = (16 << 20) if ctx.quick else (256 << 20)
    pings = 300 if ctx.quick else 5000
    collector = Collector(NAME, ctx.loop)

    def m(
        case: str, mech: str, metric: str, unit: str, hib: bool, params: dict[str, Any]
    ) -> Measurement:
        return collector.get(case, mech, metric, unit, hib, MECHANISMS[mech].ours, params)

    with Runner(ctx, "streams") as runner:
        for rep in range(ctx.repetitions):
            for chunk in chunks:
                for mech in mechs:
                    ctx.progress(
                        f"streams rep {rep + 1}/{ctx.repetitions} bulk {chunk // 1024} KiB {mech}"
                    )
                    gib = runner.run(mech, functools.partial(bulk, chunk=chunk, total=total))
                    m(
                        f"bulk {chunk // 1024} KiB",
                        mech,
                        "throughput",
                        "GiB/s",
                        True,
                        {"chunk": chunk, "total": total},
                    ).samples.append(gib)
            for mech in mechs:
                ctx.progress(f"streams rep {rep + 1}/{ctx.repetitions} ping-pong {mech}")
                rtts: list[float] = runner.run(mech, functools.partial(pingpong, count=pings))
                record_pingpong(collector, mech, rtts, pings)
    return collector.results()
