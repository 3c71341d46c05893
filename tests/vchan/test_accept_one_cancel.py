"""``accept_one`` cancelled: deterministic for whoever awaits it.

A cancelled ``accept_one`` has withdrawn its XenStore advertisement and released its
endpoint (pages, port) by the time the awaited task has ended -- also when it is
cancelled a second time while withdrawing -- so the platform can be closed right after
(no ``BufferError`` from a share still exported, nothing left in XenStore: checked with
a fresh client of the xenstored the tests run).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from vchan_harness import World

from aioxen.vchan import advertise
from aioxen.vchan.endpoint import vchan_path
from aioxen.vchan.server import accept_one

SERVER, CLIENT = 1, 2
pytestmark = pytest.mark.timeout(60)


async def start(plat: Any, port: str) -> asyncio.Task[Any]:
    """An accept_one task, returned once its endpoint is advertised."""
    advertised = asyncio.Event()
    task = asyncio.ensure_future(accept_one(plat, CLIENT, port, on_advertised=advertised.set))
    async with asyncio.timeout(30):
        await advertised.wait()
    assert not task.done()
    return task


async def close_at_once_and_check(world: World, plat: Any, port: str) -> None:
    assert plat.leaks() == []
    await plat.close()  # no loop iteration since the task ended: nothing may be in use
    with pytest.raises(FileNotFoundError):
        await world.read_store(vchan_path(SERVER, CLIENT, port))  # type: ignore[attr-defined]


async def test_cancelled_while_waiting(world: World) -> None:
    srv = await world.platform(SERVER)
    task = await start(srv, "cancel1")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await close_at_once_and_check(world, srv, "cancel1")


async def test_cancelled_again_while_withdrawing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second cancellation arrives while the withdrawal is under way: it is finished
    first, then the cancellation propagates."""
    srv = await world.platform(SERVER)
    real = advertise.withdraw
    entered, gate = asyncio.Event(), asyncio.Event()
    withdrawn = False

    async def gated(*args: Any, **kwargs: Any) -> None:
        nonlocal withdrawn
        entered.set()
        await gate.wait()
        await real(*args, **kwargs)
        withdrawn = True

    monkeypatch.setattr(advertise, "withdraw", gated)
    task = await start(srv, "cancel2")
    task.cancel()
    async with asyncio.timeout(30):
        await entered.wait()
    task.cancel()
    await asyncio.sleep(0)  # the second cancellation reaches the task
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert withdrawn  # before the task ended, not in the background after it
    await close_at_once_and_check(world, srv, "cancel2")


async def test_cancelled_while_advertising(world: World) -> None:
    """Cancelled before the advertisement is complete (after the task's first step):
    whatever part of the endpoint and of the claim exists is undone."""
    srv = await world.platform(SERVER)
    task = asyncio.ensure_future(accept_one(srv, CLIENT, "cancel3"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await close_at_once_and_check(world, srv, "cancel3")
