"""Quotas hold at TRANSACTION_END, not only per request (issue 14, finding 1).

Inside a transaction each request can only check the transaction's own view: ten
transactions of one domain, each within the node quota on its own, used to commit
9,880 nodes against a quota of 1,000.  The commit now checks every quota again against
the live tree and the quotas in force, and fails with Xen's error (``ENOSPC``) with
nothing applied.  Finding 1 is reproduced against a real ``aioxen xenstored`` process
over raw sockets; the other quotas at commit run in-process (they need a quota lowered
while a transaction is open, which only an embedding program can do)."""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator

import pytest
from rawsock import Raw
from support.xenstored import ClientFactory, Xenstored, start_xenstored

from aioxen.xenstore import XenStoreError
from aioxen.xenstore.engine import Engine
from aioxen.xenstore.wire import Message, XsType, join

NODES = 1000  # Quotas().nodes


@pytest.fixture(scope="module")
def xs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xenstored]:
    server = start_xenstored(tmp_path_factory.mktemp("commitquota") / "root")
    yield server
    assert server.alive(), "xenstored died"
    assert server.stop() == 0


def pipelined(r: Raw, msgs: list[Message]) -> list[Message]:
    """Send ``msgs`` in chunks of 100 without waiting, collect the replies in order."""
    replies: list[Message] = []
    for start in range(0, len(msgs), 100):
        chunk = msgs[start : start + 100]
        r.send_bytes(b"".join(m.encode() for m in chunk))
        for m in chunk:
            reply = r.reply()
            assert reply is not None, "server closed the connection"
            assert reply.req_id == m.req_id
            replies.append(reply)
    return replies


def start_tx(r: Raw) -> int:
    msg = r.call(XsType.TRANSACTION_START, b"\x00")
    assert msg.type == XsType.TRANSACTION_START, msg
    return int(msg.payload.rstrip(b"\x00"))


def listing(r: Raw, path: str) -> list[bytes]:
    """All children of ``path`` (DIRECTORY_PART, so any number)."""
    names: list[bytes] = []
    offset = 0
    while True:
        msg = r.call(XsType.DIRECTORY_PART, join(path, str(offset)))
        assert msg.type == XsType.DIRECTORY_PART, msg
        parts = msg.payload.split(b"\x00")[1:]  # generation first
        if parts[-2:] == [b"", b""]:  # an empty name ends the list
            names += parts[:-2]
            return names
        names += parts[:-1]
        offset += sum(len(n) + 1 for n in parts[:-1])


def stats_nodes(xs: Xenstored) -> int:
    with Raw(xs.socket) as root:
        msg = root.call(XsType.CONTROL, join("aioxen-stats"))
        return int(json.loads(msg.payload.rstrip(b"\x00"))["nodes"])


def test_ten_transactions_cannot_commit_ten_quotas(xs: Xenstored) -> None:
    """The finding as reported: 10 transactions x 988 new nodes, each within the quota on
    its own.  The old engine committed all ten (9,880 nodes, quota 1,000); now the first
    commits and the nine others fail with ENOSPC, leaving the tree untouched."""
    domid = 70
    with Raw(xs.socket, timeout=60) as r:
        r.identify(domid)  # home + home/domid: 2 nodes
        for k in range(10):  # 10 directories made outside the transactions: 12 nodes
            assert r.call(XsType.WRITE, f"t{k}\x00".encode()).type == XsType.WRITE
        before = stats_nodes(xs)
        txs = [start_tx(r) for _ in range(10)]
        for k, tx in enumerate(txs):  # 12 + 988 = 1000: each transaction alone fits
            writes = [Message(XsType.WRITE, i, tx, f"t{k}/n{i}\x00x".encode()) for i in range(988)]
            assert all(m.type == XsType.WRITE for m in pipelined(r, writes))
        results = []
        for tx in txs:
            r.send(XsType.TRANSACTION_END, b"T\x00", req_id=tx & 0xFFFF, tx_id=tx)
            msg = r.reply()
            assert msg is not None and msg.tx_id == tx
            results.append(msg.payload)
        assert results == [b"OK\x00"] + [b"ENOSPC\x00"] * 9
        # Nothing of the failed commits was applied.
        assert len(listing(r, "t0")) == 988
        for k in range(1, 10):
            assert listing(r, f"t{k}") == []
            assert r.error(XsType.READ, f"t{k}/n0\x00".encode()) == "ENOENT"
        assert stats_nodes(xs) == before + 988
        # The domain is at its quota: one more node is refused outside transactions too.
        assert r.error(XsType.WRITE, b"one-more\x00x") == "ENOSPC"
        assert r.call(XsType.RM, b"t0/n0\x00").type == XsType.RM
        assert r.call(XsType.WRITE, b"one-more\x00x").type == XsType.WRITE


