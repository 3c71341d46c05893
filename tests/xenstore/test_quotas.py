"""Quotas (Xen 4.17's C xenstored defaults; dom0 exempt) and floods.

Node, size, permission, transaction and watch quotas are checked in-process (the same
engine serves sockets); the watch-event flood and request pipelining run against a real
``aioxen xenstored`` process over raw sockets."""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import Iterator

import pytest
from rawsock import Raw
from support.xenstored import ClientFactory, Xenstored, start_xenstored

from aioxen.xenstore import XenStoreClient, XenStoreError
from aioxen.xenstore.engine import Engine, Quotas
from aioxen.xenstore.wire import Message, XsType, join


def test_default_quotas_are_xens() -> None:
    q = Quotas()
    assert (q.nodes, q.node_size, q.watches, q.transactions, q.permissions) == (
        1000,
        2048,
        128,
        10,
        5,
    )
    assert (q.transaction_nodes, q.outstanding) == (1024, 20)


async def test_node_quota(inproc: ClientFactory) -> None:
    dom = inproc(5)

    # the home and its domid key already count: 2 nodes
    async def fill(tx: object) -> None:
        for i in range(998):
            await tx.write(f"n/{i}" if i else "n", "")  # type: ignore[attr-defined]

    await dom.transact(fill)
    with pytest.raises(XenStoreError) as info:
        await dom.write("one-too-many", "x")
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == "one-too-many"
    # dom0 is exempt (the node it makes inherits owner 5, and counts for 5 from now on)
    await inproc(0).write("/local/domain/5/by-dom0", "x")
    await dom.rm("n/1")
    with pytest.raises(XenStoreError):
        await dom.write("fits-again", "x")
    await dom.rm("n/2")
    await dom.write("fits-again", "x")


async def test_node_quota_inside_a_transaction(inproc: ClientFactory) -> None:
    dom = inproc(6)
    with pytest.raises(XenStoreError) as info:
        async with dom.transaction() as tx:
            for i in range(1000):
                await tx.write(f"t{i}", "")
    assert info.value.errno == errno.ENOSPC


async def test_value_size_quota(inproc: ClientFactory) -> None:
    dom = inproc(5)
    await dom.write("ok", b"x" * 2048)
    with pytest.raises(XenStoreError) as info:
        await dom.write("big", b"x" * 2049)
    assert info.value.errno == errno.ENOSPC
    await inproc(0).write("/big", b"x" * 4000)


async def test_permissions_quota(inproc: ClientFactory) -> None:
    dom = inproc(5)
    await dom.write("p", "")
    await dom.set_perms("p", ["n5", "r1", "r2", "r3", "r4"])
    with pytest.raises(XenStoreError) as info:
        await dom.set_perms("p", ["n5", "r1", "r2", "r3", "r4", "r6"])
    assert info.value.errno == errno.ENOSPC


async def test_transaction_quota(inproc: ClientFactory) -> None:
    dom = inproc(5)
    txs = [await dom.transaction().start() for _ in range(10)]
    with pytest.raises(XenStoreError) as info:
        await dom.transaction().start()
    assert info.value.errno == errno.ENOSPC
    other_conn = inproc(5)  # the quota is per domain, not per connection
    with pytest.raises(XenStoreError):
        await other_conn.transaction().start()
    await txs[0].abort()
    tx = await dom.transaction().start()
    await tx.abort()
    for t in txs[1:]:
        await t.abort()
    root = [await inproc(0).transaction().start() for _ in range(30)]  # dom0 exempt
    for t in root:
        await t.abort()


async def test_transaction_nodes_quota(engine: Engine, inproc: ClientFactory) -> None:
    engine.quotas.transaction_nodes = 20
    dom = inproc(5)
    with pytest.raises(XenStoreError) as info:
        async with dom.transaction() as tx:
            for i in range(30):
                await tx.write(f"x{i}", "")
    assert info.value.errno == errno.ENOSPC


async def test_watch_quota(inproc: ClientFactory) -> None:
    dom = inproc(5)
    watches = [await dom.watch(f"w{i}").start() for i in range(128)]
    with pytest.raises(XenStoreError) as info:
        await dom.watch("w-too-many").start()
    assert info.value.errno == errno.E2BIG
    await watches[0].close()
    extra = await dom.watch("w-fits").start()
    await extra.close()
    for w in watches[1:]:
        await w.close()
    root = [await inproc(0).watch(f"/r{i}").start() for i in range(200)]
    for w in root:
        await w.close()


