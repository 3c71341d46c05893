"""Block sources: what a blkback serves (a raw image file, or memory for tests).

Theory of operation
-------------------
A [`BlockSource`][] is a byte-addressed store with scatter/gather I/O: ``readv`` fills a
list of buffers (for blkback: slices of granted pages, so data goes straight between the
file and the frontend's memory, no intermediate copy), ``writev`` writes from them,
``flush`` makes every completed write durable, ``discard`` releases a range.  Offsets and
lengths are multiples of ``sector_size``; the caller (the backend) has validated them.

Blocking system calls never run on the event loop, with one exception that is decided per
file: an image on a memory-backed filesystem (tmpfs, ramfs) cannot block on a device, so
its ``pread``/``pwrite`` run inline — a thread hop would cost more than the copy.  For
other files reads first try ``preadv2(RWF_NOWAIT)`` (served from the page cache without
blocking, or refused with ``EAGAIN``) and otherwise go to a small thread pool, like writes,
``fdatasync`` and ``fallocate(PUNCH_HOLE)``.  The ``*_nowait`` methods expose the inline
path to the backend so that a request that can complete immediately costs no task at all.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

IOV_MAX = 1024
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

WBuf = memoryview | bytearray
RBuf = memoryview | bytearray | bytes


@runtime_checkable
class BlockSource(Protocol):
    """The storage behind a blkback (and behind [`aioxen.blk.device.SourceDevice`][])."""

    @property
    def size(self) -> int:
        """Capacity in bytes (a multiple of [`sector_size`][])."""
        ...

    @property
    def sector_size(self) -> int:
        """Logical sector size: 512 or 4096."""
        ...

    @property
    def physical_sector_size(self) -> int: ...

    @property
    def readonly(self) -> bool: ...

    @property
    def can_discard(self) -> bool: ...

    def readv_nowait(self, offset: int, bufs: Sequence[WBuf]) -> bool:
        """Fill ``bufs`` from ``offset`` if that cannot block; return whether it did."""
        ...

    def writev_nowait(self, offset: int, bufs: Sequence[RBuf]) -> bool:
        """Write ``bufs`` at ``offset`` if that cannot block; return whether it did."""
        ...

    async def readv(self, offset: int, bufs: Sequence[WBuf]) -> None: ...

    async def writev(self, offset: int, bufs: Sequence[RBuf]) -> None: ...

    async def flush(self) -> None:
        """Make every completed write durable (``fdatasync``)."""
        ...

    async def discard(self, offset: int, length: int, *, secure: bool = False) -> None:
        """Release ``length`` bytes at ``offset``; they read back as zeroes.  ``secure``:
        overwrite them durably first."""
        ...

    async def close(self) -> None: ...


def _total(bufs: Sequence[RBuf]) -> int:
    return sum(len(b) for b in bufs)


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of the buffer list."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if n and rest:
        rest[0] = rest[0][n:]
    return rest


def preadv_all(fd: int, bufs: Sequence[WBuf], offset: int, flags: int = 0) -> None:
    """``preadv`` until every buffer is full (short reads and ``IOV_MAX`` handled).
    ``EOFError`` if the file ends first; ``BlockingIOError`` passes through (RWF_NOWAIT)."""
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        batch = views[:IOV_MAX]
        want = _total(batch)
        n = os.preadv(fd, batch, offset, flags) if flags else os.preadv(fd, batch, offset)
        if n == 0:
            raise EOFError(f"fd {fd}: end of file at offset {offset}")
        offset += n
        views = views[len(batch) :] if n == want else _advance(batch, n) + views[len(batch) :]


def pwritev_all(fd: int, bufs: Sequence[RBuf], offset: int) -> None:
    """``pwritev`` until every byte is written."""
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        batch = views[:IOV_MAX]
        want = _total(batch)
        n = os.pwritev(fd, batch, offset)
        offset += n
        views = views[len(batch) :] if n == want else _advance(batch, n) + views[len(batch) :]


_libc: ctypes.CDLL | None = None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """``fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, length)``; ``OSError`` on failure."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE) at {offset}+{length}: {os.strerror(err)}")


def filesystem_type(path: str) -> str | None:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, fstype = -1, None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        if len(fields) < 5:
            continue
        mnt = fields[4].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= best:
            best, fstype = len(mnt), right.split()[0]
    return fstype


def _check_sector_size(sector_size: int) -> int:
    if sector_size not in (512, 1024, 2048, 4096):
        raise ValueError(f"sector size {sector_size} must be 512, 1024, 2048 or 4096")
    return sector_size


class _Geometry:
    """Sector sizes and capabilities, fixed at construction: what every source here
    reports besides its size."""

    def __init__(
        self, sector_size: int, physical_sector_size: int | None, readonly: bool, can_discard: bool
    ) -> None:
        self._sector_size = _check_sector_size(sector_size)
        self._physical = physical_sector_size or max(sector_size, 4096)
        self._readonly = readonly
        self._can_discard = can_discard and not readonly

    @property
    def sector_size(self) -> int:
        return self._sector_size

    @property
    def physical_sector_size(self) -> int:
        return self._physical

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def can_discard(self) -> bool:
        return self._can_discard


