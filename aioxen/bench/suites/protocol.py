"""``protocol``: bulk throughput and ping-pong through Protocol/BufferedProtocol on both sides.

The server is [`aioxen.bench.peer.ServerProtocol`][] (a BufferedProtocol sink/echo).  The
client writes with ``transport.write`` and honours ``pause_writing``/``resume_writing``.
For our mechanisms the bulk figure is also reported as a fraction of single-core memcpy
bandwidth for the same chunk size (``% of memcpy``: cache-hot, one core -- an upper bound
no cross-process path reaches) and of the cross-process copy reference for the same
chunk size (``% of cross-process copy``: two C processes moving the bytes through a
shared 1 MiB ring, i.e. the same two copies with nothing else; see
[`aioxen.bench.suites.memcpy`][]).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from aioxen.bench.harness import Collector, Context, Measurement
from aioxen.bench.mechanisms import MECHANISMS, open_protocol
from aioxen.bench.peer import HEADER
from aioxen.bench.suites import memcpy
from aioxen.bench.suites.streams import (
    GIB,
    PING_SIZE,
    Runner,
    mechanisms_for,
    record_pingpong,
)

NAME = "protocol"
CHUNKS = [4 << 10, 64 << 10, 1 << 20]


class ClientProtocol(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)
        self.received = 0
        self.waiter: asyncio.Future[None] | None = None
        self.want = 0
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if hasattr(transport, "write"):
            self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self.waiter is not None and self.received >= self.want and not self.waiter.done():
            self.waiter.set_result(None)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("benchmark peer went away"))

    async def expect(self, nbytes: int) -> None:
        self.want = self.received + nbytes
        if self.received >= self.want:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter


async def bulk(proto: ClientProtocol, chunk: int, total: int) -> float:
    n = total // chunk
    payload = b"\x5a" * chunk
    proto.transport.write(HEADER.pack(b"B", n * chunk))
    t0 = time.perf_counter()
    for _ in range(n):
        if not proto.can_write.is_set():
            await proto.can_write.wait()
        proto.transport.write(payload)
    await proto.expect(1)
    return n * chunk / (time.perf_counter() - t0) / GIB


async def pingpong(proto: ClientProtocol, count: int) -> list[float]:
    payload = b"p" * PING_SIZE
    proto.transport.write(HEADER.pack(b"E", 0))
    rtts = []
    for _ in range(count):
        t0 = time.perf_counter()
        proto.transport.write(payload)
        await proto.expect(PING_SIZE)
        rtts.append((time.perf_counter() - t0) * 1e6)
    return rtts


def run(ctx: Context, selected: list[str] | None = None) -> list[Measurement]:
    mechs = mechanisms_for(ctx, selected)
    total = (16 << 20) if ctx.quick else (256 << 20)
    pings = 300 if ctx.quick else 5000
    collector = Collector(NAME, ctx.loop)

    def m(
        case: str, mech: str, metric: str, unit: str, hib: bool, params: dict[str, Any]
    ) -> Measurement:
        return collector.get(case, mech, metric, unit, hib, MECHANISMS[mech].ours, params)

    def session(mech: str, runner: Runner, fn: Any) -> Any:
        peer = runner.peer(mech)

        async def main() -> Any:
            async with open_protocol(mech, peer, runner.env, ClientProtocol) as (_, proto):
                assert isinstance(proto, ClientProtocol)
                return await fn(proto)

        with asyncio.Runner(loop_factory=ctx.loop_factory()) as r:
            return r.run(main())

    copy_gib = {c: memcpy.bandwidth_gib(c, 0.05 if ctx.quick else 0.2) for c in CHUNKS}
    cross_total = (256 << 20) if ctx.quick else (1 << 30)
    cross_gib = {c: memcpy.cross_process_gib(c, cross_total) for c in CHUNKS}
    with Runner(ctx, "protocol") as runner:
        for rep in range(ctx.repetitions):
            for chunk in CHUNKS:
                for mech in mechs:
                    ctx.progress(
                        f"protocol rep {rep + 1}/{ctx.repetitions} bulk {chunk // 1024} KiB {mech}"
                    )
                    gib = session(mech, runner, functools.partial(bulk, chunk=chunk, total=total))
                    case = f"bulk {chunk // 1024} KiB"
                    params = {"chunk": chunk, "total": total}
                    m(case, mech, "throughput", "GiB/s", True, params).samples.append(gib)
                    if MECHANISMS[mech].ours:
                        m(case, mech, "% of memcpy", "%", True, params).samples.append(
                            100.0 * gib / copy_gib[chunk]
                        )
                        m(case, mech, "% of cross-process copy", "%", True, params).samples.append(
                            100.0 * gib / cross_gib[chunk]
                        )
            for mech in mechs:
                ctx.progress(f"protocol rep {rep + 1}/{ctx.repetitions} ping-pong {mech}")
                rtts = session(mech, runner, functools.partial(pingpong, count=pings))
                record_pingpong(collector, mech, rtts, pings)
    return collector.results()
