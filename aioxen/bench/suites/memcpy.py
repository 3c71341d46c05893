"""``memcpy``: single-core copy bandwidth, the physical limit for every data path.

Copies run in a C loop (``ax_memcpy_repeat``) between two page-aligned buffers, so Python
call overhead does not count; sizes match the chunk sizes of the stream suites.
"""

from __future__ import annotations

import mmap
import time

from aioxen import native
from aioxen.bench.harness import Context, Measurement

NAME = "memcpy"
SIZES = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
GIB = float(1 << 30)


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


def run(ctx: Context) -> list[Measurement]:
    seconds = 0.05 if ctx.quick else 0.3
    results = {
        size: Measurement(
            suite=NAME,
            case=f"copy {size // 1024} KiB",
            mechanism="memcpy",
            metric="bandwidth",
            unit="GiB/s",
            higher_is_better=True,
            ours=False,
            params={"size": size},
            loop="-",
        )
        for size in SIZES
    }
    for rep in range(ctx.repetitions):
        for size in SIZES:
            ctx.progress(f"memcpy rep {rep + 1}/{ctx.repetitions} size {size}")
            results[size].samples.append(_bandwidth(size, seconds))
    return list(results.values())


def bandwidth_gib(size: int, seconds: float = 0.2) -> float:
    """Single measurement, for other suites that report a fraction of memcpy."""
    return _bandwidth(size, seconds)
