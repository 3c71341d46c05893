"""The async block-device interface (what blkfront offers and the NBD server exports).

Theory of operation
-------------------
A [`BlockDevice`][] addresses the disk in *logical sectors* of ``sector_size`` bytes:
``await dev.read(sector, count)`` returns ``count * sector_size`` bytes,
``await dev.write(sector, data)`` writes a whole number of sectors, ``flush()`` makes
every completed write durable, ``discard(sector, count)`` releases sectors.  ``size`` is
in bytes.  Calls may be issued concurrently; each completes independently (a device keeps
many requests in flight), and overlapping concurrent writes have no defined order — as
on any disk.

[`SourceDevice`][] adapts a [`BlockSource`][aioxen.blk.source.BlockSource] to this interface,
so a local image can be exported over NBD (and the NBD server tested) without Xen.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from aioxen.blk.source import BlockSource


@runtime_checkable
class BlockDevice(Protocol):
    @property
    def size(self) -> int:
        """Capacity in bytes."""
        ...

    @property
    def sector_size(self) -> int: ...

    @property
    def readonly(self) -> bool: ...

    @property
    def can_flush(self) -> bool: ...

    @property
    def can_discard(self) -> bool: ...

    async def read(self, sector: int, count: int) -> bytes: ...

    async def read_into(self, sector: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` (a whole number of sectors) from ``sector`` on."""
        ...

    async def write(self, sector: int, data: bytes | bytearray | memoryview) -> None: ...

    async def flush(self) -> None: ...

    async def discard(self, sector: int, count: int) -> None: ...


def check_io(dev: BlockDevice, sector: int, nbytes: int, *, write: bool = False) -> int:
    """Validate a sector range on ``dev``; return its byte offset.  ``ValueError`` for
    misaligned or out-of-range I/O, ``PermissionError`` for writes to a read-only device."""
    ss = dev.sector_size
    if nbytes % ss:
        raise ValueError(f"length {nbytes} is not a multiple of the {ss}-byte sector size")
    if sector < 0 or nbytes < 0 or (sector * ss) + nbytes > dev.size:
        raise ValueError(
            f"I/O of {nbytes} bytes at sector {sector} is outside the device "
            f"({dev.size // ss} sectors of {ss} bytes)"
        )
    if write and dev.readonly:
        raise PermissionError("write to a read-only device")
    return sector * ss


class SourceDevice:
    """A [`BlockDevice`][] over a local [`BlockSource`][]."""

    def __init__(self, source: BlockSource) -> None:
        self.source = source

    @property
    def size(self) -> int:
        return self.source.size

    @property
    def sector_size(self) -> int:
        return self.source.sector_size

    @property
    def readonly(self) -> bool:
        return self.source.readonly

    @property
    def can_flush(self) -> bool:
        return True

    @property
    def can_discard(self) -> bool:
        return self.source.can_discard

    async def read(self, sector: int, count: int) -> bytes:
        buf = bytearray(count * self.sector_size)
        await self.read_into(sector, buf)
        return bytes(buf)

    async def read_into(self, sector: int, buf: memoryview | bytearray) -> None:
        off = check_io(self, sector, len(buf))
        await self.source.readv(off, [buf])

    async def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        off = check_io(self, sector, len(data), write=True)
        await self.source.writev(off, [data])

    async def flush(self) -> None:
        await self.source.flush()

    async def discard(self, sector: int, count: int) -> None:
        off = check_io(self, sector, count * self.sector_size, write=True)
        await self.source.discard(off, count * self.sector_size)

    async def close(self) -> None:
        await self.source.close()


__all__ = ["BlockDevice", "SourceDevice", "check_io"]
