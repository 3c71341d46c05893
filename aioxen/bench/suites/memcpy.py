"""``memcpy``: copy bandwidth references, the physical limits for every data path.

Two kinds of reference, both in C loops so that Python call overhead does not count:

* ``copy N KiB`` -- single-core ``memcpy`` between two page-aligned buffers
  (``ax_memcpy_repeat``), sizes matching the chunk sizes of the stream suites, plus one
  64 MiB copy that no cache holds (DRAM bandwidth).  For the smaller sizes both buffers
  stay in the core's caches: this is an upper bound no cross-process path can reach.
* ``cross-process N KiB`` -- the fairer limit for a byte stream between two processes:
  a producer process copies ``N``-byte writes from a cache-hot private buffer into a
  1 MiB shared ring (the benchmark's vchan ring size), a consumer process copies out up
  to 1 MiB at a time into its own buffer (the benchmark protocol's receive buffer),
  spinning on the indices (``ax_xring_produce``/``ax_xring_consume``).  That is the same
  two copies a vchan (or any shared-memory ring) makes, with every byte crossing from one
  core's cache to another's, and nothing else: no notifications, no Python.  The copies
  are the ring copies aioxen's byte rings use (16-byte vector moves, not ``memcpy``: see
  ``ax_copy_to_shared`` in ``aioxen/_native_impl.c``), and the stream is aligned (``N`` is
  a multiple of 16), so this is the best case.
"""

from __future__ import annotations

import mmap
import os
import time

from aioxen import native
from aioxen.bench.harness import Context, Measurement

NAME = "memcpy"
SIZES = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
DRAM_SIZE = 64 << 20
CROSS_CHUNKS = [4 << 10, 64 << 10, 1 << 20]
RING_SIZE = 1 << 20
READ_ROOM = 1 << 20
GIB = float(1 << 30)
_HDR = 4096


def _bandwidth(size: int, seconds: float) -> float:
    src = mmap.mmap(-1, size)
    dst = mmap.mmap(-1, size)
    src.write(b"\xa5" * size)
    ps = native.ffi.from_buffer(src)
    pd = native.ffi.from_buffer(dst)
    try:
        times = 1
        while True:  # calibrate to ~seconds/4, then measure
            t0 = time.perf_counter()
            native.lib.ax_memcpy_repeat(pd, ps, size, times)
            dt = time.perf_counter() - t0
            if dt >= seconds / 4:
                break
            times *= 4
        reps = max(1, int(times * seconds / dt))
        t0 = time.perf_counter()
        native.lib.ax_memcpy_repeat(pd, ps, size, reps)
        dt = time.perf_counter() - t0
        return size * reps / dt / GIB
    finally:
        native.ffi.release(ps)
        native.ffi.release(pd)
        src.close()
        dst.close()


def cross_process_gib(chunk: int, total: int, timeout: float = 30.0) -> float:
    """GiB/s of a C producer/consumer pair in two processes through a shared 1 MiB ring
    (see the module docstring).  ``RuntimeError`` if either side stalls for ``timeout``."""
    shared = mmap.mmap(-1, _HDR + RING_SIZE)  # MAP_SHARED | MAP_ANONYMOUS: survives fork
    src = mmap.mmap(-1, chunk)
    dst = mmap.mmap(-1, READ_ROOM)
    src.write(b"\x5a" * chunk)
    ffi, lib = native.ffi, native.lib
    base = ffi.from_buffer(shared)
    ps = ffi.from_buffer(src)
    pd = ffi.from_buffer(dst)
    try:
        hdr = ffi.cast("char *", base)
        ring = hdr + _HDR
        pid = os.fork()
        if pid == 0:  # producer
            ok = False
            try:
                ok = lib.ax_xring_produce(hdr, ring, RING_SIZE, ps, chunk, total, timeout) == 0
            finally:
                os._exit(0 if ok else 1)
        ns: int = lib.ax_xring_consume(hdr, ring, RING_SIZE, pd, READ_ROOM, total, timeout)
        _, status = os.waitpid(pid, 0)
        if ns <= 0 or status != 0:
            raise RuntimeError(f"cross-process copy reference stalled (chunk {chunk})")
        return total / (ns / 1e9) / GIB
    finally:
        for p in (base, ps, pd):
            ffi.release(p)
        for m in (shared, src, dst):
            m.close()


def run(ctx: Context) -> list[Measurement]:
    seconds = 0.05 if ctx.quick else 0.3
    total = (256 << 20) if ctx.quick else (1 << 30)

    def measurement(case: str, mechanism: str, params: dict[str, int]) -> Measurement:
        return Measurement(
            suite=NAME,
            case=case,
            mechanism=mechanism,
            metric="bandwidth",
            unit="GiB/s",
            higher_is_better=True,
            ours=False,
            params=params,
            loop="-",
        )

    copies = {
        size: measurement(f"copy {size // 1024} KiB", "memcpy", {"size": size})
        for size in [*SIZES, DRAM_SIZE]
    }
    crosses = {
        chunk: measurement(
            f"cross-process {chunk // 1024} KiB",
            "shared ring (C)",
            {"chunk": chunk, "total": total},
        )
        for chunk in CROSS_CHUNKS
    }
    for rep in range(ctx.repetitions):
        for size in copies:
            ctx.progress(f"memcpy rep {rep + 1}/{ctx.repetitions} size {size}")
            copies[size].samples.append(_bandwidth(size, seconds))
        for chunk in crosses:
            ctx.progress(f"memcpy rep {rep + 1}/{ctx.repetitions} cross-process {chunk}")
            crosses[chunk].samples.append(cross_process_gib(chunk, total))
    return [*copies.values(), *crosses.values()]


def bandwidth_gib(size: int, seconds: float = 0.2) -> float:
    """Single measurement, for other suites that report a fraction of memcpy."""
    return _bandwidth(size, seconds)
