"""``blk``: block I/O through blkfront -> blkback vs ``os.preadv`` in a thread pool.

Two processes on the ``unix`` platform (plus an ``aioxen xenstored``): a blkback (domain 0,
run as ``python -m aioxen.bench.suites.blk peer LOOP IMAGE``) serving a raw image on tmpfs
(``/dev/shm``; the ``unix`` platform root with its grant page files is on tmpfs too), and
the benchmark process itself as domain 1 with a blkfront
([`aioxen.blk.vbd.open_blkfront`][]).  The baseline is what an asyncio program would
otherwise do with the same file: ``os.preadv``/``os.pwritev`` through
``loop.run_in_executor`` on a thread pool, at the same queue depth, on the same loop.

Cases (identical names for both mechanisms, so ratios are computed):
4 KiB random reads and writes at queue depth 1 and 32 (IOPS), and 1 MiB sequential reads
and writes at queue depth 4 (GiB/s).  Each case runs for a fixed time with ``depth``
coroutines issuing I/O back to back into preallocated buffers
(``BlkFront.read_into``/``write``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aioxen.bench.harness import Context, Measurement, end_process, make_temp_dir, shm_dir, spawn

NAME = "blk"
OURS = "blkfront/unix"
BASE = "preadv+threads"
FRONT_DOMID = 1
KIB = 1024
MIB = 1 << 20
GIB = float(1 << 30)

CASES: list[tuple[str, str, int, int]] = [
    # (case, kind, block size, queue depth)
    ("4 KiB randread QD1", "randread", 4 * KIB, 1),
    ("4 KiB randread QD32", "randread", 4 * KIB, 32),
    ("4 KiB randwrite QD1", "randwrite", 4 * KIB, 1),
    ("4 KiB randwrite QD32", "randwrite", 4 * KIB, 32),
    ("1 MiB seqread QD4", "seqread", MIB, 4),
    ("1 MiB seqwrite QD4", "seqwrite", MIB, 4),
]


# --------------------------------------------------------------------------- peer


def _peer(loop: str, image: str) -> int:
    """The blkback process (domain 0)."""
    from aioxen.cli import build_parser

    args = build_parser().parse_args(
        ["blkback", "--image", image, "--frontend", str(FRONT_DOMID), "--devid", "xvda"]
    )
    factory: Callable[[], asyncio.AbstractEventLoop]
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return int(runner.run(args.func(args)) or 0)


class _Backend:
    def __init__(self, loop: str, image: str, env: dict[str, str]) -> None:
        self.proc: subprocess.Popen[str] = spawn(
            [sys.executable, "-m", "aioxen.bench.suites.blk", "peer", loop, image],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, **env, AIOXEN_PLATFORM="unix", AIOXEN_DOMID="0"),
        )
        assert self.proc.stdout is not None
        try:
            line = self.proc.stdout.readline()
        except BaseException:  # a Ctrl-C while it starts: no orphan
            self.stop()
            raise
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"blkback did not start: {line!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            end_process(self.proc, 20)


# --------------------------------------------------------------------------- workloads


def _offsets(kind: str, bs: int, size: int, worker: int, depth: int) -> Callable[[], int]:
    if kind.startswith("rand"):
        rng = random.Random(worker)
        slots = size // bs
        return lambda: rng.randrange(slots) * bs
    # sequential: the workers stride through the file together
    state = {"next": worker * bs}

    def nxt() -> int:
        off = state["next"]
        state["next"] = (off + depth * bs) % (size - size % (depth * bs) or size)
        return off

    return nxt


async def _drive(
    depth: int,
    seconds: float,
    make_op: Callable[[int], Callable[[], Awaitable[Any]]],
    warmup: float = 0.0,
) -> float:
    """Run ``depth`` workers issuing ops back to back for ``warmup`` seconds (untimed;
    it also faults in persistent grants and starts the thread pool), then for
    ``seconds``; return ops per second of the timed part."""
    ops = [make_op(w) for w in range(depth)]
    for op in ops:
        await op()
    counts = [0] * depth

    async def worker(i: int, deadline: float) -> None:
        op = ops[i]
        n = 0
        while time.perf_counter() < deadline:
            await op()
            n += 1
        counts[i] = n

    deadline = time.perf_counter() + warmup
    await asyncio.gather(*(worker(i, deadline) for i in range(depth)))
    t0 = time.perf_counter()
    deadline = t0 + seconds
    await asyncio.gather(*(worker(i, deadline) for i in range(depth)))
    return sum(counts) / (time.perf_counter() - t0)


def _ours(dev: Any, kind: str, bs: int, depth: int, size: int) -> Callable[[int], Any]:
    ss = dev.sector_size

    def make(worker: int) -> Callable[[], Awaitable[Any]]:
        nxt = _offsets(kind, bs, size, worker, depth)
        buf = bytearray(os.urandom(bs))
        if kind.endswith("read"):
            return lambda: dev.read_into(nxt() // ss, buf)
        return lambda: dev.write(nxt() // ss, buf)

    return make


def _baseline(
    fd: int, pool: ThreadPoolExecutor, kind: str, bs: int, depth: int, size: int
) -> Callable[[int], Any]:
    loop = asyncio.get_running_loop()

    def make(worker: int) -> Callable[[], Awaitable[Any]]:
        nxt = _offsets(kind, bs, size, worker, depth)
        buf = bytearray(os.urandom(bs))
        if kind.endswith("read"):
            return lambda: loop.run_in_executor(pool, os.preadv, fd, [buf], nxt())
        return lambda: loop.run_in_executor(pool, os.pwritev, fd, [buf], nxt())

    return make


async def _measure(
    ctx: Context, env: dict[str, str], image: str, results: dict[tuple[str, str], Measurement]
) -> None:
    import aioxen
    from aioxen.blk.vbd import open_blkfront

    seconds = ctx.seconds
    size = os.path.getsize(image)
    plat = aioxen.platform(
        "unix", domid=FRONT_DOMID, root=env["XEN_ROOT"], xenstored_path=env["XENSTORED_PATH"]
    )
    fd = os.open(image, os.O_RDWR)
    pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="bench-blk")
    try:
        async with plat, open_blkfront("xvda", platform=plat, backend_domid=0) as dev:
            for rep in range(ctx.repetitions):
                for case, kind, bs, depth in CASES:
                    for mech in (OURS, BASE):
                        ctx.progress(f"blk rep {rep + 1}/{ctx.repetitions} {case} {mech}")
                        if mech == OURS:
                            make = _ours(dev, kind, bs, depth, size)
                        else:
                            make = _baseline(fd, pool, kind, bs, depth, size)
                        rate = await _drive(depth, seconds, make, ctx.warmup)
                        m = results[(case, mech)]
                        m.samples.append(rate * bs / GIB if bs >= MIB else rate)
    finally:
        pool.shutdown(wait=True)
        os.close(fd)


def run(ctx: Context) -> list[Measurement]:
    from aioxen.bench.mechanisms import XenstoredProcess

    results: dict[tuple[str, str], Measurement] = {}
    for case, kind, bs, depth in CASES:
        for mech in (OURS, BASE):
            results[(case, mech)] = Measurement(
                suite=NAME,
                case=case,
                mechanism=mech,
                metric="bandwidth" if bs >= MIB else "IOPS",
                unit="GiB/s" if bs >= MIB else "IOPS",
                higher_is_better=True,
                ours=mech == OURS,
                params={"kind": kind, "block": bs, "depth": depth},
                loop=ctx.loop,
            )
    shm = shm_dir()
    fd, image = tempfile.mkstemp(prefix="aioxen-bench-blk-", suffix=".img", dir=shm)
    os.close(fd)
    size = (64 if ctx.quick else 256) * MIB
    with open(image, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
    xs = XenstoredProcess()
    if shm is not None:  # grant page files in memory too, like real grant pages
        shutil.rmtree(xs.root, ignore_errors=True)
        xs.root = make_temp_dir("aioxen-bench-blk-root-", shm)
    backend: _Backend | None = None
    try:
        env = xs.start()
        backend = _Backend(ctx.loop, image, env)
        with asyncio.Runner(loop_factory=ctx.loop_factory()) as runner:
            runner.run(_measure(ctx, env, image, results))
    finally:
        if backend is not None:
            backend.stop()
        xs.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
    return list(results.values())


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "peer":
        sys.exit(_peer(sys.argv[2], sys.argv[3]))
    print("usage: python -m aioxen.bench.suites.blk peer LOOP IMAGE", file=sys.stderr)
    sys.exit(2)
