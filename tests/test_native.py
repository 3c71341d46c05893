"""The native helper: atomics and byte-ring copies on ordinary buffers."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@given(
    start=st.integers(0, 2**32 - 1),
    steps=st.lists(
        st.tuples(st.integers(0, 3000), st.integers(0, 63), st.integers(1, 3000)),
        min_size=1,
        max_size=12,
    ),
)
@settings(max_examples=200, deadline=None)
def test_byte_ring_copies_exact_at_any_alignment_and_wrap(
    start: int, steps: list[tuple[int, int, int]]
) -> None:
    """The ring copies move bytes in 64-byte vector blocks plus a tail: every length,
    every source/destination alignment and every wrap point gives exactly the bytes
    written, and nothing outside the ring or the destination window is touched."""
    size = 4096
    idx = bytearray(8)
    guard = 64
    ring_area = bytearray(b"\xee" * (size + 2 * guard))
    sidx = native.SharedBuffer(idx)
    sring = native.SharedBuffer(ring_area)
    ring = native.ffi.cast("char *", sring.pointer) + guard
    sidx.store_u32(0, start)
    sidx.store_u32(4, start)
    lib, ffi = native.lib, native.ffi
    source = bytes((i * 7 + 3) & 0xFF for i in range(3000 + 64))
    expected = bytearray()
    out = bytearray()
    for write_len, align, read_len in steps:
        chunk = memoryview(source)[align : align + write_len]
        n = lib.ax_bring_write(sidx.pointer, 0, 4, ring, size, ffi.from_buffer(chunk), len(chunk))
        assert 0 <= n <= len(chunk)
        expected += chunk[:n]
        window = bytearray(b"\xdd" * (read_len + 2 * guard + align))
        dst = ffi.from_buffer(window)
        got = lib.ax_bring_read(sidx.pointer, 0, 4, ring, size, dst + guard + align, read_len)
        assert 0 <= got <= read_len
        assert window[: guard + align] == b"\xdd" * (guard + align)
        assert window[guard + align + got :] == b"\xdd" * (len(window) - guard - align - got)
        out += window[guard + align : guard + align + got]
        assert ring_area[:guard] == b"\xee" * guard
        assert ring_area[guard + size :] == b"\xee" * guard
    while True:  # drain
        window = bytearray(size)
        got = lib.ax_bring_read(sidx.pointer, 0, 4, ring, size, ffi.from_buffer(window), size)
        if not got:
            break
        out += window[:got]
    assert bytes(out) == bytes(expected)
    assert sidx.load_u32(0) == sidx.load_u32(4) == (start + len(expected)) % 2**32
