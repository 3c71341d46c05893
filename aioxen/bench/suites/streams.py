"""``streams``: bulk throughput and 64-byte ping-pong through StreamReader/StreamWriter.

Every mechanism runs the same client code against the same server code
([`aioxen.bench.peer.stream_handler`][]), two processes apart except ``vchan/inheap``.
Bulk: rounds of ``BULK n`` then ``n`` bytes (256 chunks, at most [`ROUND`][] = 8 MiB)
in chunks of the given size, ``drain()`` after each chunk, the server answering ``OK``
per round; the next round is written while the server still reads the last, so the pipe
never runs dry.  A repetition writes rounds for the warm-up, then times the server's
acknowledgements for at least ``ctx.seconds`` (steady state: bytes the server confirmed
between two ``OK`` s).
Ping-pong: 64 bytes out, 64 bytes back, each round trip timed, for the warm-up (not
recorded) and then at least ``ctx.seconds``.

``vchan/unix no-poll`` (busy-polling off) is measured where the poll policy polls -- 4 KiB
chunks and ping-pong by default, any case with ``--mechanisms`` -- so the table can flag
the figures that need a free core (see [`aioxen.bench.harness.annotate`][]).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

from aioxen.bench.harness import Collector, Context, Measurement
from aioxen.bench.mechanisms import (
    DEFAULT_MECHANISMS,
    MECHANISMS,
    VCHAN_1M,
    VCHAN_NO_POLL,
    Peer,
    StreamPair,
    XenstoredProcess,
    mechanism_env,
    open_streams,
)

NAME = "streams"
CHUNKS = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10]
"""Bulk chunk sizes (1 MiB writes: ``--cases 'bulk 1024 KiB'``; the protocol suite
measures them by default)."""
ALL_CHUNKS = [*CHUNKS, 1 << 20]
QUICK_CHUNKS = [4 << 10, 64 << 10, 1 << 20]
GIB = float(1 << 30)
PING_SIZE = 64
ROUND = 8 << 20
"""Most bytes per acknowledged bulk round (4 MiB with ``--quick``), and at most
:data:`ROUND_CHUNKS` chunks: long enough that the acknowledgement costs nothing
measurable, short enough that a slow path's last round does not stretch the repetition
much beyond ``ctx.seconds``."""
ROUND_CHUNKS = 256


def chunks_per_round(chunk: int, rnd: int) -> int:
    return max(1, min(rnd // chunk, ROUND_CHUNKS))


POLLED_CHUNKS = (4 << 10,)
"""Bulk chunk sizes a default run also measures with busy-polling off (the poll policy
polls after messages of at most 16 KiB; one such size keeps the run short)."""
PING_BATCH = 500


def round_bytes(ctx: Context) -> int:
    return (4 << 20) if ctx.quick else ROUND


async def bulk(pair: StreamPair, chunk: int, seconds: float, warmup: float, rnd: int) -> float:
    """GiB/s the server acknowledged in steady state (see the module docstring)."""
    reader, writer = pair
    payload = b"\x5a" * chunk
    n = chunks_per_round(chunk, rnd)
    header = b"BULK %d\n" % (n * chunk)

    async def send_round() -> None:
        writer.write(header)
        for _ in range(n):
            writer.write(payload)
            await writer.drain()

    async def acknowledged() -> None:
        line = await reader.readline()
        if line != b"OK\n":
            raise RuntimeError(f"bulk round ended with {line!r}")

    await send_round()  # one round stays in flight from here on
    end = time.perf_counter() + warmup
    while True:
        await send_round()
        await acknowledged()
        if time.perf_counter() >= end:
            break
    rounds = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        await send_round()
        await acknowledged()
        rounds += 1
        now = time.perf_counter()
        if now >= end:
            break
    await acknowledged()
    return rounds * n * chunk / (now - t0) / GIB


async def pingpong(pair: StreamPair, seconds: float, warmup: float) -> list[float]:
    """Round-trip times (µs) of at least ``seconds`` of ping-pong after ``warmup``."""
    reader, writer = pair
    payload = b"p" * PING_SIZE
    rtts: list[float] = []
    start = time.perf_counter()
    timing_from = start + warmup
    timed = False
    while True:
        writer.write(b"ECHO %d %d\n" % (PING_BATCH, PING_SIZE))
        for _ in range(PING_BATCH):
            t0 = time.perf_counter()
            writer.write(payload)
            await writer.drain()
            await reader.readexactly(PING_SIZE)
            t1 = time.perf_counter()
            if timed:
                rtts.append((t1 - t0) * 1e6)
        if not timed and t1 >= timing_from:
            timed, timing_from = True, t1
        elif timed and t1 - timing_from >= seconds:
            return rtts


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def record_pingpong(collector: Collector, mech: str, rtts: list[float]) -> None:
    """Add a ping-pong run's p50/p99/p99.9 round-trip times (µs) to ``collector``."""
    case, ours = f"ping-pong {PING_SIZE} B", MECHANISMS[mech].ours
    params = {"size": PING_SIZE, "count": len(rtts)}
    for label, pct in (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9)):
        collector.get(
            case, mech, label, "µs", False, ours, params, MECHANISMS[mech].note
        ).samples.append(percentile(rtts, pct))