def test_direct_writes_during_a_transaction_count_at_commit(xs: Xenstored) -> None:
    """A transaction that fit when it was written no longer fits after the domain's
    direct writes: ENOSPC at commit, nothing applied; an abort-free retry that fits
    commits."""
    with Raw(xs.socket, timeout=60) as r, Raw(xs.socket, timeout=60) as other:
        r.identify(71)
        other.identify(71)  # the quota is per domain, not per connection
        assert r.call(XsType.MKDIR, b"tx\x00").type == XsType.MKDIR  # 3 nodes
        tx = start_tx(r)
        writes = [Message(XsType.WRITE, i, tx, f"tx/n{i}\x00v".encode()) for i in range(600)]
        assert all(m.type == XsType.WRITE for m in pipelined(r, writes))
        direct = [Message(XsType.WRITE, i, 0, f"d{i}\x00v".encode()) for i in range(500)]
        assert all(m.type == XsType.WRITE for m in pipelined(other, direct))  # 503 nodes
        assert r.error(XsType.TRANSACTION_END, b"T\x00", tx_id=tx) == "ENOSPC"
        assert listing(r, "tx") == []
        # The transaction is gone after a failed commit, as after any TRANSACTION_END.
        assert r.error(XsType.TRANSACTION_END, b"F\x00", tx_id=tx) == "ENOENT"
        tx = start_tx(r)
        writes = [Message(XsType.WRITE, i, tx, f"tx/n{i}\x00v".encode()) for i in range(497)]
        assert all(m.type == XsType.WRITE for m in pipelined(r, writes))
        assert r.call(XsType.TRANSACTION_END, b"T\x00", tx_id=tx).payload == b"OK\x00"
        assert len(listing(r, "tx")) == 497


def test_dom0_commits_are_exempt(xs: Xenstored) -> None:
    """Xen: quotas apply to unprivileged domains only -- also at commit."""
    with Raw(xs.socket, timeout=60) as dom, Raw(xs.socket, timeout=60) as root:
        dom.identify(72)
        home = "/local/domain/72"
        tx = start_tx(root)
        # dom0 creates nodes in the domain's home: they inherit the home's owner (72)
        writes = [
            Message(XsType.WRITE, i, tx, f"{home}/by0/n{i}\x00v".encode()) for i in range(1100)
        ]
        assert all(m.type == XsType.WRITE for m in pipelined(root, writes))
        assert root.call(XsType.TRANSACTION_END, b"T\x00", tx_id=tx).payload == b"OK\x00"
        assert len(listing(root, f"{home}/by0")) == 1100


def test_watch_quota_is_per_domain_across_connections(xs: Xenstored) -> None:
    """Watches are not transactional (xenstore.txt: "The tx_id in a WATCH request is
    ignored"), so the per-domain count is exact at every request; two connections of one
    domain share its 128 watches (E2BIG beyond, as Xen)."""
    with Raw(xs.socket) as a, Raw(xs.socket) as b:
        a.identify(73)
        b.identify(73)
        for i in range(64):
            assert a.call(XsType.WATCH, join(f"wa{i}", "t")).type == XsType.WATCH
            assert b.call(XsType.WATCH, join(f"wb{i}", "t")).type == XsType.WATCH
        assert a.error(XsType.WATCH, join("one-more", "t")) == "E2BIG"
        assert b.error(XsType.WATCH, join("one-more", "t")) == "E2BIG"
        assert b.call(XsType.UNWATCH, join("wb0", "t")).type == XsType.UNWATCH
        assert a.call(XsType.WATCH, join("one-more", "t")).type == XsType.WATCH


def test_transaction_quota_is_per_domain_across_connections(xs: Xenstored) -> None:
    with Raw(xs.socket) as a, Raw(xs.socket) as b:
        a.identify(74)
        b.identify(74)
        txs = [start_tx(a) for _ in range(5)] + [start_tx(b) for _ in range(5)]
        assert a.error(XsType.TRANSACTION_START, b"\x00") == "ENOSPC"
        assert b.error(XsType.TRANSACTION_START, b"\x00") == "ENOSPC"
        assert a.call(XsType.TRANSACTION_END, b"F\x00", tx_id=txs[0]).type == (
            XsType.TRANSACTION_END
        )
        start_tx(b)


# -------------------------------------------- quotas lowered under an open transaction ---


def set_quota(r: Raw, name: str, value: int) -> None:
    """``CONTROL quota set NAME VALUE`` (Xen 4.17's ``xenstore-control quota set``)."""
    assert r.call(XsType.CONTROL, join("quota", "set", name, str(value))).payload == b"OK\x00"


def test_control_quota_shows_sets_and_reports(xs: Xenstored) -> None:
    with Raw(xs.socket) as root, Raw(xs.socket) as dom:
        dom.identify(80)
        text = root.call(XsType.CONTROL, join("quota")).payload.decode()
        assert text.startswith("Quota settings:\n") and text.endswith("\n\x00")
        assert {line.split(":")[0].strip() for line in text.splitlines()[1:-1]} >= {
            "nodes",
            "node-size",
            "watches",
            "transactions",
            "permissions",
            "transaction-nodes",
            "outstanding",
        }
        assert "nodes              :     1000" in text
        report = root.call(XsType.CONTROL, join("quota", "80")).payload
        assert report == b"Domain 80:\nnodes: 2\nwatches: 0\ntransactions: 0\n\x00"
        for bad in (("set", "bogus", "3"), ("set", "nodes", "0"), ("set", "nodes"), ("x", "y")):
            assert root.error(XsType.CONTROL, join("quota", *bad)) == "EINVAL"
        assert dom.error(XsType.CONTROL, join("quota")) == "EACCES"  # dom0 only