class FileSource(_Geometry):
    """A raw image file (or block device node) served through ``preadv``/``pwritev``.

    ``inline=None`` decides from the filesystem (memory-backed: inline I/O); ``workers``
    bounds the thread pool used for everything that may block.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        sector_size: int = 512,
        physical_sector_size: int | None = None,
        workers: int = 4,
        inline: bool | None = None,
    ) -> None:
        super().__init__(sector_size, physical_sector_size, readonly, True)
        self.path = os.fspath(path)
        self._fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            raw = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            os.close(self._fd)
            raise
        self._size = raw - raw % sector_size
        self._inline = (
            (filesystem_type(self.path) in MEMORY_FILESYSTEMS) if inline is None else inline
        )
        self._nowait_reads = hasattr(os, "RWF_NOWAIT") and not self._inline
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aioxen-blk")
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def inline(self) -> bool:
        """True if I/O runs on the calling thread (memory-backed file)."""
        return self._inline

    @property
    def fd(self) -> int:
        return self._fd

    def readv_nowait(self, offset: int, bufs: Sequence[WBuf]) -> bool:
        if self._inline:
            preadv_all(self._fd, bufs, offset)
            return True
        if self._nowait_reads:
            try:
                preadv_all(self._fd, bufs, offset, os.RWF_NOWAIT)
                return True
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._nowait_reads = False
                    return False
                raise
        return False

    def writev_nowait(self, offset: int, bufs: Sequence[RBuf]) -> bool:
        if self._inline:
            pwritev_all(self._fd, bufs, offset)
            return True
        return False

    async def _run(self, fn: object, *args: object) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, fn, *args)  # type: ignore[arg-type]

    async def readv(self, offset: int, bufs: Sequence[WBuf]) -> None:
        if not self.readv_nowait(offset, bufs):
            await self._run(preadv_all, self._fd, bufs, offset)

    async def writev(self, offset: int, bufs: Sequence[RBuf]) -> None:
        if self._readonly:
            raise PermissionError(f"{self.path}: read-only")
        if not self.writev_nowait(offset, bufs):
            await self._run(pwritev_all, self._fd, bufs, offset)

    async def flush(self) -> None:
        if self._inline:
            os.fdatasync(self._fd)
        else:
            await self._run(os.fdatasync, self._fd)

    def _discard_sync(self, offset: int, length: int, secure: bool) -> None:
        if secure:
            zero = bytes(min(length, 1 << 20))
            at, end = offset, offset + length
            while at < end:
                n = min(len(zero), end - at)
                pwritev_all(self._fd, [memoryview(zero)[:n]], at)
                at += n
            os.fdatasync(self._fd)
        try:
            punch_hole(self._fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if not secure:  # no hole punching here: zero the range instead
                self._discard_sync(offset, length, True)

    async def discard(self, offset: int, length: int, *, secure: bool = False) -> None:
        if self._readonly:
            raise PermissionError(f"{self.path}: read-only")
        await self._run(self._discard_sync, offset, length, secure)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        os.close(self._fd)

    def __repr__(self) -> str:
        return f"<FileSource {self.path} {self._size} bytes{' ro' if self._readonly else ''}>"


class MemorySource(_Geometry):
    """A block source in a ``bytearray`` (for tests and demos); every call is inline."""

    def __init__(
        self,
        size: int | None = None,
        *,
        data: bytes | bytearray | None = None,
        sector_size: int = 512,
        physical_sector_size: int | None = None,
        readonly: bool = False,
        can_discard: bool = True,
    ) -> None:
        super().__init__(sector_size, physical_sector_size, readonly, can_discard)
        if data is not None:
            self.data = bytearray(data)
        elif size is not None:
            self.data = bytearray(size)
        else:
            raise TypeError("MemorySource needs a size or data")
        if len(self.data) % sector_size:
            raise ValueError(f"size {len(self.data)} is not a multiple of {sector_size}")
        self.flushes = 0
        self.discards: list[tuple[int, int, bool]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    def _bounds(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > len(self.data):
            raise EOFError(f"I/O at {offset}+{length} past the end ({len(self.data)} bytes)")

    def readv_nowait(self, offset: int, bufs: Sequence[WBuf]) -> bool:
        self._bounds(offset, _total(bufs))
        src = memoryview(self.data)
        for b in bufs:
            n = len(b)
            memoryview(b).cast("B")[:] = src[offset : offset + n]
            offset += n
        return True

    def writev_nowait(self, offset: int, bufs: Sequence[RBuf]) -> bool:
        if self._readonly:
            raise PermissionError("memory source is read-only")
        self._bounds(offset, _total(bufs))
        for b in bufs:
            n = len(b)
            self.data[offset : offset + n] = b
            offset += n
        return True

    async def readv(self, offset: int, bufs: Sequence[WBuf]) -> None:
        self.readv_nowait(offset, bufs)

    async def writev(self, offset: int, bufs: Sequence[RBuf]) -> None:
        self.writev_nowait(offset, bufs)

    async def flush(self) -> None:
        self.flushes += 1

    async def discard(self, offset: int, length: int, *, secure: bool = False) -> None:
        if self._readonly:
            raise PermissionError("memory source is read-only")
        self._bounds(offset, length)
        self.data[offset : offset + length] = bytes(length)
        self.discards.append((offset, length, secure))

    async def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<MemorySource {len(self.data)} bytes{' ro' if self._readonly else ''}>"


__all__ = [
    "BlockSource",
    "FileSource",
    "MemorySource",
    "filesystem_type",
    "preadv_all",
    "punch_hole",
    "pwritev_all",
]
