"""Hand-driven vif ends for hostile-input tests: a raw frontend facing a real :class:`Vif`,
and a raw backend facing a real :class:`NetfrontQueue`.  No XenStore: rings, pools and the
event channel are set up directly, indices start near 2**32."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any

from aioxen.net import netif
from aioxen.net.front_queue import NetfrontQueue
from aioxen.net.keys import BackendFeatures, FrontendFeatures
from aioxen.net.netif import RX_REQ_FMT, RX_RSP_FMT, TX_REQ_FMT, TX_RSP_FMT, FrameInfo
from aioxen.net.vif import Vif, attach_vif
from aioxen.platforms.base import Platform
from aioxen.rings.sring import BackRing, FrontRing

START = 2**32 - 7
POOL = 8
UNKNOWN_REF = 0x7FFF_FF00


def page_pattern(index: int) -> bytes:
    """Deterministic, distinct content of pool page ``index``."""
    return bytes((index * 37 + k * 7 + (k >> 8)) & 0xFF for k in range(4096))


@dataclass
class RawFront:
    """Frontend side driven by hand; the backend is a real :class:`Vif`."""

    fe: Platform
    be: Platform
    vif: Vif
    tx: FrontRing[bytes, bytes]
    rx: FrontRing[bytes, bytes]
    channel: Any
    pool_refs: list[int]
    pages: dict[int, bytes]
    foreign_ref: int
    readonly_ref: int
    rx_refs: list[int]
    owned: list[Any]
    delivered: list[tuple[bytes, FrameInfo]] = field(default_factory=list)
    _rx_pool_buf: memoryview | None = None

    @classmethod
    async def create(
        cls,
        fe: Platform,
        be: Platform,
        *,
        features: FrontendFeatures | None = None,
        backend_features: BackendFeatures | None = None,
        stranger: Platform | None = None,
    ) -> RawFront:
        owned: list[Any] = []
        tx_share = fe.grants.share(be.domid, 1)
        rx_share = fe.grants.share(be.domid, 1)
        pool = fe.grants.share(be.domid, POOL, writable=False)
        rx_pool = fe.grants.share(be.domid, POOL, writable=True)
        foreign = fe.grants.share((stranger.domid if stranger else be.domid + 5), 1)
        owned += [tx_share, rx_share, pool, rx_pool, foreign]
        for i in range(POOL):
            pool.buf[i * 4096 : (i + 1) * 4096] = page_pattern(i)
        tx = FrontRing(tx_share.buf, TX_REQ_FMT, TX_RSP_FMT, start=START, name="hostile/tx")
        rx = FrontRing(rx_share.buf, RX_REQ_FMT, RX_RSP_FMT, start=START, name="hostile/rx")
        channel = await fe.events.listen(be.domid)
        owned.append(channel)
        delivered: list[tuple[bytes, FrameInfo]] = []
        vif = await attach_vif(
            be,
            fe.domid,
            0,
            tx_ring_ref=tx_share.refs[0],
            rx_ring_ref=rx_share.refs[0],
            event_channel=channel.port,
            features=features or FrontendFeatures(sg=True, persistent=True),
            backend_features=backend_features
            or BackendFeatures(sg=True, gso_tcpv4=True, gso_tcpv6=False),
            deliver=lambda frame, info: delivered.append((frame, info)),
        )
        vif.start()
        pages = {ref: page_pattern(i) for i, ref in enumerate(pool.refs)}
        self = cls(
            fe,
            be,
            vif,
            tx,
            rx,
            channel,
            list(pool.refs),
            pages,
            foreign.refs[0],
            rx_pool.refs[0],
            list(rx_pool.refs),
            owned,
            delivered,
        )
        self._rx_pool_buf = rx_pool.buf
        return self

    async def send_slots(
        self, slots: list[bytes], expect: int, timeout: float = 10
    ) -> list[tuple[int, int]]:
        """Put ``slots`` (12 bytes each), push, notify; collect ``expect`` TX responses."""
        if slots:
            self.tx.put_encoded(b"".join(slots))
            if self.tx.push_requests():
                self.channel.notify()
        out: list[tuple[int, int]] = []
        async with asyncio.timeout(timeout):
            while len(out) < expect:
                data, _n, _ = self.tx.take_encoded()
                out += [(i, s) for i, s in struct.iter_unpack("<Hh8x", data)]
                if len(out) >= expect:
                    break
                if not self.tx.final_check_for_responses():
                    await self.channel.wait()
        # nothing more than expected may come
        await asyncio.sleep(0)
        assert self.tx.unconsumed_responses() == 0, "backend answered more slots than sent"
        return out

    def post_rx(self, refs: list[int]) -> list[int]:
        """Post one RX request per ref (ids 0..); returns the ids."""
        parts = [netif.RX_REQ.pack(i, r) for i, r in enumerate(refs)]
        self.rx.put_encoded(b"".join(parts))
        if self.rx.push_requests():
            self.channel.notify()
        return list(range(len(refs)))

    async def rx_responses(self, expect: int, timeout: float = 10) -> bytes:
        got = b""
        async with asyncio.timeout(timeout):
            while len(got) < expect * 8:
                data, _, _ = self.rx.take_encoded()
                got += data
                if len(got) >= expect * 8:
                    break
                if not self.rx.final_check_for_responses():
                    await self.channel.wait()
        return got

    def rx_page(self, index: int) -> bytes:
        assert self._rx_pool_buf is not None
        return bytes(self._rx_pool_buf[index * 4096 : (index + 1) * 4096])

    def close(self) -> None:
        self.vif.close()
        self.tx.close()
        self.rx.close()
        self._rx_pool_buf = None
        for obj in self.owned:
            obj.close()


@dataclass
class RawBack:
    """Backend side driven by hand; the frontend is a real :class:`NetfrontQueue`."""

    fe: Platform
    be: Platform
    queue: NetfrontQueue
    tx: BackRing[bytes, bytes]
    rx: BackRing[bytes, bytes]
    channel: Any
    maps: list[Any]
    received: list[tuple[bytes, FrameInfo]]
    failures: list[BaseException]

    @classmethod
    async def create(cls, fe: Platform, be: Platform) -> RawBack:
        received: list[tuple[bytes, FrameInfo]] = []
        failures: list[BaseException] = []
        queue = NetfrontQueue(
            fe,
            be.domid,
            deliver=lambda f, i: received.append((f, i)),
            tx_space=lambda: None,
            fail=failures.append,
            start_index=START,
        )
        await queue.setup()
        tx_map = be.grants.map(fe.domid, [queue.tx_ring_ref])
        rx_map = be.grants.map(fe.domid, [queue.rx_ring_ref])
        tx = BackRing(tx_map.buf, TX_REQ_FMT, TX_RSP_FMT, name="hostile-back/tx")
        rx = BackRing(rx_map.buf, RX_REQ_FMT, RX_RSP_FMT, name="hostile-back/rx")
        channel = await be.events.connect(fe.domid, queue.event_channel)
        queue.start()
        return cls(fe, be, queue, tx, rx, channel, [tx_map, rx_map, channel], received, failures)

    def close(self) -> None:
        self.queue.close()
        self.tx.close()
        self.rx.close()
        for m in self.maps:
            m.close()