@pytest.mark.parametrize("quota", ["node-size", "permissions", "transaction-nodes", "nodes"])
def test_quota_lowered_under_an_open_transaction(xs: Xenstored, quota: str) -> None:
    """The commit checks the quotas in force when it commits: lowering one (CONTROL quota
    set) while a transaction is open makes its commit fail with ENOSPC, nothing applied."""
    domid = {"node-size": 81, "permissions": 82, "transaction-nodes": 83, "nodes": 84}[quota]
    with Raw(xs.socket) as root, Raw(xs.socket) as r:
        r.identify(domid)
        assert r.call(XsType.WRITE, b"p\x00old").type == XsType.WRITE
        perms_before = r.call(XsType.GET_PERMS, b"p\x00").payload
        tx = start_tx(r)
        r.send(XsType.WRITE, b"p\x00" + b"v" * 1500, tx_id=tx)
        r.send(XsType.SET_PERMS, join("p", f"n{domid}", "r1", "r2", "r3", "r4"), tx_id=tx)
        for i in range(20):
            r.send(XsType.WRITE, f"many/n{i}\x00".encode(), tx_id=tx)
        for _ in range(22):
            reply = r.reply()
            assert reply is not None and reply.type != XsType.ERROR, reply
        lowered = {"node-size": 1000, "permissions": 3, "transaction-nodes": 10, "nodes": 10}
        default = {"node-size": 2048, "permissions": 5, "transaction-nodes": 1024, "nodes": 1000}
        set_quota(root, quota, lowered[quota])
        try:
            assert r.error(XsType.TRANSACTION_END, b"T\x00", tx_id=tx) == "ENOSPC"
        finally:
            set_quota(root, quota, default[quota])
        assert r.call(XsType.READ, b"p\x00").payload == b"old"
        assert r.call(XsType.GET_PERMS, b"p\x00").payload == perms_before
        assert r.error(XsType.READ, b"many\x00") == "ENOENT"


async def test_node_size_quota_at_commit(engine: Engine, inproc: ClientFactory) -> None:
    dom, root = inproc(5), inproc(0)
    await dom.write("home-made", "")
    await root.write("/local/domain/5/big-by-dom0", b"b" * 3000)  # dom0 is exempt
    tx = await dom.transaction().start()
    await tx.write("v", b"x" * 1500)
    await tx.write("big-by-dom0/child", "")  # changes that node's children, not its value
    engine.quotas.node_size = 1000
    with pytest.raises(XenStoreError) as info:
        await tx.commit()
    assert info.value.errno == errno.ENOSPC
    assert not await dom.exists("v") and not await dom.exists("big-by-dom0/child")
    # Only values the transaction wrote count: the dom0 value above the quota does not.
    async with dom.transaction() as tx2:
        await tx2.write("big-by-dom0/child", "")
    assert await dom.exists("big-by-dom0/child")


async def test_permissions_quota_at_commit(engine: Engine, inproc: ClientFactory) -> None:
    dom = inproc(5)
    await dom.write("p", "")
    before = await dom.get_perms("p")
    tx = await dom.transaction().start()
    await tx.set_perms("p", ["n5", "r1", "r2", "r3", "r4"])
    engine.quotas.permissions = 3
    with pytest.raises(XenStoreError) as info:
        await tx.commit()
    assert info.value.errno == errno.ENOSPC
    assert await dom.get_perms("p") == before


async def test_transaction_nodes_quota_at_commit(engine: Engine, inproc: ClientFactory) -> None:
    dom = inproc(5)
    tx = await dom.transaction().start()
    for i in range(30):
        await tx.write(f"m/{i}", "")
    engine.quotas.transaction_nodes = 10
    with pytest.raises(XenStoreError) as info:
        await tx.commit()
    assert info.value.errno == errno.ENOSPC
    assert not await dom.exists("m")


async def test_node_quota_at_commit_in_process(engine: Engine, inproc: ClientFactory) -> None:
    dom = inproc(5)
    tx = await dom.transaction().start()
    for i in range(20):
        await tx.write(f"q/{i}", "")
    engine.quotas.nodes = 10
    with pytest.raises(XenStoreError) as info:
        await tx.commit()
    assert info.value.errno == errno.ENOSPC
    assert not await dom.exists("q")
    # Removing nodes never fails on the quota, even above it.
    engine.quotas.nodes = 1000
    async with dom.transaction() as tx2:
        for i in range(20):
            await tx2.write(f"q/{i}", "")
    engine.quotas.nodes = 5
    async with dom.transaction() as tx3:
        await tx3.rm("q/0")
    assert not await dom.exists("q/0")
