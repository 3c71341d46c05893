"""XenStore conformance: the same client API and server semantics on ``inheap`` (in-process
engine) and ``unix`` (a real ``aioxen xenstored`` process over its socket).

Clients come from ``Platform.store`` (the platforms build them with
``XenStoreClient.in_process`` on an ``InHeapWorld``'s engine and ``for_unix_socket``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from support.xenstored import Xenstored

from aioxen.platforms.base import Platform
from aioxen.xenstore import (
    Perm,
    TransactionConflict,
    XenStoreClient,
    XenStoreError,
    XenStorePermissionError,
)

_ids = itertools.count(1)


@dataclass
class Store:
    """A XenStore world: ``client(domid)`` makes clients; ``base`` is a fresh dom0 path;
    ``dom(n)`` a fresh domid (the unix server is shared by the module)."""

    kind: str
    make: Callable[[int], XenStoreClient]
    base: str
    domid_base: int
    clients: list[XenStoreClient] = field(default_factory=list)
    platforms: list[Platform] = field(default_factory=list)

    def client(self, domid: int = 0) -> XenStoreClient:
        c = self.make(domid)
        self.clients.append(c)
        return c

    def dom(self, n: int) -> int:
        return self.domid_base + n


@pytest.fixture(params=["inheap", "unix"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    n = next(_ids)
    platforms: list[Platform] = []
    make_platform: Callable[[int], Platform]
    if request.param == "inheap":
        from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld

        world = InHeapWorld()

        def make_platform(domid: int) -> Platform:
            return InHeapPlatform(domid=domid, world=world)

    else:
        from aioxen.platforms.unix import UnixPlatform

        server: Xenstored = request.getfixturevalue("xenstored")

        def make_platform(domid: int) -> Platform:
            return UnixPlatform(domid=domid, root=str(server.root), xenstored_path=server.socket)

    def make(domid: int) -> XenStoreClient:
        plat = make_platform(domid)
        platforms.append(plat)
        xs = plat.store
        xs.timeout = 10
        return xs

    s = Store(request.param, make, f"/test/c{n}", 100 + 10 * n, platforms=platforms)
    yield s
    for c in s.clients:
        await c.close()
    for p in platforms:
        await p.close()


# ------------------------------------------------------------------- basic operations ---


async def test_read_write_mkdir_rm_directory(store: Store) -> None:
    xs = store.client()
    b = store.base
    await xs.write(f"{b}/a/b/c", "hello")
    assert await xs.read(f"{b}/a/b/c") == b"hello"
    assert await xs.read(f"{b}/a/b") == b""  # created parent, empty value
    await xs.write(f"{b}/bin", b"\x00\xff\x01 nul inside")
    assert await xs.read(f"{b}/bin") == b"\x00\xff\x01 nul inside"
    await xs.write(f"{b}/empty", b"")
    assert await xs.read(f"{b}/empty") == b""
    await xs.mkdir(f"{b}/d/e")
    await xs.write(f"{b}/d", "keep")
    await xs.mkdir(f"{b}/d")  # existing value untouched
    assert await xs.read(f"{b}/d") == b"keep"
    assert sorted(await xs.directory(b)) == ["a", "bin", "d", "empty"]
    assert await xs.directory(f"{b}/a/b/c") == []
    await xs.rm(f"{b}/a")
    assert not await xs.exists(f"{b}/a/b/c")
    assert not await xs.exists(f"{b}/a")
    await xs.rm(f"{b}/a")  # gone already: fine, the parent exists
    with pytest.raises(FileNotFoundError) as info:
        await xs.rm(f"{b}/nope/deeper")
    assert info.value.filename == f"{b}/nope/deeper"
    with pytest.raises(FileNotFoundError, match="read"):
        await xs.read(f"{b}/missing")
    with pytest.raises(FileNotFoundError):
        await xs.directory(f"{b}/missing")
    with pytest.raises(XenStoreError) as err:
        await xs.rm("/")
    assert err.value.errno == 22


async def test_invalid_paths_are_einval(store: Store) -> None:
    xs = store.client()
    for bad in (
        f"{store.base}/../x",
        f"{store.base}/",
        f"{store.base}//x",
        "/a b",
        "/" + "x" * 3100,
    ):
        with pytest.raises(XenStoreError) as info:
            await xs.write(bad, "v")
        assert info.value.errno == 22, bad
        assert info.value.filename == bad
    with pytest.raises(ValueError, match="NUL"):
        await xs.read("/a\x00b")


async def test_relative_paths_and_domain_home(store: Store) -> None:
    d = store.dom(1)
    xs = store.client(d)
    assert await xs.read("domid") == str(d).encode()
    assert await xs.get_domain_path(d) == f"/local/domain/{d}"
    await xs.write("data/key", "v")
    root = store.client(0)
    assert await root.read(f"/local/domain/{d}/data/key") == b"v"
    assert (await root.get_perms(f"/local/domain/{d}"))[0] == Perm(d, "n")
    assert (await root.get_perms(f"/local/domain/{d}/data/key"))[0].domid == d


async def test_many_requests_in_flight_on_one_connection(store: Store) -> None:
    xs = store.client()
    b = store.base
    await asyncio.gather(*(xs.write(f"{b}/k{i}", str(i)) for i in range(300)))
    values = await asyncio.gather(*(xs.read(f"{b}/k{i}") for i in range(300)))
    assert values == [str(i).encode() for i in range(300)]
    assert len(await xs.directory(b)) == 300


async def test_long_directory_uses_directory_part(store: Store) -> None:
    xs = store.client()
    b = f"{store.base}/big"
    names = [f"child-with-a-fairly-long-name-{i:04d}" for i in range(300)]  # > 4096 bytes
    await xs.transact(lambda tx: _write_all(tx, b, names))
    assert await xs.directory(b) == names
    async with xs.transaction() as tx:
        assert await tx.directory(b) == names


async def _write_all(tx: object, base: str, names: list[str]) -> None:
    for name in names:
        await tx.write(f"{base}/{name}", "")  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- permissions ---


async def test_domain_cannot_read_another_domains_node(store: Store) -> None:
    a, b = store.dom(1), store.dom(2)
    xa, xb = store.client(a), store.client(b)
    await xa.write("secret", "s3cret")
    with pytest.raises(PermissionError) as info:
        await xb.read(f"/local/domain/{a}/secret")
    assert isinstance(info.value, XenStorePermissionError)
    assert info.value.filename == f"/local/domain/{a}/secret"
    with pytest.raises(PermissionError):
        await xb.write(f"/local/domain/{a}/secret", "x")
    with pytest.raises(PermissionError):
        await xb.directory(f"/local/domain/{a}")
    with pytest.raises(PermissionError):
        await xb.rm(f"/local/domain/{a}/secret")
    # A missing node below an unreadable one is EACCES, not ENOENT (no existence leak).
    with pytest.raises(PermissionError):
        await xb.read(f"/local/domain/{a}/no-such-node")
    # Dom0 is privileged.
    assert await store.client(0).read(f"/local/domain/{a}/secret") == b"s3cret"


async def test_acl_grants_and_ownership(store: Store) -> None:
    a, b, c = store.dom(1), store.dom(2), store.dom(3)
    xa, xb, xc = store.client(a), store.client(b), store.client(c)
    path = f"/local/domain/{a}/shared"
    await xa.write(path, "v")
    await xa.set_perms(path, [Perm(a, "n"), "r" + str(b)])
    assert await xa.get_perms(path) == [Perm(a, "n"), Perm(b, "r")]
    assert await xb.read(path) == b"v"
    with pytest.raises(PermissionError):
        await xb.write(path, "w")
    with pytest.raises(PermissionError):
        await xc.read(path)
    await xa.set_perms(path, [f"r{a}", f"b{b}"])  # default: read for everyone else
    assert await xc.read(path) == b"v"
    await xb.write(path, "from b")
    await xb.write(f"{path}/child", "made by b")
    assert (await xa.get_perms(f"{path}/child"))[0] == Perm(b, "r")  # creator owns it
    with pytest.raises(PermissionError):  # only the owner may set perms
        await xb.set_perms(path, [f"n{a}"])
    with pytest.raises(PermissionError) as info:  # an unprivileged owner cannot give it away
        await xa.set_perms(path, [f"n{b}"])
    assert info.value.errno == 1  # EPERM
    await store.client(0).set_perms(path, [f"n{b}"])  # dom0 can
    assert await xb.get_perms(path) == [Perm(b, "n")]
    with pytest.raises(PermissionError):
        await xa.read(path)


async def test_bad_permission_lists_are_einval(store: Store) -> None:
    xs = store.client()
    await xs.write(f"{store.base}/p", "")
    with pytest.raises(ValueError):
        await xs.set_perms(f"{store.base}/p", [])
    with pytest.raises(Exception) as info:
        await xs.set_perms(f"{store.base}/p", ["q1"])
    assert "permission" in str(info.value)


# -------------------------------------------------------------------------- watches ---


async def test_watch_first_event_children_and_removal(store: Store) -> None:
    xs = store.client()
    other = store.client()
    b = store.base
    await xs.mkdir(b)
    async with xs.watch(b) as w:
        assert await w.next(timeout=5) == b  # the immediate first event
        await other.write(f"{b}/x/y", "1")
        assert await w.next(timeout=5) == f"{b}/x/y"
        await other.write(f"{store.base}-sibling", "not below")
        await other.rm(f"{b}/x")
        got = {await w.next(timeout=5), await w.next(timeout=5)}
        assert got == {f"{b}/x", f"{b}/x/y"}
        await other.write(f"{b}/z", "2")
        assert await w.next(timeout=5) == f"{b}/z"
        assert w.pending() == []
    # Unwatched: no more events are routed to it.
    await other.write(f"{b}/z", "3")


async def test_watch_fires_when_a_parent_is_removed(store: Store) -> None:
    xs = store.client()
    b = store.base
    await xs.write(f"{b}/deep/node", "v")
    async with xs.watch(f"{b}/deep/node") as w:
        assert await w.next(timeout=5) == f"{b}/deep/node"
        await store.client().rm(b)
        assert await w.next(timeout=5) == f"{b}/deep/node"


async def test_relative_watch_reports_relative_paths(store: Store) -> None:
    d = store.dom(1)
    xs = store.client(d)
    await xs.mkdir("data")
    async with xs.watch("data") as w:
        assert await w.next(timeout=5) == "data"
        await store.client(0).write(f"/local/domain/{d}/data/k", "v")
        assert await w.next(timeout=5) == "data/k"


async def test_watch_events_respect_read_permission(store: Store) -> None:
    a, b = store.dom(1), store.dom(2)
    xa, xb = store.client(a), store.client(b)
    await xb.mkdir("mine")
    root = store.client(0)
    watched = f"/local/domain/{a}"
    async with xb.watch(watched) as w:
        assert await w.next(timeout=5) == watched
        await xa.write("private", "p")  # b may not read it: no event
        await xa.write("public", "p")
        await xa.set_perms("public", [f"n{a}", f"r{b}"])  # readable now: event
        assert await w.next(timeout=5) == f"{watched}/public"
        await root.write(f"{watched}/private", "again")
        await xa.write("public", "q")
        assert await w.next(timeout=5) == f"{watched}/public"
        assert w.pending() == []


async def test_special_watches(store: Store) -> None:
    root = store.client(0)
    async with root.watch("@introduceDomain") as intro, root.watch("@releaseDomain") as rel:
        assert await intro.next(timeout=5) == "@introduceDomain"
        assert await rel.next(timeout=5) == "@releaseDomain"
        d = store.dom(5)
        await root.introduce(d, 0, 0)
        assert await intro.next(timeout=5) == "@introduceDomain"
        assert await root.is_domain_introduced(d)
        await root.release(d)
        assert await rel.next(timeout=5) == "@releaseDomain"
        assert not await root.is_domain_introduced(d)
    with pytest.raises(PermissionError):
        await store.client(store.dom(6)).introduce(store.dom(7), 0, 0)


async def test_duplicate_watch_token_is_eexist(store: Store) -> None:
    xs = store.client()
    async with xs.watch(store.base, token="tok"):
        with pytest.raises(ValueError, match="token"):
            async with xs.watch(store.base, token="tok"):
                pass
    other = store.client()
    async with xs.watch(store.base, token="same"), other.watch(store.base, token="same"):
        pass  # tokens are per connection


# --------------------------------------------------------------------- transactions ---


async def test_transaction_commit_is_atomic_and_isolated(store: Store) -> None:
    xs, other = store.client(), store.client()
    b = store.base
    await xs.mkdir(b)
    async with other.watch(b) as w:
        assert await w.next(timeout=5) == b
        async with xs.transaction() as tx:
            await tx.write(f"{b}/one", "1")
            await tx.write(f"{b}/two", "2")
            assert await tx.read(f"{b}/one") == b"1"
            assert sorted(await tx.directory(b)) == ["one", "two"]
            assert not await other.exists(f"{b}/one")  # not visible before commit
            await asyncio.sleep(0.05)
            assert w.pending() == []  # no events before commit
        assert await other.read(f"{b}/two") == b"2"
        got = {await w.next(timeout=5), await w.next(timeout=5)}
        assert got == {f"{b}/one", f"{b}/two"}


async def test_transaction_aborts_when_body_raises(store: Store) -> None:
    xs = store.client()
    with pytest.raises(RuntimeError, match="boom"):
        async with xs.transaction() as tx:
            await tx.write(f"{store.base}/never", "x")
            raise RuntimeError("boom")
    assert not await xs.exists(f"{store.base}/never")


async def test_conflicting_commit_raises_transaction_conflict(store: Store) -> None:
    xs, other = store.client(), store.client()
    path = f"{store.base}/counter"
    await xs.write(path, "0")
    with pytest.raises(TransactionConflict) as info:
        async with xs.transaction() as tx:
            value = int(await tx.read(path))
            await other.write(path, "100")
            await tx.write(path, str(value + 1))
    assert info.value.errno == 11
    assert await xs.read(path) == b"100"


async def test_transact_retries_until_commit(store: Store) -> None:
    clients = [store.client(0) for _ in range(4)]
    path = f"{store.base}/n"
    await clients[0].write(path, "0")

    async def bump(tx: object) -> None:
        v = int(await tx.read(path))  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        await tx.write(path, str(v + 1))  # type: ignore[attr-defined]

    await asyncio.gather(*(c.transact(bump, retries=200) for c in clients for _ in range(10)))
    assert await clients[0].read(path) == b"40"


async def test_transaction_in_a_domain(store: Store) -> None:
    d = store.dom(1)
    xs = store.client(d)

    async def publish(tx: object) -> None:
        await tx.write("data/vchan/0/port/ring-ref", "8")  # type: ignore[attr-defined]
        await tx.write("data/vchan/0/port/event-channel", "3")  # type: ignore[attr-defined]
        await tx.set_perms("data/vchan/0/port", [f"n{d}", "r0"])  # type: ignore[attr-defined]

    await xs.transact(publish)
    assert await xs.read("data/vchan/0/port/event-channel") == b"3"
    assert await store.client(0).get_perms(f"/local/domain/{d}/data/vchan/0/port") == [
        Perm(d, "n"),
        Perm(0, "r"),
    ]


async def test_closing_the_client_ends_watch_iteration(store: Store) -> None:
    xs = store.client()
    w = await xs.watch(store.base).start()
    assert await w.next(timeout=5) == store.base

    async def consume() -> list[str]:
        return [p async for p in w]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    await xs.close()
    assert await asyncio.wait_for(task, 5) == []
    await w.close()
    with pytest.raises(ConnectionResetError, match="closed"):
        await xs.read(store.base)
