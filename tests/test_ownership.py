"""``aioxen.ownership``: owner records, XenStore claims, lock files, Unix socket claims."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aioxen.ownership import (
    FileLock,
    Owner,
    ResourceBusy,
    UnixSocketClaim,
    claim_key,
    holder_of,
    release_key,
)
from aioxen.xenstore import XenStoreClient
from aioxen.xenstore.engine import Engine, Quotas

KEY = "/local/domain/1/data/thing/owner"


# -- owner records -----------------------------------------------------------------------


def test_record_round_trip_and_liveness() -> None:
    me = Owner.current("a thing", domid=3)
    assert me.pid == os.getpid() and me.start is not None and me.alive()
    assert Owner.decode(me.encode()) == me
    assert Owner.current().claim != me.claim  # one nonce per claim
    assert f"pid {me.pid} domid 3, a thing" in me.describe()
    for garbage in (b"", b"12", b"{}", b'{"pid": "1", "claim": "x"}', b'{"pid": 0, "claim": "x"}'):
        with pytest.raises(ValueError, match="not an aioxen owner record"):
            Owner.decode(garbage)


def test_dead_records() -> None:
    me = Owner.current()
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True
    )
    gone = int(proc.stdout)
    for dead in (
        Owner(pid=gone, start=me.start, boot=me.boot, pidns=me.pidns, claim="a"),  # exited
        Owner(pid=me.pid, start=(me.start or 0) + 1, boot=me.boot, pidns=me.pidns, claim="b"),
        Owner(pid=me.pid, start=me.start, boot="another-boot", pidns=me.pidns, claim="c"),
    ):
        assert not dead.alive(), dead
    # an exited child that was not reaped yet (a zombie) holds nothing
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60  # hang guard only
    while Path(f"/proc/{zombie.pid}/stat").read_bytes().split(b") ")[1][:1] != b"Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not Owner(pid=zombie.pid, start=None, boot=me.boot, pidns=me.pidns, claim="e").alive()
    zombie.wait()
    # another pid namespace cannot be checked: counted alive, never stolen
    hidden = Owner(pid=gone, start=1, boot=me.boot, pidns="pid:[1]", claim="d")
    assert hidden.alive()


# -- XenStore keys -----------------------------------------------------------------------


@pytest.fixture
async def stores() -> AsyncIterator[list[XenStoreClient]]:
    engine = Engine(Quotas())
    clients = [XenStoreClient.in_process(engine, 0, timeout=10) for _ in range(8)]
    yield clients
    for c in clients:
        await c.close()


async def test_claim_release_and_refusal(stores: list[XenStoreClient]) -> None:
    a, b = Owner.current("first"), Owner.current("second")
    store = stores[0]
    assert await claim_key(store, KEY, a) is None
    assert await claim_key(store, KEY, a) is None  # re-claiming our own claim is fine
    with pytest.raises(ResourceBusy) as info:
        await claim_key(store, KEY, b, what="the thing")
    assert info.value.errno == errno.EADDRINUSE and info.value.holder == a
    assert str(info.value).endswith(f"the thing is in use by {a.describe()}")
    assert await holder_of(store, KEY) == a
    assert not await release_key(store, KEY, b)  # not b's: untouched
    assert await holder_of(store, KEY) == a
    assert await release_key(store, KEY, a)
    assert await holder_of(store, KEY) is None
    assert not await release_key(store, KEY, a)


async def test_dead_claim_is_reclaimed_in_the_same_transaction(
    stores: list[XenStoreClient],
) -> None:
    store = stores[0]
    me = Owner.current()
    dead = Owner(pid=me.pid, start=(me.start or 0) + 1, boot=me.boot, pidns=me.pidns, claim="z")
    await store.write(KEY, dead.encode())
    await store.write("/local/domain/1/data/thing/leftover", b"1")
    seen: list[Owner | None] = []

    async def then(tx: object, stale: Owner | None) -> None:
        seen.append(stale)
        await tx.rm("/local/domain/1/data/thing/leftover")  # type: ignore[attr-defined]

    assert await claim_key(store, KEY, me, then=then) == dead
    assert seen[-1] == dead
    assert not await store.exists("/local/domain/1/data/thing/leftover")


async def test_garbage_record_is_not_stolen(stores: list[XenStoreClient]) -> None:
    await stores[0].write(KEY, b"something else")
    with pytest.raises(ResourceBusy, match="unreadable owner record"):
        await claim_key(stores[0], KEY, Owner.current())
    assert await stores[0].read(KEY) == b"something else"


async def test_racing_claims_one_winner(stores: list[XenStoreClient]) -> None:
    owners = [Owner.current(f"racer {i}") for i in range(len(stores))]
    results = await asyncio.gather(
        *(claim_key(s, KEY, o) for s, o in zip(stores, owners, strict=True)),
        return_exceptions=True,
    )
    winners = [o for o, r in zip(owners, results, strict=True) if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, ResourceBusy) for r in results if r is not None)
    assert await holder_of(stores[0], KEY) == winners[0]


# -- lock files and Unix sockets ---------------------------------------------------------

_RACER = textwrap.dedent(
    """
    import sys, time
    from aioxen.ownership import UnixSocketClaim, ResourceBusy
    path = sys.argv[1]
    sys.stdin.readline()                  # start together
    try:
        claim = UnixSocketClaim.acquire(path)
    except ResourceBusy:
        print("LOST", flush=True)
        sys.exit(0)
    sock = claim.bind(); sock.listen()
    print("WON", flush=True)
    sys.stdin.readline()                  # hold until told
    sock.close(); claim.release()
    """
)


def test_racing_processes_one_socket_owner(tmp_path: Path) -> None:
    path = str(tmp_path / "race.sock")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    try:
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        answers = [p.stdout.readline().strip() for p in procs if p.stdout is not None]
        assert sorted(answers) == ["LOST"] * 5 + ["WON"], answers
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(timeout=30)
    assert not os.path.exists(path) and not os.path.exists(path + ".lock")


def test_lock_file_checks(tmp_path: Path) -> None:
    lock = FileLock.acquire(str(tmp_path / "a.lock"))
    with pytest.raises(ResourceBusy, match=f"pid {os.getpid()}"):
        FileLock.acquire(str(tmp_path / "a.lock"))
    assert json.loads((tmp_path / "a.lock").read_text())["pid"] == os.getpid()
    lock.release()
    lock.release()
    assert not (tmp_path / "a.lock").exists()
    (tmp_path / "dir.lock").mkdir()
    with pytest.raises(OSError):
        FileLock.acquire(str(tmp_path / "dir.lock"))
    (tmp_path / "victim").write_text("x")
    (tmp_path / "l.lock").symlink_to(tmp_path / "victim")
    with pytest.raises(PermissionError, match="symbolic link"):
        FileLock.acquire(str(tmp_path / "l.lock"))
    assert (tmp_path / "victim").read_text() == "x"


def test_release_leaves_a_replaced_socket_alone(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    claim = UnixSocketClaim.acquire(path)
    sock = claim.bind()
    sock.close()
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(path)  # someone else's socket now lives at the path
        claim.release()
        assert os.path.exists(path)
    os.unlink(path)
