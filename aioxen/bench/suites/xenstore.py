"""``xenstore``: XenStore operations per second against a real ``aioxen xenstored``.

One ``aioxen xenstored`` process serves everything.  Mechanisms:

* ``aioxen`` -- :class:`aioxen.xenstore.XenStoreClient` over the Unix socket, one request
  in flight (each ``await`` finishes before the next starts);
* ``aioxen x32`` -- the same client with 32 requests in flight (``asyncio.gather``), which
  its req_id matching allows on one connection;
* ``pyxs`` -- pyxs 0.4.1 from PyPI (a reader thread plus a condition variable per request),
  one request in flight -- the comparison the XenStore issue asks for (in the ``dev``
  extra; left out when it is not installed).

Operations: ``read`` (a 16-byte value), ``write`` (a 16-byte value) and ``transaction``
(start, write two keys, commit).  Each repetition runs every mechanism for a fixed time,
interleaved so machine noise hits all alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aioxen.bench.harness import Context, Measurement
from aioxen.bench.mechanisms import XenstoredProcess

NAME = "xenstore"
VALUE = b"0123456789abcdef"


async def _timed_async(fn: Callable[[], Awaitable[int]], seconds: float) -> float:
    ops = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        ops += await fn()
        now = time.perf_counter()
        if now >= deadline:
            return ops / (now - t0)


def _timed_sync(fn: Callable[[], int], seconds: float) -> float:
    ops = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        ops += fn()
        now = time.perf_counter()
        if now >= deadline:
            return ops / (now - t0)


async def _measure(sock: str, ctx: Context) -> list[Measurement]:
    try:
        import pyxs
    except ImportError:  # pragma: no cover - pyxs is in the dev extra only
        pyxs = None

    from aioxen.xenstore import XenStoreClient

    seconds = 0.3 if ctx.quick else 1.5
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
                    rate = await _timed_async(fn, seconds)
                else:
                    rate = _timed_sync(fn, seconds)
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


def run(ctx: Context) -> list[Measurement]:
    server = XenstoredProcess()
    env = server.start()
    try:
        with asyncio.Runner(loop_factory=ctx.loop_factory()) as runner:
            return runner.run(_measure(env["XENSTORED_PATH"], ctx))
    finally:
        server.stop()
