"""The ``unix`` platform between real processes (``peer.py`` plays the other domain)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from peer_process import PeerError, PeerProcess

from aioxen import PAGE_SIZE
from aioxen.platforms.unix import UnixPlatform, root_leaks

pytestmark = pytest.mark.crossprocess

Spawn = Callable[..., Awaitable[PeerProcess]]
ME, PEER = 1, 2


@pytest.fixture
async def me(tmp_path: Path) -> AsyncIterator[UnixPlatform]:
    plat = UnixPlatform(domid=ME, root=tmp_path / "xenroot")
    async with plat:
        yield plat
    assert plat.leaks() == []


async def test_peer_maps_non_contiguous_subset_in_reverse_order(
    me: UnixPlatform, spawn: Spawn
) -> None:
    peer = await spawn(PEER)
    share = me.grants.share(PEER, 6)
    for i in range(6):
        share.buf[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = bytes([0x10 + i]) * PAGE_SIZE
    subset = [share.refs[5], share.refs[3], share.refs[0]]
    await peer.cmd(f"map {ME} {','.join(map(str, subset))} rw")
    for i, page in enumerate((5, 3, 0)):
        (hexdata,) = await peer.cmd(f"read {i * PAGE_SIZE} 8")
        assert bytes.fromhex(hexdata) == bytes([0x10 + page]) * 8
    # the peer's writes land in our pages, ours in its mapping
    await peer.cmd(f"write {PAGE_SIZE + 100} c0ffee")  # mapping page 1 = our page 3
    assert bytes(share.buf[3 * PAGE_SIZE + 100 : 3 * PAGE_SIZE + 103]) == b"\xc0\xff\xee"
    share.buf[5 * PAGE_SIZE + 9] = 0x42  # our page 5 = its page 0
    assert await peer.cmd("read 9 1") == ["42"]
    await peer.cmd("unmap")
    share.close()
    assert await peer.exit() == 0


async def test_we_map_peer_pages_in_reverse_order(me: UnixPlatform, spawn: Spawn) -> None:
    peer = await spawn(PEER)
    (refs_text,) = await peer.cmd(f"share {ME} 5 rw")  # page i holds byte i+1
    refs = [int(r) for r in refs_text.split(",")]
    m = me.grants.map(PEER, [refs[4], refs[2], refs[1]])
    assert [m.buf[i * PAGE_SIZE] for i in range(3)] == [5, 3, 2]
    m.buf[2 * PAGE_SIZE + 1] = 0x99
    assert await peer.cmd(f"sread {PAGE_SIZE + 1} 1") == ["99"]
    m.close()
    await peer.cmd("unshare")
    assert await peer.exit() == 0


async def test_readonly_grant_across_processes(me: UnixPlatform, spawn: Spawn) -> None:
    peer = await spawn(PEER)
    share = me.grants.share(PEER, 2, writable=False)
    refs = ",".join(map(str, share.refs))
    with pytest.raises(PeerError) as ei:
        await peer.cmd(f"map {ME} {refs} rw")
    assert ei.value.kind == "PermissionError"
    await peer.cmd(f"map {ME} {refs} ro")
    with pytest.raises(PeerError) as ei:
        await peer.cmd("write 0 01")
    assert ei.value.kind == "TypeError"  # read-only memoryview
    share.buf[0] = 7
    assert await peer.cmd("read 0 1") == ["07"]
    await peer.cmd("unmap")
    share.close()
    assert await peer.exit() == 0


async def test_wrong_grantee_and_revoked_across_processes(me: UnixPlatform, spawn: Spawn) -> None:
    other = await spawn(3)
    share = me.grants.share(PEER, 1)
    with pytest.raises(PeerError) as ei:
        await other.cmd(f"map {ME} {share.refs[0]} rw")
    assert ei.value.kind == "PermissionError"
    assert f"grant ref {share.refs[0]} of domain {ME}" in str(ei.value)
    share.close()
    with pytest.raises(PeerError) as ei:
        await other.cmd(f"map {ME} {share.refs[0]} rw")
    assert ei.value.kind == "FileNotFoundError"
    assert await other.exit() == 0


async def test_ping_pong_100k_notifications_no_loss(me: UnixPlatform, spawn: Spawn) -> None:
    n = 100_000
    peer = await spawn(PEER)
    ch = await me.events.listen(PEER)
    await peer.cmd(f"connect {ME} {ch.port}")
    peer.send(f"pong {n}")
    # fast path: a handler answers each pong with the next ping; a lost event would stall
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    count = 0

    def on_event() -> None:
        nonlocal count
        if ch.peer_lost:
            if not done.done():
                done.set_exception(ConnectionResetError("peer lost"))
            return
        count += 1
        if count < n:
            ch.notify()
        elif not done.done():
            done.set_result(count)

    t0 = time.perf_counter()
    ch.set_handler(on_event)
    ch.notify()
    assert await asyncio.wait_for(done, 60) == n
    elapsed = time.perf_counter() - t0
    assert await peer.reply(timeout=20) == ["ok", str(n)]
    print(f"{n} round trips in {elapsed:.2f}s = {elapsed / n * 1e6:.1f} us each")
    ch.close()
    assert await peer.exit() == 0


async def test_ping_pong_with_wait(me: UnixPlatform, spawn: Spawn) -> None:
    n = 2000
    peer = await spawn(PEER)
    ch = await me.events.listen(PEER)
    await peer.cmd(f"connect {ME} {ch.port}")
    peer.send(f"pong {n}")
    for _ in range(n):
        ch.notify()
        await ch.wait(timeout=10)
    assert await peer.reply() == ["ok", str(n)]
    ch.close()
    assert await peer.exit() == 0


async def test_killed_peer_is_connection_reset_within_a_second(
    me: UnixPlatform, spawn: Spawn
) -> None:
    peer = await spawn(PEER)
    ch = await me.events.listen(PEER)
    await peer.cmd(f"connect {ME} {ch.port}")
    await peer.cmd("notify")
    await ch.wait(timeout=10)
    waiter = asyncio.create_task(ch.wait())
    await asyncio.sleep(0.05)
    peer.kill()
    async with asyncio.timeout(1.0):
        with pytest.raises(ConnectionResetError):
            await waiter
    assert ch.peer_lost
    ch.notify()  # harmless
    ch.close()


async def test_killed_peer_calls_handler_with_peer_lost(me: UnixPlatform, spawn: Spawn) -> None:
    peer = await spawn(PEER)
    (port,) = await peer.cmd(f"listen {ME}")
    ch = await me.events.connect(PEER, int(port))
    lost = asyncio.Event()
    ch.set_handler(lambda: lost.set() if ch.peer_lost else None)
    peer.kill()
    await asyncio.wait_for(lost.wait(), 1.0)
    ch.close()


async def test_peer_killed_before_accept_is_seen(me: UnixPlatform, spawn: Spawn) -> None:
    ch = await me.events.listen(PEER)
    peer = await spawn(PEER)
    await peer.cmd(f"connect {ME} {ch.port}")  # our loop has not accepted yet? either way
    peer.kill()
    await asyncio.wait_for(peer.proc.wait(), 10)
    with pytest.raises(ConnectionResetError):
        await ch.wait(timeout=5)
    ch.close()


async def test_connect_while_listener_loop_is_blocked(me: UnixPlatform, spawn: Spawn) -> None:
    peer = await spawn(PEER)
    (port,) = await peer.cmd(f"listen {ME}")
    peer.send("block 0.5")  # the peer's loop cannot accept now
    ch = await me.events.connect(PEER, int(port))
    ch.notify()
    assert await peer.reply() == ["ok"]
    await peer.cmd("wait 10")  # the event queued behind the hello is delivered
    await peer.cmd("notify")
    await ch.wait(timeout=10)
    ch.close()
    assert await peer.exit() == 0


async def test_mapping_survives_granter_death(me: UnixPlatform, spawn: Spawn) -> None:
    peer = await spawn(PEER)
    (refs_text,) = await peer.cmd(f"share {ME} 2 rw")
    m = me.grants.map(PEER, [int(r) for r in refs_text.split(",")][::-1])
    peer.kill()
    await asyncio.wait_for(peer.proc.wait(), 10)
    assert m.buf[0] == 2 and m.buf[PAGE_SIZE] == 1
    m.buf[0] = 0xAB  # still valid memory
    assert m.buf[0] == 0xAB
    m.close()


async def test_permission_and_refusal_across_processes(me: UnixPlatform, spawn: Spawn) -> None:
    other = await spawn(3)
    ch = await me.events.listen(PEER)
    with pytest.raises(PeerError) as ei:
        await other.cmd(f"connect {ME} {ch.port}")
    assert ei.value.kind == "PortNotOfferedError"  # a ConnectionRefused- and PermissionError
    with pytest.raises(PeerError) as ei:
        await other.cmd(f"connect {ME} 9999")
    assert ei.value.kind == "ConnectionRefusedError"
    ch.close()
    assert await other.exit() == 0


async def test_ports_unique_across_processes_of_one_domain(tmp_path: Path, spawn: Spawn) -> None:
    peers = [await spawn(PEER) for _ in range(3)]
    for p in peers:
        p.send(f"listen-many {ME} 40")
    ports: list[int] = []
    for p in peers:
        words = await p.reply()
        ports += [int(x) for x in words[1].split(",")]
    assert len(ports) == 120 and len(set(ports)) == 120
    for p in peers:
        assert await p.exit() == 0
    assert root_leaks(str(tmp_path / "xenroot")) == []


async def test_unmap_notify_across_processes(me: UnixPlatform, spawn: Spawn) -> None:
    peer = await spawn(PEER)
    ch = await me.events.listen(PEER)
    await peer.cmd(f"connect {ME} {ch.port}")
    share = me.grants.share(PEER, 1)
    share.buf[17] = 1
    share.set_unmap_notify(17, ch)
    await peer.cmd(f"map {ME} {share.refs[0]} rw")
    share.close()
    await peer.cmd("wait 10")
    assert await peer.cmd("read 17 1") == ["00"]
    await peer.cmd("unmap")
    ch.close()
    assert await peer.exit() == 0


async def test_killed_mapper_unmap_notify_clears_our_byte(
    tmp_path: Path, me: UnixPlatform, spawn: Spawn
) -> None:
    """As on Xen, a process's unmap notify fires when it dies: here the survivor performs
    it (byte cleared, one event), then reports the loss."""
    peer = await spawn(PEER)
    ch = await me.events.listen(PEER)
    await peer.cmd(f"connect {ME} {ch.port}")
    share = me.grants.share(PEER, 2)
    share.buf[PAGE_SIZE + 9] = 1
    share.buf[PAGE_SIZE + 10] = 1
    await peer.cmd(f"map {ME} {share.refs[1]},{share.refs[0]} rw")
    await peer.cmd("mnotify 9")  # page 0 of the mapping is page 1 of the share
    peer.kill()
    await ch.wait(timeout=10)  # the notification's event ...
    assert share.buf[PAGE_SIZE + 9] == 0 and share.buf[PAGE_SIZE + 10] == 1
    assert ch.peer_lost
    with pytest.raises(ConnectionResetError):  # ... then the loss
        await ch.wait(timeout=10)
    assert not [leak for leak in root_leaks(str(tmp_path / "xenroot")) if ".clear" in leak]
    ch.close()
    share.close()


async def test_killed_granter_unmap_notify_clears_our_mapping(
    me: UnixPlatform, spawn: Spawn
) -> None:
    peer = await spawn(PEER)
    ch = await me.events.listen(PEER)
    await peer.cmd(f"connect {ME} {ch.port}")
    (refs_text,) = await peer.cmd(f"share {ME} 2 rw")  # page i filled with byte i+1
    m = me.grants.map(PEER, [int(r) for r in refs_text.split(",")])
    got = asyncio.Event()
    ch.set_handler(got.set)
    await peer.cmd(f"snotify {PAGE_SIZE + 5}")
    peer.kill()
    await asyncio.wait_for(got.wait(), 10)
    assert m.buf[PAGE_SIZE + 5] == 0 and m.buf[PAGE_SIZE + 4] == 2 and m.buf[5] == 1
    ch.close()
    m.close()


async def test_clean_channel_close_is_not_taken_for_death(me: UnixPlatform, spawn: Spawn) -> None:
    peer = await spawn(PEER)
    ch = await me.events.listen(PEER)
    await peer.cmd(f"connect {ME} {ch.port}")
    share = me.grants.share(PEER, 1)
    share.buf[3] = 1
    await peer.cmd(f"map {ME} {share.refs[0]} rw")
    await peer.cmd("mnotify 3")
    await peer.cmd("close")  # the channel only; the mapping (and its notify) stay
    with pytest.raises(ConnectionResetError):
        await ch.wait(timeout=10)
    assert share.buf[3] == 1
    await peer.cmd("unmap")  # now the notification happens, in the peer itself
    assert share.buf[3] == 0
    assert await peer.exit() == 0
    ch.close()
    share.close()
