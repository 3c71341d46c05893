"""``protocol``: bulk throughput and ping-pong through Protocol/BufferedProtocol on both sides.

The server is [`aioxen.bench.peer.ServerProtocol`][] (a BufferedProtocol sink/echo).  The
client writes with ``transport.write`` and honours ``pause_writing``/``resume_writing``.
Bulk is timed in steady state like the ``streams`` suite's: rounds of 256 chunks (at
most 8 MiB), the server
acknowledging each with one byte, one round in flight while the next is written, timed
between acknowledgements for at least ``ctx.seconds`` after the warm-up.  Besides the
defaults, ``vchan/unix 1 MiB rings`` is measured in every bulk case and
``vchan/unix no-poll`` where the poll policy polls (4 KiB, ping-pong).  The ``pipe``
baseline only with ``--mechanisms`` (here it was always the slowest baseline).
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
from aioxen.bench.mechanisms import (
    MECHANISMS,
    VCHAN_1M,
    VCHAN_NO_POLL,
    mechanism_env,
    open_protocol,
)
from aioxen.bench.peer import HEADER
from aioxen.bench.suites import memcpy
from aioxen.bench.suites.streams import (
    GIB,
    PING_SIZE,
    Runner,
    chunks_per_round,
    measured_in,
    mechanisms_for,
    record_pingpong,
    round_bytes,
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
        await self.until(self.received + nbytes)

    async def until(self, total: int) -> None:
        """Wait until ``total`` bytes have been received since the connection began."""
        self.want = total
        if self.received >= self.want:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter


async def bulk(proto: ClientProtocol, chunk: int, seconds: float, warmup: float, rnd: int) -> float:
    """GiB/s the server acknowledged in steady state (see the module docstring)."""
    n = chunks_per_round(chunk, rnd)
    payload = b"\x5a" * chunk
    proto.transport.write(HEADER.pack(b"B", n * chunk))

    async def send_round() -> None:
        for _ in range(n):
            if not proto.can_write.is_set():
                await proto.can_write.wait()
            proto.transport.write(payload)

    await send_round()  # one round stays in flight from here on
    sent = 1
    end = time.perf_counter() + warmup
    while True:
        await send_round()
        sent += 1
        await proto.until(sent - 1)  # one acknowledgement byte per round
        if time.perf_counter() >= end:
            break
    first = sent - 1
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        await send_round()
        sent += 1
        await proto.until(sent - 1)
        now = time.perf_counter()
        if now >= end:
            break
    await proto.until(sent)
    return (sent - 1 - first) * n * chunk / (now - t0) / GIB


async def pingpong(proto: ClientProtocol, seconds: float, warmup: float) -> list[float]:
    """Round-trip times (µs) of at least ``seconds`` of ping-pong after ``warmup``."""
    payload = b"p" * PING_SIZE
    proto.transport.write(HEADER.pack(b"E", 0))
    rtts = []
    t1 = time.perf_counter()
    timing_from = t1 + warmup
    while t1 < timing_from:
        proto.transport.write(payload)
        await proto.expect(PING_SIZE)
        t1 = time.perf_counter()
    end = t1 + seconds
    while t1 < end:
        t0 = time.perf_counter()
        proto.transport.write(payload)
        await proto.expect(PING_SIZE)
        t1 = time.perf_counter()
        rtts.append((t1 - t0) * 1e6)
    return rtts


def run(ctx: Context, selected: list[str] | None = None) -> list[Measurement]:
    # pipes only on request here: the slowest baseline of this API in every earlier run
    mechs = mechanisms_for(ctx, selected, (VCHAN_1M, VCHAN_NO_POLL), without=("pipe",))
    rnd = round_bytes(ctx)
    collector = Collector(NAME, ctx.loop)

    def m(
        case: str, mech: str, metric: str, unit: str, hib: bool, params: dict[str, Any]
    ) -> Measurement:
        mechanism = MECHANISMS[mech]
        return collector.get(case, mech, metric, unit, hib, mechanism.ours, params, mechanism.note)

    def session(mech: str, runner: Runner, fn: Any) -> Any:
        peer = runner.peer(mech)

        async def main() -> Any:
            async with open_protocol(mech, peer, runner.env, ClientProtocol) as (_, proto):
                assert isinstance(proto, ClientProtocol)
                return await fn(proto)

        with mechanism_env(mech), asyncio.Runner(loop_factory=ctx.loop_factory()) as r:
            return r.run(main())

    copy_gib = {c: memcpy.bandwidth_gib(c, 0.05 if ctx.quick else 0.2) for c in CHUNKS}
    cross_total = (256 << 20) if ctx.quick else (1 << 30)
    cross_gib = {c: memcpy.cross_process_gib(c, cross_total) for c in CHUNKS}
    with Runner(ctx, "protocol") as runner:
        for rep in range(ctx.repetitions):
            for chunk in CHUNKS:
                for mech in mechs:
                    if selected is None and not measured_in(mech, chunk):
                        continue
                    if not ctx.wants(f"bulk {chunk // 1024} KiB"):
                        continue
                    ctx.progress(
                        f"protocol rep {rep + 1}/{ctx.repetitions} bulk {chunk // 1024} KiB {mech}"
                    )
                    fn = functools.partial(
                        bulk, chunk=chunk, seconds=ctx.seconds, warmup=ctx.warmup, rnd=rnd
                    )
                    gib = session(mech, runner, fn)
                    case = f"bulk {chunk // 1024} KiB"
                    params = {"chunk": chunk, "round": rnd, "seconds": ctx.seconds}
                    m(case, mech, "throughput", "GiB/s", True, params).samples.append(gib)
                    if MECHANISMS[mech].ours:
                        m(case, mech, "% of memcpy", "%", True, params).samples.append(
                            100.0 * gib / copy_gib[chunk]
                        )
                        m(case, mech, "% of cross-process copy", "%", True, params).samples.append(
                            100.0 * gib / cross_gib[chunk]
                        )
            for mech in mechs:
                if selected is None and not measured_in(mech, None):
                    continue
                if not ctx.wants(f"ping-pong {PING_SIZE} B"):
                    continue
                ctx.progress(f"protocol rep {rep + 1}/{ctx.repetitions} ping-pong {mech}")
                ping = functools.partial(pingpong, seconds=ctx.seconds, warmup=ctx.warmup)
                rtts = session(mech, runner, ping)
                record_pingpong(collector, mech, rtts)
    return collector.results()