def mechanisms_for(
    ctx: Context,
    selected: list[str] | None,
    variants: tuple[str, ...] = (),
    without: tuple[str, ...] = (),
) -> list[str]:
    """The mechanisms to measure: ``selected`` (``--mechanisms``), else the defaults
    except ``without`` plus ``variants`` (non-default settings this suite measures)."""
    unknown = [m for m in selected or () if m not in MECHANISMS]
    if unknown:
        raise ValueError(f"unknown mechanism(s) {unknown}; known: {', '.join(MECHANISMS)}")
    if selected is not None:
        return [m for m in MECHANISMS if m in selected]
    return [*(m for m in DEFAULT_MECHANISMS if m not in without), *variants]


def measured_in(mech: str, chunk: int | None) -> bool:
    """Whether a default run measures ``mech`` in this case (``chunk`` None: ping-pong):
    the busy-poll variant where the policy polls, the 1 MiB-ring variant in bulk cases."""
    if mech == VCHAN_NO_POLL:
        return chunk is None or chunk in POLLED_CHUNKS
    if mech == VCHAN_1M:
        return chunk is not None
    return True


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

        with mechanism_env(mech), asyncio.Runner(loop_factory=self.ctx.loop_factory()) as runner:
            return runner.run(main())


def run(ctx: Context, selected: list[str] | None = None) -> list[Measurement]:
    mechs = mechanisms_for(ctx, selected, (VCHAN_NO_POLL,))
    chunks = QUICK_CHUNKS if ctx.quick else CHUNKS
    if ctx.cases is not None:
        chunks = ALL_CHUNKS
    rnd = round_bytes(ctx)
    collector = Collector(NAME, ctx.loop)

    def m(
        case: str, mech: str, metric: str, unit: str, hib: bool, params: dict[str, Any]
    ) -> Measurement:
        mechanism = MECHANISMS[mech]
        return collector.get(case, mech, metric, unit, hib, mechanism.ours, params, mechanism.note)

    with Runner(ctx, "streams") as runner:
        for rep in range(ctx.repetitions):
            for chunk in chunks:
                for mech in mechs:
                    if selected is None and not measured_in(mech, chunk):
                        continue
                    if not ctx.wants(f"bulk {chunk // 1024} KiB"):
                        continue
                    ctx.progress(
                        f"streams rep {rep + 1}/{ctx.repetitions} bulk {chunk // 1024} KiB {mech}"
                    )
                    gib = runner.run(
                        mech,
                        functools.partial(
                            bulk, chunk=chunk, seconds=ctx.seconds, warmup=ctx.warmup, rnd=rnd
                        ),
                    )
                    m(
                        f"bulk {chunk // 1024} KiB",
                        mech,
                        "throughput",
                        "GiB/s",
                        True,
                        {"chunk": chunk, "round": rnd, "seconds": ctx.seconds},
                    ).samples.append(gib)
            for mech in mechs:
                if selected is None and not measured_in(mech, None):
                    continue
                if not ctx.wants(f"ping-pong {PING_SIZE} B"):
                    continue
                ctx.progress(f"streams rep {rep + 1}/{ctx.repetitions} ping-pong {mech}")
                rtts: list[float] = runner.run(
                    mech, functools.partial(pingpong, seconds=ctx.seconds, warmup=ctx.warmup)
                )
                record_pingpong(collector, mech, rtts)
    return collector.results()
