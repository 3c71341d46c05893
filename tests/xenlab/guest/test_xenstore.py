"""aioxen's XenStore client against Xen's own C xenstored (and its C tools) in dom0, over
both transports: the xenstored Unix socket and the kernel's /dev/xen/xenbus."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator

import pytest

from aioxen.platform.xen import XenPlatform
from aioxen.xenstore import (
    Perm,
    Transaction,
    TransactionConflict,
    XenStoreClient,
    XenStoreNotFound,
)

HANG = 20.0  # hang guard only
_ids = itertools.count()


@pytest.fixture(params=["socket", "xenbus"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[XenStoreClient]:
    if request.param == "socket":
        client = XenStoreClient.for_unix_socket("/var/run/xenstored/socket", 0)
    else:
        client = XenStoreClient.for_xenbus("/dev/xen/xenbus")
    async with client:
        yield client


@pytest.fixture
def base() -> str:
    return f"/local/domain/0/data/aioxen-lab/{os.getpid()}-{next(_ids)}"


async def tool(*argv: str) -> str:
    """Run one of xenstore-utils' C tools and return its stdout."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), HANG)
    assert proc.returncode == 0, f"{argv}: {err.decode()}"
    return out.decode()


async def test_platform_store_reads_what_xen_init_dom0_wrote(plat: XenPlatform) -> None:
    assert await plat.store.read("/local/domain/0/name") == b"Domain-0"
    assert await plat.store.read("/local/domain/0/domid") == b"0"


async def test_relative_paths_over_xenbus() -> None:
    async with XenStoreClient.for_xenbus("/dev/xen/xenbus") as client:
        assert await client.read("domid") == b"0"
        assert await client.get_domain_path(0) == "/local/domain/0"


async def test_roundtrip_with_the_c_tools(store: XenStoreClient, base: str) -> None:
    await store.write(f"{base}/ours", b"from aioxen")
    assert (await tool("xenstore-read", f"{base}/ours")).strip() == "from aioxen"
    await tool("xenstore-write", f"{base}/theirs", "from C")
    assert await store.read(f"{base}/theirs") == b"from C"
    assert sorted(await store.directory(base)) == ["ours", "theirs"]
    await store.write(f"{base}/bin", bytes(range(256)))
    assert await store.read(f"{base}/bin") == bytes(range(256))
    await store.rm(base)
    assert not await store.exists(base)
    with pytest.raises(XenStoreNotFound, match="aioxen-lab"):
        await store.read(f"{base}/ours")


async def test_permissions_round_trip(store: XenStoreClient, base: str) -> None:
    await store.write(f"{base}/k", b"v")
    perms = [Perm(0, "n"), Perm(5, "r")]
    await store.set_perms(f"{base}/k", perms)
    assert await store.get_perms(f"{base}/k") == perms
    assert "n0,r5" in (await tool("xenstore-ls", "-p", base)).replace(" ", "")
    await store.rm(base)


async def test_watch_sees_c_tool_writes(store: XenStoreClient, base: str) -> None:
    await store.write(f"{base}/w", b"0")
    async with store.watch(f"{base}/w") as w:
        assert await w.next(timeout=HANG) == f"{base}/w"  # fires once on registration
        await tool("xenstore-write", f"{base}/w", "1")
        assert await w.next(timeout=HANG) == f"{base}/w"
        await tool("xenstore-rm", f"{base}/w")
        assert await w.next(timeout=HANG) == f"{base}/w"
    await store.rm(base)


async def test_transaction_conflict_and_retry(store: XenStoreClient, base: str) -> None:
    await store.write(f"{base}/n", b"0")
    with pytest.raises(TransactionConflict):
        async with store.transaction() as tx:
            await tx.read(f"{base}/n")
            await tool("xenstore-write", f"{base}/n", "99")  # someone else commits first
            await tx.write(f"{base}/n", b"1")
    assert await store.read(f"{base}/n") == b"99"

    attempts = 0

    async def increment(tx: Transaction) -> None:
        nonlocal attempts
        attempts += 1
        n = int(await tx.read(f"{base}/n"))
        if attempts == 1:
            await tool("xenstore-write", f"{base}/n", str(n + 100))
        await tx.write(f"{base}/n", str(n + 1).encode())

    await store.transact(increment)
    assert attempts == 2
    assert await store.read(f"{base}/n") == b"200"
    await store.rm(base)
