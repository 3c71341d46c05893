"""``xenstore``: XenStore operations per second against a real ``aioxen xenstored``.

One ``aioxen xenstored`` process serves everything.  Mechanisms:

* ``aioxen`` -- :class:`aioxen.xenstore.XenStoreClient` over the Unix socket, one request
  in flight (each ``await`` finishes before the next starts);
* ``aioxen x32`` -- the same client with 32 requests in flight (``asyncio.gather``), which
  its req_id matching allows on one connection;
* ``pyxs`` -- pyxs 0.4.1 from PyPI (a reader thread plus a condition variable per request),
  one request in flight -- the comparison the XenStore issue asks for.

Operations: ``read`` (a 16-byte value), ``write`` (a 16-byte value) and ``transaction``
(start, write two keys, commit).  Each repetition runs every mechanism for a fixed time,
interleaved so machine noise hits all alike.

``run(quick)`` returns one dict per (operation, mechanism, loop) with ``name``,
``mechanism``, ``ops_per_s`` (the median) and all samples;
``python benchmarks/xenstore_suite.py [--quick]`` prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

VALUE = b"0123456789abcdef"
OPS = ("read", "write", "transaction")


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop  # type: ignore[no-any-return,unused-ignore]
    return asyncio.new_event_loop


def _start_server(root: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "aioxen", "xenstored", "--root", root],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    line = proc.stdout.readline().decode()
    if not line.startswith("XENSTORED_PATH="):
        proc.kill()
        raise RuntimeError(f"aioxen xenstored did not start: {line!r}")
    return proc, line[len("XENSTORED_PATH=") : line.index(";")]


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


async def _measure(sock: str, quick: bool, loop_name: str) -> list[dict[str, Any]]:
    import pyxs

    from aioxen.xenstore import XenStoreClient

    seconds = 0.4 if quick else 1.5
    reps = 3 if quick else 5
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

    px = pyxs.Client(unix_socket_path=sock)
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
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(reps):
            for op, mech, fn, is_async in cases:
                if is_async:
                    rate = await _timed_async(fn, seconds)
                else:
                    rate = _timed_sync(fn, seconds)
                samples.setdefault((op, mech), []).append(rate)
    finally:
        px.close()
        await ours.close()
    out = []
    for (op, mech), values in samples.items():
        median = statistics.median(values)
        out.append(
            {
                "suite": "xenstore",
                "name": f"xenstore {op}",
                "case": op,
                "mechanism": mech,
                "metric": f"{op} ops",
                "unit": "ops/s",
                "higher_is_better": True,
                "ours": mech.startswith("aioxen"),
                "loop": loop_name,
                "params": {"seconds": seconds, "in_flight": 32 if "x32" in mech else 1},
                "samples": values,
                "median": median,
                "ops_per_s": median,
            }
        )
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    """Measure read/write/transaction rates of aioxen's client and pyxs against one
    ``aioxen xenstored`` (client loop uvloop; also asyncio unless ``quick``)."""
    loops = ["uvloop"] if quick else ["uvloop", "asyncio"]
    root = tempfile.mkdtemp(prefix="aioxen-xsbench-")
    proc, sock = _start_server(os.path.join(root, "root"))
    results: list[dict[str, Any]] = []
    try:
        for name in loops:
            with asyncio.Runner(loop_factory=_loop_factory(name)) as runner:
                results += runner.run(_measure(sock, quick, name))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(root, ignore_errors=True)
    return results


def format_results(results: list[dict[str, Any]]) -> str:
    lines = [f"{'operation':<12} {'mechanism':<12} {'loop':<8} {'ops/s':>10}"]
    for r in results:
        lines.append(f"{r['case']:<12} {r['mechanism']:<12} {r['loop']:<8} {r['ops_per_s']:>10.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, uvloop only")
    args = parser.parse_args(argv)
    print(format_results(run(args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
