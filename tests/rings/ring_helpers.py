"""Shared pieces of the async ring tests: netif TX request/response rings between a
front end (domain 1) and a back end (domain 0), indices started near 2**32."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aioxen.net import netif as N
from aioxen.platforms.base import EventChannel
from aioxen.rings.aio import AsyncBackRing, AsyncFrontRing
from aioxen.rings.sring import BackRing, FrontRing

FE, BE = 1, 0
NEAR_WRAP = 2**32 - 100
TxFront = AsyncFrontRing[N.NetifTxRequest, N.NetifTxResponse]
TxBack = AsyncBackRing[N.NetifTxRequest, N.NetifTxResponse]


def treq(size: int) -> N.NetifTxRequest:
    return N.NetifTxRequest(gref=size * 3, offset=0, flags=0, id=0, size=size)


def echo(req: N.NetifTxRequest) -> N.NetifTxResponse:
    return N.NetifTxResponse(req.id, req.size)


async def until(cond: Callable[[], bool], what: str, spins: int = 10_000) -> None:
    """Let the loop run until ``cond()`` holds (a hang guard, not a timing assumption)."""
    for i in range(spins):
        if cond():
            return
        await asyncio.sleep(0 if i < 1000 else 0.001)
    raise AssertionError(f"never happened: {what}")


async def ring_pair(
    harness: Any, *, start: int = NEAR_WRAP, check_ids: bool = True, order: int = 0
) -> tuple[TxFront, TxBack]:
    """A front ring created and a back ring attached the way devices do it."""
    fp = await harness.platform(FE)
    bp = await harness.platform(BE)
    front = await AsyncFrontRing.create(
        fp, BE, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE, start=start, order=order
    )
    back = await AsyncBackRing.attach(
        bp, FE, front.refs, front.port, N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE,
        check_ids=check_ids,
    )  # fmt: skip
    return front, back


class CountingChannel:
    """A real event channel that counts the notifications sent through it."""

    def __init__(self, ch: EventChannel) -> None:
        self.ch = ch
        self.notifies = 0

    def notify(self) -> None:
        self.notifies += 1
        self.ch.notify()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ch, name)


@dataclass
class CountedPair:
    """A ring pair built by hand over a one-page share, each end's event channel counted."""

    front: TxFront
    back: TxBack
    fcount: CountingChannel
    bcount: CountingChannel
    resources: tuple[Any, ...]

    def close_resources(self) -> None:
        """Close the mapping, the share and both channel ends (after the rings)."""
        for r in self.resources:
            r.close()


async def counted_pair(harness: Any) -> CountedPair:
    fp = await harness.platform(FE)
    bp = await harness.platform(BE)
    share = fp.grants.share(BE, 1)
    fch = await fp.events.listen(BE)
    mapping = bp.grants.map(FE, share.refs)
    bch = await bp.events.connect(FE, fch.port)
    fcount, bcount = CountingChannel(fch), CountingChannel(bch)
    req, rsp = N.NETIF_TX_REQUEST, N.NETIF_TX_RESPONSE
    front: TxFront = AsyncFrontRing(FrontRing(share.buf, req, rsp, start=NEAR_WRAP), fcount)
    back: TxBack = AsyncBackRing(BackRing(mapping.buf, req, rsp), bcount)
    return CountedPair(front, back, fcount, bcount, (mapping, share, fch, bch))
