"""Three independent clients against one real ``aioxen xenstored`` process: our client,
Debian's ``xenstore-utils`` (libxenstore, over ``XENSTORED_PATH``) and ``pyxs`` from PyPI.
Each writes what the others read, and watches/transactions cross between them."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import threading
from collections.abc import Iterator

import pytest
import pyxs
from support.xenstored import ClientFactory, Xenstored

from aioxen.xenstore import Perm

_n = itertools.count()


@pytest.fixture
def base() -> str:
    return f"/interop/t{next(_n)}"


def tool(xs: Xenstored, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), env=xs.env(), capture_output=True, text=True, timeout=30, check=check
    )


async def atool(xs: Xenstored, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(tool, xs, *argv, check=check)


@pytest.fixture
def pyxs_client(xenstored: Xenstored) -> Iterator[pyxs.Client]:
    with pyxs.Client(unix_socket_path=xenstored.socket) as c:
        yield c


# ---------------------------------------------------------------- xenstore-utils ------


async def test_xenstore_utils_write_read_ls_rm(
    xenstored: Xenstored, unix_clients: ClientFactory, base: str
) -> None:
    ours = unix_clients(0)
    await atool(xenstored, "xenstore-write", f"{base}/a", "from-c", f"{base}/b/c", "deep")
    assert await ours.read(f"{base}/a") == b"from-c"
    await ours.write(f"{base}/ours", "from-python")
    r = await atool(xenstored, "xenstore-read", f"{base}/ours", f"{base}/b/c")
    assert r.stdout.splitlines() == ["from-python", "deep"]
    ls = await atool(xenstored, "xenstore-ls", base)
    assert ls.stdout.splitlines() == [
        'a = "from-c"',
        'b = ""',
        ' c = "deep"',
        'ours = "from-python"',
    ]
    await atool(xenstored, "xenstore-rm", f"{base}/b")
    assert sorted(await ours.directory(base)) == ["a", "ours"]
    missing = await atool(xenstored, "xenstore-read", f"{base}/b/c", check=False)
    assert missing.returncode != 0
    assert "couldn't read path" in missing.stderr


async def test_xenstore_chmod_and_ls_p(
    xenstored: Xenstored, unix_clients: ClientFactory, base: str
) -> None:
    ours = unix_clients(0)
    await ours.write(f"{base}/node", "v")
    await atool(xenstored, "xenstore-chmod", f"{base}/node", "n7", "r8", "b9")
    assert await ours.get_perms(f"{base}/node") == [Perm(7, "n"), Perm(8, "r"), Perm(9, "b")]
    ls = await atool(xenstored, "xenstore-ls", "-p", base)
    assert ls.stdout.split()[-1] == "(n7,r8,b9)"
    # Domain 8 may read, domain 10 may not: checked through our unprivileged client.
    assert await unix_clients(8).read(f"{base}/node") == b"v"
    with pytest.raises(PermissionError):
        await unix_clients(10).read(f"{base}/node")


async def test_xenstore_ls_long_directory_via_directory_part(
    xenstored: Xenstored, unix_clients: ClientFactory, base: str
) -> None:
    ours = unix_clients(0)
    names = [f"a-long-child-name-to-overflow-one-reply-{i:04d}" for i in range(200)]

    async def fill(tx: object) -> None:
        for n in names:
            await tx.write(f"{base}/{n}", "x")  # type: ignore[attr-defined]

    await ours.transact(fill)
    ls = await atool(xenstored, "xenstore-ls", base)
    assert [line.split(" = ")[0] for line in ls.stdout.splitlines()] == names
    listed = await atool(xenstored, "xenstore-list", base)
    assert listed.stdout.split() == names


async def test_xenstore_watch_sees_our_writes_and_we_see_theirs(
    xenstored: Xenstored, unix_clients: ClientFactory, base: str
) -> None:
    ours = unix_clients(0)
    await ours.mkdir(base)
    proc = await asyncio.create_subprocess_exec(
        "xenstore-watch", "-n", "3", base, env=xenstored.env(), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 10)
    assert first.decode().strip() == base  # the immediate first event
    await ours.write(f"{base}/x", "1")
    await ours.rm(f"{base}/x")
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert out.decode().split() == [f"{base}/x", f"{base}/x"]
    assert proc.returncode == 0

    async with ours.watch(base) as w:
        assert await w.next(timeout=5) == base
        await atool(xenstored, "xenstore-write", f"{base}/from-c", "1")
        assert await w.next(timeout=5) == f"{base}/from-c"


# --------------------------------------------------------------------------- pyxs ------


async def test_pyxs_reads_ours_and_we_read_pyxs(
    unix_clients: ClientFactory, pyxs_client: pyxs.Client, base: str
) -> None:
    ours = unix_clients(0)
    await ours.write(f"{base}/ours", b"\x01binary")
    assert pyxs_client.read(f"{base}/ours".encode()) == b"\x01binary"
    pyxs_client.write(f"{base}/theirs".encode(), b"pyxs")
    assert await ours.read(f"{base}/theirs") == b"pyxs"
    assert sorted(pyxs_client.list(base.encode())) == [b"ours", b"theirs"]
    pyxs_client.set_perms(f"{base}/theirs".encode(), [b"n3", b"r4"])
    assert await ours.get_perms(f"{base}/theirs") == [Perm(3, "n"), Perm(4, "r")]
    assert pyxs_client.get_domain_path(7) == b"/local/domain/7"


async def test_pyxs_transaction_conflicts_with_ours(
    unix_clients: ClientFactory, pyxs_client: pyxs.Client, base: str
) -> None:
    ours = unix_clients(0)
    path = f"{base}/counter"
    await ours.write(path, "0")
    pyxs_client.transaction()
    value = int(pyxs_client.read(path.encode()))
    await ours.write(path, "10")  # intervening write from another client
    pyxs_client.write(path.encode(), str(value + 1).encode())
    assert pyxs_client.commit() is False  # EAGAIN
    assert await ours.read(path) == b"10"
    # Retry succeeds, and its result is visible to us only after commit.
    pyxs_client.transaction()
    pyxs_client.write(path.encode(), b"11")
    assert await ours.read(path) == b"10"
    assert pyxs_client.commit() is True
    assert await ours.read(path) == b"11"

    # And the other way round: our transaction loses to a pyxs write.
    from aioxen.xenstore import TransactionConflict

    with pytest.raises(TransactionConflict):
        async with ours.transaction() as tx:
            await tx.read(path)
            await asyncio.to_thread(pyxs_client.write, path.encode(), b"12")
            await tx.write(path, "13")
    assert await ours.read(path) == b"12"


async def test_pyxs_watch_sees_our_commits(
    unix_clients: ClientFactory, pyxs_client: pyxs.Client, base: str
) -> None:
    ours = unix_clients(0)
    await ours.mkdir(base)
    with pyxs_client.monitor() as m:
        m.watch(base.encode(), b"tok")
        events = m.wait()
        first = await asyncio.to_thread(next, events)
        assert (first.path, first.token) == (base.encode(), b"tok")
        async with ours.transaction() as tx:
            await tx.write(f"{base}/a", "1")
        ev = await asyncio.to_thread(next, events)
        assert ev.path == f"{base}/a".encode()


async def test_all_three_clients_concurrently(
    xenstored: Xenstored, unix_clients: ClientFactory, base: str
) -> None:
    ours = unix_clients(0)
    path = f"{base}/n"
    await ours.write(path, "0")
    errors: list[BaseException] = []

    def pyxs_bumps() -> None:
        try:
            with pyxs.Client(unix_socket_path=xenstored.socket) as c:
                for _ in range(20):
                    while True:
                        c.transaction()
                        v = int(c.read(path.encode()))
                        c.write(path.encode(), str(v + 1).encode())
                        if c.commit():
                            break
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    async def our_bumps() -> None:
        async def bump(tx: object) -> None:
            v = int(await tx.read(path))  # type: ignore[attr-defined]
            await tx.write(path, str(v + 1))  # type: ignore[attr-defined]

        for _ in range(20):
            await ours.transact(bump, retries=500)

    thread = threading.Thread(target=pyxs_bumps)
    thread.start()
    await asyncio.gather(our_bumps(), our_bumps())
    await asyncio.to_thread(thread.join, 60)
    assert not errors
    # xenstore-write runs its own transaction: one more increment-free write checks it.
    r = await atool(xenstored, "xenstore-read", path)
    assert r.stdout.strip() == "60"