async def test_quotas_reported_by_the_real_server(unix_clients: ClientFactory) -> None:
    dom = unix_clients(33)
    with pytest.raises(XenStoreError) as info:
        await dom.write("big", b"x" * 3000)
    assert info.value.errno == errno.ENOSPC and "ENOSPC" in str(info.value)
    watches = [await dom.watch(f"w{i}").start() for i in range(128)]
    with pytest.raises(XenStoreError) as info:
        await dom.watch("w-too-many").start()
    assert info.value.errno == errno.E2BIG
    for w in watches:
        await w.close()


# ------------------------------------------------------------------------ floods ------


@pytest.fixture(scope="module")
def small_backlog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xenstored]:
    xs = start_xenstored(
        tmp_path_factory.mktemp("flood") / "root", "--quota", "watch-event-backlog=16384"
    )
    yield xs
    assert xs.alive()
    assert xs.stop() == 0


async def test_watch_event_flood_to_a_reader_that_never_reads(small_backlog: Xenstored) -> None:
    sock = small_backlog.socket
    victim = Raw(sock)
    try:
        root = XenStoreClient.for_unix_socket(sock, 0, timeout=30)
        await root.mkdir("/flood")
        await root.set_perms("/flood", ["n0", "r60"])  # children inherit: 60 may read
        await root.write("/flood/ok", "yes")
        victim.identify(60)
        victim.call(XsType.WATCH, join("/flood", "tok"))
        # Write until the server has had to drop events for the victim (how many writes
        # that takes depends on the kernel's socket buffer sizes, so keep going).
        n = 0
        dropped = 0
        while not dropped:
            await asyncio.gather(
                *(root.write(f"/flood/k{i % 7}", str(i)) for i in range(n, n + 1000))
            )
            n += 1000
            assert n <= 500_000, "the server never limited the victim's backlog"
            stats = json.loads(await root.control("aioxen-stats"))
            dropped = sum(c["dropped_events"] for c in stats["connections"] if c["domid"] == 60)
        # Everyone else is still served, promptly.
        bystander = XenStoreClient.for_unix_socket(sock, 61, timeout=5)
        await bystander.write("still", "served")
        assert await bystander.read("still") == b"served"
        # The flooded connection is intact: whole events, then the reply to a new request.
        victim.send(XsType.READ, b"/flood/ok\x00", req_id=4242)
        events = 0
        while True:
            msg = victim.recv()
            assert msg is not None
            if msg.type == XsType.WATCH_EVENT:
                path, token, rest = msg.payload.split(b"\x00")
                assert path.startswith(b"/flood") and token == b"tok" and rest == b""
                events += 1
                continue
            assert msg == Message(XsType.READ, 4242, 0, b"yes")
            break
        assert 0 < events < n + 2
        await bystander.close()
        await root.close()
    finally:
        victim.close()


async def test_pipelined_requests_are_throttled_not_lost(small_backlog: Xenstored) -> None:
    sock = small_backlog.socket
    with Raw(sock) as greedy:
        greedy.identify(62)
        greedy.call(XsType.WRITE, b"v\x00" + b"x" * 2000)
        n = 3000
        batch = b"".join(
            Message(XsType.READ, i, 0, b"v\x00").encode() for i in range(n)
        )  # ~6 MB of replies that it does not read for now
        greedy.sock.setblocking(False)
        sent = 0
        try:
            while sent < len(batch):
                sent += greedy.sock.send(batch[sent:])
        except BlockingIOError:
            pass  # the server stopped reading us: that is the point
        greedy.sock.setblocking(True)
        greedy.sock.settimeout(30)
        other = XenStoreClient.for_unix_socket(sock, 63, timeout=5)
        await other.write("k", "v")  # not starved by the greedy connection
        assert await other.read("k") == b"v"
        await other.close()
        # Now the greedy one reads: every reply it is owed, in order, none lost.
        rest = batch[sent:]
        expected = 0
        while expected < n:
            if rest:
                greedy.sock.setblocking(False)
                try:
                    k = greedy.sock.send(rest)
                    rest = rest[k:]
                except BlockingIOError:
                    pass
                greedy.sock.settimeout(30)
            msg = greedy.recv()
            assert msg is not None
            assert (msg.req_id, msg.type, len(msg.payload)) == (expected, XsType.READ, 2000)
            expected += 1
