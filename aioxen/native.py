"""Typed Python face of the cffi helper ``aioxen._native``.

Shared memory in aioxen is a ``memoryview``.  Python cannot load or store a word of it
atomically with acquire/release ordering, nor do an atomic read-modify-write on a byte that
another domain also writes.  [`SharedBuffer`][] pins a buffer once (``ffi.from_buffer``)
and offers exactly those operations by byte offset, plus the wrap-aware byte-ring copies
used by vchan, the console and the xenstore ring.

The pinned buffer is an export of the underlying object: ``mmap.close()`` refuses to run
while a [`SharedBuffer`][] is alive, which is what keeps a pointer from dangling.  Call
[`SharedBuffer.release`][] before closing the memory it points into.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import aioxen._native as _native

ffi = _native.ffi  # typed by aioxen/_native.pyi
lib = _native.lib

Buffer = memoryview | bytearray | bytes | mmap.mmap


class SharedBuffer:
    """A pinned pointer into shared memory with atomic accessors by byte offset.

    Offsets are not bounds-checked against the peer's idea of the page (they come from our
    own layout constants); they *are* checked against the buffer size, so a layout bug raises
    ``IndexError`` instead of touching memory outside the buffer.
    """

    __slots__ = ("_cdata", "_size")

    def __init__(self, buf: Buffer) -> None:
        self._cdata: Any = ffi.from_buffer("char[]", buf)
        self._size = len(self._cdata)

    @property
    def size(self) -> int:
        return self._size

    @property
    def pointer(self) -> Any:
        """The raw ``char *`` (cffi cdata); valid until [`release`][]."""
        return self._cdata

    def _check(self, off: int, width: int) -> None:
        if off < 0 or off + width > self._size:
            raise IndexError(f"offset {off}+{width} outside shared buffer of {self._size} bytes")

    def load_u8(self, off: int) -> int:
        self._check(off, 1)
        return int(lib.ax_load_u8(self._cdata, off))

    def load_u16(self, off: int) -> int:
        self._check(off, 2)
        return int(lib.ax_load_u16(self._cdata, off))

    def load_u32(self, off: int) -> int:
        self._check(off, 4)
        return int(lib.ax_load_u32(self._cdata, off))

    def store_u8(self, off: int, value: int) -> None:
        self._check(off, 1)
        lib.ax_store_u8(self._cdata, off, value)

    def store_u16(self, off: int, value: int) -> None:
        self._check(off, 2)
        lib.ax_store_u16(self._cdata, off, value)

    def store_u32(self, off: int, value: int) -> None:
        self._check(off, 4)
        lib.ax_store_u32(self._cdata, off, value & 0xFFFFFFFF)

    def fetch_or_u8(self, off: int, bits: int) -> int:
        """Atomically OR ``bits`` into the byte; return its previous value."""
        self._check(off, 1)
        return int(lib.ax_fetch_or_u8(self._cdata, off, bits))

    def fetch_and_u8(self, off: int, mask: int) -> int:
        """Atomically AND the byte with ``mask``; return its previous value."""
        self._check(off, 1)
        return int(lib.ax_fetch_and_u8(self._cdata, off, mask))

    def exchange_u32(self, off: int, value: int) -> int:
        self._check(off, 4)
        return int(lib.ax_exchange_u32(self._cdata, off, value & 0xFFFFFFFF))

    def release(self) -> None:
        """Drop the pin (idempotent).  The object must not be used afterwards."""
        if self._cdata is not None:
            ffi.release(self._cdata)
            self._cdata = None
            self._size = 0


def fence() -> None:
    """A full (sequentially consistent) memory barrier."""
    lib.ax_fence()


def address_of(buf: Buffer) -> int:
    """The address of the first byte of ``buf`` (the pin is dropped before returning)."""
    p = ffi.from_buffer("char[]", buf)
    try:
        return int(lib.ax_address(p))
    finally:
        ffi.release(p)


def mmap_fixed(addr: int, length: int, prot: int, fd: int, offset: int) -> None:
    """``mmap(addr, length, prot, MAP_SHARED|MAP_FIXED, fd, offset)``; raises ``OSError``."""
    err = lib.ax_mmap_fixed(addr, length, prot, fd, offset)
    if err:
        raise OSError(err, f"mmap(MAP_FIXED) failed: {os.strerror(err)}")


def mprotect(addr: int, length: int, prot: int) -> None:
    err = lib.ax_mprotect(addr, length, prot)
    if err:
        raise OSError(err, f"mprotect failed: {os.strerror(err)}")


def ioctl(fd: int, request: int, arg: bytearray | None) -> int:
    """``ioctl(fd, request, arg)`` with an in/out struct buffer; raises ``OSError``.

    ``arg`` is updated in place with whatever the kernel wrote back.
    """
    if arg is None:
        ret = int(lib.ax_ioctl(fd, request, ffi.NULL))
    else:
        p = ffi.from_buffer("char[]", arg, require_writable=True)
        try:
            ret = int(lib.ax_ioctl(fd, request, p))
        finally:
            ffi.release(p)
    if ret < 0:
        code = -ret
        raise OSError(code, f"ioctl 0x{request:08x}: {os.strerror(code)}")
    return ret


__all__ = [
    "Buffer",
    "SharedBuffer",
    "address_of",
    "fence",
    "ffi",
    "ioctl",
    "lib",
    "mmap_fixed",
    "mprotect",
]
