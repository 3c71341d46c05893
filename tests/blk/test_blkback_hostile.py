"""A hostile frontend against a real blkback RingServer: every malformed request is answered
with BLKIF_RSP_ERROR / BLKIF_RSP_EOPNOTSUPP and a log line, and the backend keeps serving.
Ring indices start near 2**32."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioxen.blk import blkif as B
from aioxen.blk.back import BackendConfig, RingServer, limits_for
from aioxen.blk.source import MemorySource
from aioxen.platforms.base import Share
from aioxen.rings.aio import AsyncBackRing, AsyncFrontRing

ABI = B.ABI_X86_64
DISK = 1 << 20
SECTORS = DISK // 512
UNKNOWN_REF = 0x7FFF_FF00


@dataclass
class Rig:
    ring: AsyncFrontRing[bytes, B.BlkifResponse]
    data: Share
    ind: Share
    source: MemorySource
    server: RingServer
    enc: B.RequestEncoder

    async def send(self, req: B.BlkifAnyRequest | bytes) -> int:
        raw = req if isinstance(req, bytes) else self.enc.encode(req)
        rsp = await self.ring.request(raw, timeout=10)
        return rsp.status

    def seg(self, page: int, first: int = 0, last: int = 7) -> B.BlkifSegment:
        return B.BlkifSegment(self.data.refs[page], first, last)


@contextlib.asynccontextmanager
async def rig(
    harness: Any, source: MemorySource, config: BackendConfig, abi: str = ABI
) -> AsyncIterator[Rig]:
    back = await harness.platform(0)
    front = await harness.platform(9)
    ring: AsyncFrontRing[bytes, B.BlkifResponse] = await AsyncFrontRing.create(
        front, 0, B.encoded_request_format(abi), B.response_format(abi), start=2**32 - 5
    )
    bring: AsyncBackRing[Any, Any] = await AsyncBackRing.attach(
        back, 9, ring.refs, ring.port, B.request_format(abi), B.response_format(abi)
    )
    data = front.grants.share(0, 16)
    ind = front.grants.share(0, 2)
    server = RingServer(
        back, 9, bring, source, limits_for(source, config), persistent=config.persistent
    )
    task = asyncio.ensure_future(server.run())
    try:
        yield Rig(ring, data, ind, source, server, B.RequestEncoder(abi, 7))
    finally:
        bring.close()
        await task
        ring.close()
        data.close()
        ind.close()


@pytest.fixture(params=[True, False], ids=["persistent", "mapped"])
def persistent(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


R, W = B.BLKIF_OP_READ, B.BLKIF_OP_WRITE
ERR, NOTSUP, OK = B.BLKIF_RSP_ERROR, B.BLKIF_RSP_EOPNOTSUPP, B.BLKIF_RSP_OKAY


async def test_bad_requests_are_refused_and_serving_continues(
    harness: Any, persistent: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aioxen.blk.back")
    source = MemorySource(DISK)
    config = BackendConfig(persistent=persistent, max_indirect_segments=16, discard=False)
    async with rig(harness, source, config) as r:
        seg = r.seg
        cases: list[tuple[str, B.BlkifAnyRequest, int, str]] = [
            ("past the end", B.BlkifRequest(R, 1, 7, 0, SECTORS - 4, (seg(0),)), ERR,
             "past the end"),
            ("start past the end", B.BlkifRequest(W, 1, 7, 0, 2**63, (seg(0),)), ERR,
             "past the end"),
            ("first > last", B.BlkifRequest(R, 1, 7, 0, 0, (seg(0, 5, 2),)), ERR, "reversed"),
            ("outside the page", B.BlkifRequest(R, 1, 7, 0, 0, (seg(0, 0, 8),)), ERR,
             "outside"),
            ("too many segments", B.BlkifRequest(R, 12, 7, 0, 0, (seg(0),) * 11), ERR,
             "at most 11"),
            ("no segments", B.BlkifRequest(W, 0, 7, 0, 0, ()), ERR, "no segments"),
            ("unknown op", B.BlkifRequest(9, 1, 7, 0, 0, (seg(0),)), NOTSUP, "unknown"),
            ("reserved op", B.BlkifRequest(4, 0, 7, 0, 0, ()), NOTSUP, "unknown"),
            ("bad gref", B.BlkifRequest(R, 1, 7, 0, 0, (B.BlkifSegment(UNKNOWN_REF, 0, 7),)),
             ERR, "do not map"),
            ("discard not offered", B.BlkifRequestDiscard(5, 0, 7, 0, 0, 8), NOTSUP,
             "discard not offered"),
            ("indirect too many",
             B.BlkifRequestIndirect(6, R, 17, 0, 0, 7, (r.ind.refs[0],)), ERR, "allowed 1..16"),
            ("indirect flush", B.BlkifRequestIndirect(6, 3, 1, 0, 0, 7, (r.ind.refs[0],)), ERR,
             "only read and write"),
            ("indirect bad page",
             B.BlkifRequestIndirect(6, R, 2, 0, 0, 7, (UNKNOWN_REF,)), ERR, "do not map"),
        ]  # fmt: skip
        for name, req, want, reason in cases:
            caplog.clear()
            assert await r.send(req) == want, name
            assert any(reason in rec.getMessage() for rec in caplog.records), (name, caplog.text)
        # indirect segments that are themselves bad
        B.pack_indirect_segments(r.ind.buf, [seg(0), seg(1, 3, 1)])
        assert await r.send(B.BlkifRequestIndirect(6, R, 2, 0, 0, 7, (r.ind.refs[0],))) == ERR
        B.pack_indirect_segments(r.ind.buf, [seg(0), B.BlkifSegment(UNKNOWN_REF, 0, 7)])
        assert await r.send(B.BlkifRequestIndirect(6, W, 2, 0, 0, 7, (r.ind.refs[0],))) == ERR
        # the backend still serves good requests, direct and indirect
        r.data.buf[:4096] = b"x" * 4096
        assert await r.send(B.BlkifRequest(W, 1, 7, 0, 8, (seg(0),))) == OK
        assert source.data[4096:8192] == b"x" * 4096
        B.pack_indirect_segments(r.ind.buf, [seg(i) for i in range(2, 15)])
        assert await r.send(B.BlkifRequestIndirect(6, R, 13, 0, 8, 7, (r.ind.refs[0],))) == OK
        assert bytes(r.data.buf[2 * 4096 : 3 * 4096]) == b"x" * 4096
        assert r.server.stats.errors >= len(cases) + 2


async def test_read_only_and_alignment(harness: Any) -> None:
    source = MemorySource(DISK, sector_size=4096, readonly=True)
    async with rig(harness, source, BackendConfig(persistent=False)) as r:
        seg = r.seg
        assert await r.send(B.BlkifRequest(W, 1, 7, 0, 0, (seg(0),))) == ERR
        assert (
            await r.send(B.BlkifRequest(B.BLKIF_OP_FLUSH_DISKCACHE, 1, 7, 0, 0, (seg(0),))) == ERR
        )
        assert await r.send(B.BlkifRequest(R, 1, 7, 0, 1, (seg(0),))) == ERR  # sector 1 of 4K
        assert await r.send(B.BlkifRequest(R, 1, 7, 0, 0, (seg(0, 0, 3),))) == ERR  # half a sector
        assert await r.send(B.BlkifRequest(R, 1, 7, 0, 8, (seg(0),))) == OK
        assert await r.send(B.BlkifRequest(B.BLKIF_OP_FLUSH_DISKCACHE, 0, 7, 0, 0, ())) == OK


async def test_barrier_orders_and_flushes(harness: Any) -> None:
    source = MemorySource(DISK)
    async with rig(harness, source, BackendConfig()) as r:
        seg = r.seg
        r.data.buf[:4096] = b"a" * 4096
        r.data.buf[4096:8192] = b"b" * 4096
        futs = [
            await r.ring.submit(r.enc.encode(B.BlkifRequest(W, 1, 7, 0, 0, (seg(0),)))),
            await r.ring.submit(
                r.enc.encode(B.BlkifRequest(B.BLKIF_OP_WRITE_BARRIER, 1, 7, 0, 0, (seg(1),)))
            ),
            await r.ring.submit(r.enc.encode(B.BlkifRequest(R, 1, 7, 0, 0, (seg(2),)))),
        ]
        statuses = [(await f).status for f in futs]
        assert statuses == [OK, OK, OK]
        assert source.flushes == 1
        assert bytes(r.data.buf[2 * 4096 : 3 * 4096]) == b"b" * 4096  # read after the barrier


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(slots=st.lists(st.binary(min_size=112, max_size=112), min_size=1, max_size=20))
async def test_random_slots_never_break_the_backend(harness: Any, slots: list[bytes]) -> None:
    source = MemorySource(DISK)
    async with rig(harness, source, BackendConfig(max_indirect_segments=64)) as r:
        futs = [await r.ring.submit(s) for s in slots]
        for f in futs:
            assert (await asyncio.wait_for(f, 10)).status in (OK, ERR, NOTSUP)
        # still alive and correct
        r.data.buf[:4096] = b"z" * 4096
        assert await r.send(B.BlkifRequest(W, 1, 7, 0, 16, (r.seg(0),))) == OK
        assert await r.send(B.BlkifRequest(R, 1, 7, 0, 16, (r.seg(3),))) == OK
        assert bytes(r.data.buf[3 * 4096 : 4 * 4096]) == b"z" * 4096


@pytest.mark.parametrize("abi", [B.ABI_X86_32, B.ABI_X86_64])
async def test_both_abis_end_to_end(harness: Any, abi: str) -> None:
    """A frontend speaking the 32-bit layout (108-byte requests, 12-byte responses) is
    served like a 64-bit one: direct, indirect and discard requests."""
    source = MemorySource(DISK)
    async with rig(harness, source, BackendConfig(max_indirect_segments=16), abi) as r:
        r.data.buf[: 13 * 4096] = bytes(range(256)) * 16 * 13
        B.pack_indirect_segments(r.ind.buf, [r.seg(i) for i in range(13)])
        assert await r.send(B.BlkifRequestIndirect(6, W, 13, 0, 64, 7, (r.ind.refs[0],))) == OK
        assert source.data[64 * 512 : 64 * 512 + 13 * 4096] == bytes(range(256)) * 16 * 13
        assert await r.send(B.BlkifRequest(R, 2, 7, 0, 64, (r.seg(14), r.seg(15, 0, 3)))) == OK
        assert (
            bytes(r.data.buf[14 * 4096 : 15 * 4096 + 2048])
            == source.data[64 * 512 : 64 * 512 + 4096 + 2048]
        )
        assert await r.send(B.BlkifRequestDiscard(5, 0, 7, 0, 64, 8)) == OK
        assert source.data[64 * 512 : 68 * 512 + 2048] == bytes(4096)
