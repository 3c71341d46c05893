"""Console and XenStore byte-ring pages (pure)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioxen import ProtocolError
from aioxen.rings.byte import CONSOLE, XENSTORE, ByteRing, ByteRingLayout

U32 = 0xFFFFFFFF


def pair(layout: ByteRingLayout, start: int = 2**32 - 10) -> tuple[bytearray, ByteRing, ByteRing]:
    page = bytearray(4096)
    front = ByteRing(page, layout, side="front", init=True, start=start)
    back = ByteRing(page, layout, side="back")
    return page, front, back


@pytest.mark.parametrize("layout", [CONSOLE, XENSTORE])
def test_both_directions_land_in_the_right_arrays(layout: ByteRingLayout) -> None:
    page, front, back = pair(layout, start=0)
    assert front.write(b"from guest") == 10
    assert back.write(b"to guest") == 8
    out, in_ = layout.out, layout.in_
    assert page[out.data : out.data + 10] == b"from guest"
    assert page[in_.data : in_.data + 8] == b"to guest"
    assert struct.unpack_from("<I", page, out.prod)[0] == 10
    assert back.read() == b"from guest"
    assert struct.unpack_from("<I", page, out.cons)[0] == 10
    assert front.read(3) == b"to "
    assert front.read() == b"guest"
    assert front.read() == b""


@pytest.mark.parametrize("layout", [CONSOLE, XENSTORE])
def test_partial_write_when_full_and_wrap(layout: ByteRingLayout) -> None:
    _, front, back = pair(layout)
    size = layout.out.size
    data = bytes(range(256)) * (size // 256 + 2)
    assert front.writable() == size
    assert front.write(data) == size
    assert front.write(b"x") == 0
    assert back.readable() == size
    assert back.read(100) == data[:100]
    assert front.write(data[size:]) == 100
    assert back.read() == data[100 : size + 100]


@pytest.mark.parametrize(("side", "field"), [("back", "out_prod"), ("front", "in_prod")])
def test_corrupt_producer_is_a_protocol_error(side: str, field: str) -> None:
    page, front, back = pair(CONSOLE, start=0)
    d = CONSOLE.out if side == "back" else CONSOLE.in_
    struct.pack_into("<I", page, d.prod, d.size + 1)
    reader = back if side == "back" else front
    with pytest.raises(ProtocolError) as e:
        reader.read()
    assert e.value.field == field
    with pytest.raises(ProtocolError):
        reader.readable()


def test_corrupt_consumer_is_a_protocol_error_for_the_writer() -> None:
    page, front, _ = pair(XENSTORE, start=5)
    struct.pack_into("<I", page, XENSTORE.out.cons, 5 + 4000)  # consumer ahead of producer
    with pytest.raises(ProtocolError) as e:
        front.write(b"abc")
    assert e.value.field == "req_cons"


@settings(max_examples=150, deadline=None)
@given(
    start=st.integers(0, U32),
    chunks=st.lists(st.binary(min_size=0, max_size=900), max_size=30),
    reads=st.lists(st.integers(1, 3000), min_size=1, max_size=30),
)
def test_stream_preserved(start: int, chunks: list[bytes], reads: list[int]) -> None:
    _, front, back = pair(CONSOLE, start=start)
    sent = bytearray()
    got = bytearray()
    pending = bytearray(b"".join(chunks))
    i = 0
    while pending or back.readable():
        n = front.write(bytes(pending[:900]))
        sent += pending[:n]
        del pending[:n]
        got += back.read(reads[i % len(reads)])
        i += 1
    assert got == sent == b"".join(chunks)


def test_page_too_small_and_bad_side() -> None:
    with pytest.raises(ValueError):
        ByteRing(bytearray(2000), CONSOLE, side="front")
    with pytest.raises(ValueError):
        ByteRing(bytearray(4096), CONSOLE, side="middle")  # type: ignore[arg-type]
