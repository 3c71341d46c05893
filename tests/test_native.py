"""The native helper: atomics and byte-ring copies on ordinary buffers."""

from __future__ import annotations

import mmap

import pytest

from aioxen import native


def test_loads_and_stores_roundtrip() -> None:
    buf = bytearray(64)
    sb = native.SharedBuffer(buf)
    sb.store_u32(0, 0xDEADBEEF)
    sb.store_u16(4, 0xBEEF)
    sb.store_u8(6, 0x7F)
    assert buf[:7] == bytes.fromhex("efbeaddeefbe7f")
    assert sb.load_u32(0) == 0xDEADBEEF
    assert sb.load_u16(4) == 0xBEEF
    assert sb.load_u8(6) == 0x7F


def test_fetch_or_and_return_previous_value() -> None:
    buf = bytearray(8)
    sb = native.SharedBuffer(buf)
    assert sb.fetch_or_u8(3, 0x2) == 0
    assert sb.fetch_or_u8(3, 0x1) == 0x2
    assert sb.fetch_and_u8(3, 0xFF & ~0x2) == 0x3
    assert buf[3] == 0x1


def test_out_of_range_offset_raises() -> None:
    sb = native.SharedBuffer(bytearray(8))
    with pytest.raises(IndexError):
        sb.load_u32(6)
    with pytest.raises(IndexError):
        sb.store_u8(-1, 0)


def test_pin_blocks_mmap_close_until_released() -> None:
    mm = mmap.mmap(-1, 4096)
    sb = native.SharedBuffer(mm)
    with pytest.raises(BufferError):
        mm.close()
    sb.release()
    sb.release()  # idempotent
    mm.close()


@pytest.mark.parametrize("start", [0, 2**32 - 5, 2**32 - 1])
def test_byte_ring_wraps_buffer_and_index(start: int) -> None:
    size = 16
    idx = bytearray(8)  # cons @0, prod @4
    ring = bytearray(size)
    sidx, sring = native.SharedBuffer(idx), native.SharedBuffer(ring)
    sidx.store_u32(0, start)
    sidx.store_u32(4, start)
    lib, ffi = native.lib, native.ffi
    payload = bytes(range(100))
    out = bytearray()
    sent = 0
    while len(out) < len(payload):
        chunk = payload[sent : sent + 7]
        n = lib.ax_bring_write(sidx.pointer, 0, 4, sring.pointer, size, chunk, len(chunk))
        assert n >= 0
        sent += n
        dst = bytearray(5)
        got = lib.ax_bring_read(sidx.pointer, 0, 4, sring.pointer, size, ffi.from_buffer(dst), 5)
        out += dst[:got]
    assert bytes(out) == payload
    assert sidx.load_u32(4) == (start + len(payload)) % 2**32


def test_byte_ring_rejects_corrupt_indices() -> None:
    idx, ring = bytearray(8), bytearray(16)
    sidx, sring = native.SharedBuffer(idx), native.SharedBuffer(ring)
    sidx.store_u32(0, 100)  # cons
    sidx.store_u32(4, 117)  # prod: 17 bytes in a 16-byte ring
    lib = native.lib
    assert lib.ax_bring_used(sidx.pointer, 0, 4, 16) == -1
    assert lib.ax_bring_write(sidx.pointer, 0, 4, sring.pointer, 16, b"x", 1) == -1
    dst = native.ffi.from_buffer(bytearray(4))
    assert lib.ax_bring_read(sidx.pointer, 0, 4, sring.pointer, 16, dst, 4) == -1
