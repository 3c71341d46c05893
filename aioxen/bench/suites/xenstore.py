"""``xenstore``: XenStore operations per second against a real ``aioxen xenstored``.

One ``aioxen xenstored`` process serves everything.  Mechanisms:

* ``aioxen`` -- [`aioxen.xenstore.XenStoreClient`][] over the Unix socket, one request
  in flight (each ``await`` finishes before the next starts);
* ``aioxen x32`` -- the same client with 32 requests in flight (``asyncio.gather``), which
  its req_id matching allows on one connection;
* ``pyxs`` -- pyxs 0.4.1 from PyPI (a reader thread plus a condition variable per request),
  one request in flight -- the comparison the XenStore issue asks for (in the ``dev``
  extra; left out when it is not installed).

Operations: ``read`` (a 16-byte value), ``write`` (a 16-byte value) and ``transaction``
(start, write two keys, commit).  Each repetition runs every mechanism for a fixed time,
interleaved so machine noise hits all alike.

Case ``flood`` (issue 14): a well-behaved dom0 client reads a 16-byte node, one request in
flight, while one hostile domain (a separate process, raw sockets) floods a fresh
``aioxen xenstored``.  Reported per phase: the good client's READ latency p50 and p99 (ms)
and the server's RSS (MB, the most sampled during the phase).  Phases, in this order within
each repetition: ``unflooded`` (the baseline, same run, same server), ``directory_part
flood`` (3,000 pipelined DIRECTORY_PARTs of a 997-child directory per burst, replies read,
bursts back to back) and ``read flood`` (8 connections pipelining 20-byte READs of a 2 KB
node and never reading a reply).  Only ``--mechanisms flood`` (or a phase name) runs
this case; the default run leaves it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aioxen.bench.harness import (
    Context,
    Measurement,
    end_process,
    spawn,
    timed_async,
    timed_sync,
)
from aioxen.bench.mechanisms import XenstoredProcess

NAME = "xenstore"
VALUE = b"0123456789abcdef"
FLOOD_DOMID = 5
FLOOD_PHASES = ("unflooded", "directory_part flood", "read flood")


async def _measure(sock: str, ctx: Context) -> list[Measurement]:
    try:
        import pyxs
    except ImportError:  # pragma: no cover - pyxs is in the dev extra only
        pyxs = None

    from aioxen.xenstore import XenStoreClient

    seconds = ctx.seconds
    ours = XenStoreClient.for_unix_socket(sock, 0, timeout=30)
    await ours.write("/bench/r", VALUE)
    key = "/bench/w"

    async def a_read() -> int:
        await ours.read("/bench/r")
        return 1

    async def a_write() -> int:
        await ours.write(key, VALUE)
        return 1

    async def a_tx() -> int:
        async with ours.transaction() as tx:
            await tx.write("/bench/t1", VALUE)
            await tx.write("/bench/t2", VALUE)
        return 1

    async def a_read32() -> int:
        await asyncio.gather(*(ours.read("/bench/r") for _ in range(32)))
        return 32

    async def a_write32() -> int:
        await asyncio.gather(*(ours.write(f"{key}{i}", VALUE) for i in range(32)))
        return 32

    px: Any = pyxs.Client(unix_socket_path=sock) if pyxs is not None else None
    if px is not None:
        px.connect()

    def p_read() -> int:
        px.read(b"/bench/r")
        return 1

    def p_write() -> int:
        px.write(b"/bench/w", VALUE)
        return 1

    def p_tx() -> int:
        while True:
            px.transaction()
            px.write(b"/bench/t1", VALUE)
            px.write(b"/bench/t2", VALUE)
            if px.commit():
                return 1

    cases: list[tuple[str, str, Callable[[], Any], bool]] = [
        ("read", "aioxen", a_read, True),
        ("read", "aioxen x32", a_read32, True),
        ("read", "pyxs", p_read, False),
        ("write", "aioxen", a_write, True),
        ("write", "aioxen x32", a_write32, True),
        ("write", "pyxs", p_write, False),
        ("transaction", "aioxen", a_tx, True),
        ("transaction", "pyxs", p_tx, False),
    ]
    if px is None:
        cases = [c for c in cases if c[1] != "pyxs"]
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        for rep in range(ctx.repetitions):
            for op, mech, fn, is_async in cases:
                ctx.progress(f"xenstore rep {rep + 1}/{ctx.repetitions} {op} {mech}")
                if is_async:
                    rate = await timed_async(fn, seconds, ctx.warmup)
                else:
                    rate = timed_sync(fn, seconds, ctx.warmup)
                samples.setdefault((op, mech), []).append(rate)
    finally:
        if px is not None:
            px.close()
        await ours.close()
    return [
        Measurement(
            suite=NAME,
            case=op,
            mechanism=mech,
            metric="rate",
            unit="ops/s",
            higher_is_better=True,
            ours=mech.startswith("aioxen"),
            samples=values,
            params={"seconds": seconds, "in_flight": 32 if "x32" in mech else 1},
            loop=ctx.loop,
        )
        for (op, mech), values in samples.items()
    ]


# -- the flood case ----------------------------------------------------------------------


def _frame(typ: int, payload: bytes) -> bytes:
    from aioxen.xenstore.wire import HEADER

    return HEADER.pack(typ, 1, 0, len(payload)) + payload


def _flood_conn(sock_path: str) -> socket.socket:
    """A raw connection acting as the flooding domain (identified, its reply read)."""
    from aioxen.xenstore.wire import Decoder, XsType

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(_frame(XsType.CONTROL, b"aioxen-identify\0%d\0" % FLOOD_DOMID))
    dec = Decoder()
    while not dec.messages():
        data = s.recv(4096)
        if not data:
            raise ConnectionResetError(f"xenstored {sock_path} closed the flood connection")
        dec.feed(data)
    return s


def flood(sock_path: str, kind: str) -> None:
    """The hostile domain, run in its own process: prints ``ready``, floods until SIGTERM,
    then prints ``done N`` -- N requests the server took (read flood) or answered
    (directory_part flood) -- and exits."""
    from aioxen.xenstore.wire import Decoder, XsType

    done = [0]

    def stop(signum: int, frame: object) -> None:
        print(f"done {done[0]}", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)

    if kind == "read flood":
        conns = [_flood_conn(sock_path) for _ in range(8)]
        conns[0].sendall(_frame(XsType.WRITE, b"big\0" + b"v" * 2000))
        conns[0].recv(4096)
        print("ready", flush=True)
        chunk = _frame(XsType.READ, b"big\0") * 3277  # 64 KiB of 20-byte READs
        offsets = [0] * len(conns)  # where each stream is within ``chunk``
        for c in conns:
            c.setblocking(False)
        while True:  # never read a reply
            for i, c in enumerate(conns):
                with contextlib.suppress(BlockingIOError):
                    sent = c.send(chunk[offsets[i] :])
                    done[0] += (offsets[i] + sent) // 20 - offsets[i] // 20
                    offsets[i] = (offsets[i] + sent) % len(chunk)
            time.sleep(0.001)
    conn = _flood_conn(sock_path)
    burst = _frame(XsType.DIRECTORY_PART, b"/big\0" + b"0\0") * 3000
    print("ready", flush=True)
    dec = Decoder()
    while True:
        conn.sendall(burst)
        got = 0
        while got < 3000:
            data = conn.recv(1 << 16)
            if not data:
                return
            dec.feed(data)
            replies = len(dec.messages())
            got += replies
            done[0] += replies


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _flood_phase(
    sock_path: str, pid: int, phase: str, seconds: float
) -> tuple[list[float], float, float]:
    """READ latencies (s) of the good client, the server's peak RSS (MB) and the flood's
    rate (requests per second, see [`flood`][]) in one phase."""
    from aioxen.xenstore import XenStoreClient

    flooder: subprocess.Popen[str] | None = None
    if phase != "unflooded":
        code = "import sys; from aioxen.bench.suites.xenstore import flood; flood(*sys.argv[1:])"
        flooder = spawn(
            [sys.executable, "-c", code, sock_path, phase], stdout=subprocess.PIPE, text=True
        )
        assert flooder.stdout is not None
        line = await asyncio.to_thread(flooder.stdout.readline)
        if line != "ready\n":
            end_process(flooder, 5)
            raise RuntimeError(f"the {phase} process failed to start")
    t_ready = time.perf_counter()
    flooded = 0
    good = XenStoreClient.for_unix_socket(sock_path, 0, timeout=120)
    latencies: list[float] = []
    peak = _rss_mb(pid)
    try:
        await asyncio.sleep(0.2)  # let the flood build up
        t_end = time.perf_counter() + seconds
        next_sample = 0.0
        while True:
            t0 = time.perf_counter()
            await good.read("/bench/r")
            now = time.perf_counter()
            latencies.append(now - t0)
            if now >= next_sample:
                peak = max(peak, _rss_mb(pid))
                next_sample = now + 0.05
            if now >= t_end:
                break
        peak = max(peak, _rss_mb(pid))
    finally:
        await good.close()
        if flooder is not None:
            flooder.terminate()
            assert flooder.stdout is not None
            last = (await asyncio.to_thread(flooder.stdout.read)).split()
            t_stop = time.perf_counter()
            end_process(flooder, 5)
            flooder.stdout.close()
            if last[:1] == ["done"]:
                flooded = int(last[1])
    rate = flooded / (t_stop - t_ready) if flooder is not None else float("nan")
    return latencies, peak, rate


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure_flood(ctx: Context) -> list[Measurement]:
    from aioxen.xenstore import XenStoreClient

    seconds = max(0.5, ctx.seconds)
    samples: dict[tuple[str, str], list[float]] = {}
    counts: dict[str, int] = {}
    for rep in range(ctx.repetitions):
        server = XenstoredProcess()  # a fresh server: RSS is this run's alone
        env = server.start()
        sock_path = env["XENSTORED_PATH"]
        assert server.proc is not None
        try:
            setup = XenStoreClient.for_unix_socket(sock_path, 0, timeout=60)
            try:
                await setup.write("/bench/r", VALUE)
                await setup.write("/big", b"")
                await setup.set_perms("/big", ["n0", f"r{FLOOD_DOMID}"])
                for first in range(0, 997, 100):
                    names = range(first, min(first + 100, 997))
                    await asyncio.gather(*(setup.write(f"/big/child-{i:04d}", b"x") for i in names))
            finally:
                await setup.close()
            for phase in FLOOD_PHASES:
                ctx.progress(f"xenstore rep {rep + 1}/{ctx.repetitions} flood: {phase}")
                lat, rss, rate = await _flood_phase(sock_path, server.proc.pid, phase, seconds)
                counts[phase] = counts.get(phase, 0) + len(lat)
                samples.setdefault((phase, "read p50"), []).append(statistics.median(lat) * 1e3)
                samples.setdefault((phase, "read p99"), []).append(_percentile(lat, 0.99) * 1e3)
                samples.setdefault((phase, "rss"), []).append(rss)
                if phase == "directory_part flood":
                    samples.setdefault((phase, "flood rate"), []).append(rate)
        finally:
            server.stop()
    return [
        Measurement(
            suite=NAME,
            case="flood",
            mechanism=phase,
            metric=metric,
            unit={"rss": "MB", "flood rate": "req/s"}.get(metric, "ms"),
            higher_is_better=metric == "flood rate",
            ours=phase != "unflooded",
            samples=values,
            params={"seconds": seconds, "reads": counts[phase]},
            loop=ctx.loop,
        )
        for (phase, metric), values in samples.items()
    ]


def run(ctx: Context, selected: list[str] | None = None) -> list[Measurement]:
    """``selected`` (``--mechanisms``): ``flood`` or a phase name picks the flood case
    (measured only on request: it is about fairness under attack, not speed, and takes
    a fresh server per repetition); ``aioxen``, ``aioxen x32``, ``pyxs`` pick operation
    mechanisms."""
    want_flood = selected is not None and any(m == "flood" or m in FLOOD_PHASES for m in selected)
    want_ops = selected is None or any(m not in FLOOD_PHASES and m != "flood" for m in selected)
    results: list[Measurement] = []
    with asyncio.Runner(loop_factory=ctx.loop_factory()) as runner:
        if want_ops:
            server = XenstoredProcess()
            env = server.start()
            try:
                ops = runner.run(_measure(env["XENSTORED_PATH"], ctx))
            finally:
                server.stop()
            results += [m for m in ops if selected is None or m.mechanism in selected]
        if want_flood:
            results += runner.run(_measure_flood(ctx))
    return results
