"""One event → service → flush cycle (aioxen.rings.service.RingService) for every ring end:
the generic adapters and both ends of a vif inherit it instead of carrying copies."""

from __future__ import annotations

from aioxen.net.front_queue import NetfrontQueue
from aioxen.net.vif import Vif
from aioxen.rings.aio import AsyncBackRing, AsyncFrontRing
from aioxen.rings.service import RingService

CYCLE = ("_schedule_flush", "_scheduled_flush", "_run_flush")


def test_every_ring_end_runs_the_one_cycle() -> None:
    for cls in (AsyncFrontRing, AsyncBackRing, NetfrontQueue, Vif):
        assert issubclass(cls, RingService), cls
        for name in CYCLE:
            owner = next(c for c in cls.__mro__ if name in vars(c))
            assert owner is RingService, (cls, name, owner)
    for cls in (AsyncFrontRing, NetfrontQueue, Vif):  # the back adapter's event only wakes
        owner = next(c for c in cls.__mro__ if "_on_event" in vars(c))
        assert owner is RingService, (cls, owner)
    # the generic front publishes requests with its iteration's flush, not on events
    assert AsyncFrontRing.flush_on_event is False
    assert NetfrontQueue.flush_on_event and Vif.flush_on_event
