"""``setup``: connection set-up cost and many concurrent connections.

* ``connect+close`` — sequential cycles per second: open a connection, exchange one
  64-byte ping-pong (so the connection is really up), close it.  vchan/unix against TCP
  loopback and Unix-socket streams, same client code, server in a second process.  vchan
  uses its default ring size (64 KiB each way), as the sockets use their default buffers;
  ``connect+close 1 MiB rings`` repeats it with 1 MiB rings (513 granted pages per
  connection instead of 33).
* ``concurrent N`` — N clients (1,000; 100 with ``--quick``) connect at once to one server
  process through one ``aioxen xenstored``; each then moves 64 KiB and waits until all are
  up.  Reported: time until all are connected, per-connection set-up latency (p50/p99),
  resident memory per connection (client + server process), aggregate throughput of the
  64 KiB transfers.  The same is done over Unix sockets for comparison.

The vchan client opens its platform (XenStore connection) once per run, as a program does,
not once per connection.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aioxen.bench.harness import Collector, Context, Measurement, timed_async
from aioxen.bench.mechanisms import (
    MECHANISMS,
    VCHAN_PORT,
    VCHAN_PORT_1M,
    Peer,
    client_platform,
    open_streams,
)
from aioxen.bench.suites.streams import GIB, Runner, percentile

NAME = "setup"
SETUP_MECHS = ["vchan/unix", "tcp", "unix-socket"]
PER_CONN_BYTES = 64 << 10


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


async def one_cycle(
    mech: str, peer: Peer | None, env: dict[str, str], plat: Any = None, port: str = VCHAN_PORT
) -> None:
    async with open_streams(mech, peer, env, plat, port) as (reader, writer):
        writer.write(b"ECHO 1 64\n" + b"x" * 64)
        await reader.readexactly(64)


async def cycles(
    mech: str,
    peer: Peer | None,
    env: dict[str, str],
    seconds: float,
    port: str = VCHAN_PORT,
    warmup: float = 0.0,
) -> float:
    """Connect+close cycles per second: ``warmup`` seconds untimed, then at least
    ``seconds`` timed."""
    async with client_platform(mech, env) as plat:

        async def step() -> float:
            await one_cycle(mech, peer, env, plat, port)
            return 1

        return await timed_async(step, seconds, warmup)


async def concurrent(
    mech: str, peer: Peer | None, env: dict[str, str], count: int
) -> dict[str, Any]:
    """``count`` clients at once; returns set-up latencies, memory and throughput."""
    assert peer is not None and peer.proc is not None
    server_pid = peer.proc.pid
    rss0 = rss_kib() + rss_kib(server_pid)
    all_up = asyncio.Event()
    connected = 0
    latencies: list[float] = []
    done_bytes = 0
    payload = b"\x5a" * PER_CONN_BYTES
    t_start = time.perf_counter()
    transfer_times: list[tuple[float, float]] = []
    rss_up: list[int] = []
    up_at: list[float] = []

    async def client(plat: Any) -> None:
        nonlocal connected, done_bytes
        t0 = time.perf_counter()
        async with open_streams(mech, peer, env, plat) as (reader, writer):
            latencies.append(time.perf_counter() - t0)
            connected += 1
            if connected == count:
                up_at.append(time.perf_counter())
                rss_up.append(rss_kib() + rss_kib(server_pid))
                all_up.set()
            await all_up.wait()
            t1 = time.perf_counter()
            writer.write(b"BULK %d\n" % PER_CONN_BYTES)
            writer.write(payload)
            await writer.drain()
            if await reader.readline() != b"OK\n":
                raise RuntimeError("concurrent transfer failed")
            transfer_times.append((t1, time.perf_counter()))
            done_bytes += PER_CONN_BYTES

    async with client_platform(mech, env) as plat:
        await asyncio.wait_for(asyncio.gather(*(client(plat) for _ in range(count))), 300)
    first = min(t for t, _ in transfer_times)
    last = max(t for _, t in transfer_times)
    return {
        "all_connected_s": up_at[0] - t_start,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "kib_per_conn": (rss_up[0] - rss0) / count,
        "aggregate_gib_s": done_bytes / (last - first) / GIB,
    }


def run(ctx: Context, selected: list[str] | None = None) -> list[Measurement]:
    mechs = [m for m in SETUP_MECHS if selected is None or m in selected]
    seconds, warmup = ctx.seconds, ctx.warmup
    count = 100 if ctx.quick else 1000
    collector = Collector(NAME, ctx.loop)

    def m(case: str, mech: str, metric: str, unit: str, hib: bool) -> Measurement:
        return collector.get(case, mech, metric, unit, hib, MECHANISMS[mech].ours, {"count": count})

    with Runner(ctx, "setup") as runner:

        def go(mech: str, coro_fn: Any) -> Any:
            peer = runner.peer(mech)
            with asyncio.Runner(loop_factory=ctx.loop_factory()) as r:
                return r.run(coro_fn(peer))

        for rep in range(ctx.repetitions):
            for mech in mechs:
                ctx.progress(f"setup rep {rep + 1}/{ctx.repetitions} connect+close {mech}")
                rate = go(
                    mech,
                    lambda p, mech=mech: cycles(mech, p, runner.env, seconds, VCHAN_PORT, warmup),
                )
                m("connect+close", mech, "rate", "cycles/s", True).samples.append(rate)
                if mech == "vchan/unix":
                    ctx.progress(f"setup rep {rep + 1}/{ctx.repetitions} connect+close 1 MiB")
                    rate = go(
                        mech,
                        lambda p, mech=mech: cycles(
                            mech, p, runner.env, seconds, VCHAN_PORT_1M, warmup
                        ),
                    )
                    m("connect+close 1 MiB rings", mech, "rate", "cycles/s", True).samples.append(
                        rate
                    )
            for mech in mechs:
                if mech == "tcp":
                    continue  # 1,000 loopback TCP connections measure the kernel, not IPC
                ctx.progress(f"setup rep {rep + 1}/{ctx.repetitions} {count} concurrent {mech}")
                r = go(mech, lambda p, mech=mech: concurrent(mech, p, runner.env, count))
                case = f"concurrent {count}"
                m(case, mech, "all connected", "s", False).samples.append(r["all_connected_s"])
                m(case, mech, "setup p50", "ms", False).samples.append(r["p50_ms"])
                m(case, mech, "setup p99", "ms", False).samples.append(r["p99_ms"])
                m(case, mech, "memory/conn", "KiB", False).samples.append(r["kib_per_conn"])
                m(case, mech, "aggregate", "GiB/s", True).samples.append(r["aggregate_gib_s"])
    return collector.results()
