"""aioxen's XenStore client against Xen's own daemons in dom0: the C ``xenstored`` over
both transports (its Unix socket and the kernel's ``/dev/xen/xenbus``), and the OCaml
``oxenstored`` over its Unix socket, each checked with xenstore-utils' C tools pointed at
the same daemon.

oxenstored runs *beside* the C xenstored, which stays dom0's store (xen-init-dom0, the
domU tests and ``/dev/xen/xenbus`` all use it); :func:`oxenstored` starts it so that it
touches nothing of the C daemon's:

* ``--no-domain-init``: it does not take over dom0's xenstore ring (the C daemon serves
  it), so ``/dev/xen/xenbus`` cannot reach oxenstored and the xenbus transport is tested
  against the C daemon only.
* Its socket directory is compiled in (``/var/run/xenstored``, the C daemon's too), so it
  runs in a private mount namespace (util-linux ``unshare``) with a tmpfs over
  ``/run/xenstored``; the tests reach its socket as ``/proc/<pid>/root/run/xenstored/socket``
  and point the C tools there with ``XENSTORED_PATH`` (libxenstore tries the socket first).
* Even with ``--no-domain-init`` it binds the global ``VIRQ_DOM_EXC`` at start-up, which a
  domain can bind only once and the C daemon already has: it dies with
  ``Failure("evtchn bind_virq failed")``.  An ``LD_PRELOAD`` shim
  (``xenlab/oxenstored-shim.c``, compiled on the host by ``xenlab/lab.py``: cc under TCG
  takes ~20 s) turns that one ioctl into an unbound port offered to dom0 itself, which
  never fires.
  oxenstored then never hears of domain deaths -- nothing it needs, as no domain is
  introduced to it; everything a socket client sees is the unmodified daemon.
* It is seeded by running the real ``xen-init-dom0`` against it (in its namespace, where
  ``/var/lib/xen`` is private too), so ``/local/domain/0/{domid,name}`` exist in both.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aioxen.platforms.xen import XenPlatform
from aioxen.xenstore import (
    Perm,
    Transaction,
    TransactionConflict,
    XenStoreClient,
    XenStoreNotFound,
)

HANG = 20.0  # hang guard only
XEN_BIN = Path("/usr/lib/xen-4.17/bin")
C_SOCKET = "/var/run/xenstored/socket"
_ids = itertools.count()

Tool = Callable[..., Awaitable[str]]


def run_tool(env: dict[str, str] | None, *argv: str) -> str:
    """Run a command to completion (synchronously); return its stdout."""
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


@dataclass(frozen=True)
class OXenstored:
    pid: int
    socket: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """The environment that points libxenstore (the C tools) at this daemon."""
        return {**os.environ, "XENSTORED_PATH": self.socket}


def _c_daemon_answers() -> None:
    out = run_tool(None, "xenstore-ls", "/local/domain/0")
    assert 'name = "Domain-0"' in out, out


def _own_socket(ox: OXenstored, c_dev: int) -> bool:
    """Whether ``ox``'s socket exists on its private tmpfs (not the C daemon's file system)."""
    try:
        return os.stat(ox.socket).st_dev != c_dev
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def oxenstored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OXenstored]:
    """oxenstored beside the C xenstored (see the module docstring); killed at teardown,
    after which the C daemon must still answer on its own socket."""
    shim = os.environ.get("XENLAB_OXENSTORED_SHIM", "")
    assert shim and os.path.exists(shim), "xenlab/lab.py builds xenlab/oxenstored-shim.c"
    work = tmp_path_factory.mktemp("oxenstored")
    conf = work / "oxenstored.conf"
    conf.write_text(
        f"pid-file = {work}/oxenstored.pid\n"
        "persistent = false\n"
        f"xenstored-log-file = {work}/oxenstored.log\n"
        "xenstored-log-level = info\n"
        f"access-log-file = {work}/access.log\n"
    )
    c_socket_before = os.stat(C_SOCKET).st_ino
    log = work / "stdout.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             "mount -t tmpfs -o mode=755 oxenstored /run/xenstored"
             ' && mount -t tmpfs -o mode=755 oxenstored /var/lib/xen && exec "$0" "$@"',
             str(XEN_BIN / "oxenstored"), "--no-fork", "--no-domain-init",
             "--config-file", str(conf), "--pid-file", f"{work}/oxenstored.pid"],
            env={**os.environ, "LD_PRELOAD": shim},
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    ox = OXenstored(proc.pid, f"/proc/{proc.pid}/root/run/xenstored/socket", work)
    try:
        # Until the child has unshared and mounted its tmpfs, /proc/<pid>/root/run/xenstored
        # is the C daemon's directory: wait for oxenstored's own socket, on that tmpfs.
        c_dev = os.stat(C_SOCKET).st_dev
        deadline = time.monotonic() + HANG
        while not _own_socket(ox, c_dev):
            assert proc.poll() is None, f"oxenstored exited {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"no oxenstored socket: {log.read_text()}"
            time.sleep(0.05)
        assert os.stat(C_SOCKET).st_ino == c_socket_before, "the C daemon's socket was touched"
        # What xen-init-dom0 wrote into the C daemon, written the same way into this one:
        # inside its namespace, so the default socket is oxenstored's and the stub libxl
        # config lands on its private /var/lib/xen.
        plain_env = {k: v for k, v in os.environ.items() if k != "XENSTORED_PATH"}
        nsenter = ["nsenter", f"--target={proc.pid}", "--mount", "--root", "--wd"]
        init = run_tool(plain_env, *nsenter, str(XEN_BIN / "xen-init-dom0"))
        assert "Done setting up Dom0" in init, init  # not the C daemon's "already set up"
        yield ox
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(HANG)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(HANG)
        print("oxenstored stdout:", log.read_text())  # shown by -rA, and with a failure
        for name in ("oxenstored.log", "access.log"):
            if (work / name).exists():
                print(name, (work / name).read_text()[-6000:])
        _c_daemon_answers()


@dataclass(frozen=True)
class Target:
    """One daemon through one transport, and the env for C tools talking to the same
    daemon (None: the default, the C xenstored's socket)."""

    make: Callable[[], XenStoreClient]
    env: dict[str, str] | None


# The xenbus transport reaches only the daemon that owns dom0's xenstore ring: the C one.
TARGETS = ["xenstored-socket", "xenstored-xenbus", "oxenstored-socket"]


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "xenstored-socket":
        return Target(lambda: XenStoreClient.for_unix_socket(C_SOCKET, 0), None)
    if request.param == "xenstored-xenbus":
        return Target(lambda: XenStoreClient.for_xenbus("/dev/xen/xenbus"), None)
    ox: OXenstored = request.getfixturevalue("oxenstored")
    return Target(lambda: XenStoreClient.for_unix_socket(ox.socket, 0), ox.env)


@pytest.fixture
async def store(target: Target) -> AsyncIterator[XenStoreClient]:
    async with target.make() as client:
        yield client


@pytest.fixture
def tool(target: Target) -> Tool:
    async def run(*argv: str) -> str:
        """Run one of xenstore-utils' C tools against the target's daemon; its stdout."""
        proc = await asyncio.create_subprocess_exec(
            *argv, env=target.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), HANG)
        assert proc.returncode == 0, f"{argv}: {err.decode()}"
        return out.decode()

    return run


@pytest.fixture
def base() -> str:
    return f"/local/domain/0/data/aioxen-lab/{os.getpid()}-{next(_ids)}"


async def test_platform_store_reads_what_xen_init_dom0_wrote(plat: XenPlatform) -> None:
    assert await plat.store.read("/local/domain/0/name") == b"Domain-0"
    assert await plat.store.read("/local/domain/0/domid") == b"0"


async def test_relative_paths_and_what_xen_init_dom0_wrote(store: XenStoreClient) -> None:
    assert await store.read("domid") == b"0"
    assert await store.read("/local/domain/0/name") == b"Domain-0"
    assert await store.get_domain_path(0) == "/local/domain/0"


async def test_oxenstored_is_a_separate_store(oxenstored: OXenstored, base: str) -> None:
    async with XenStoreClient.for_unix_socket(oxenstored.socket, 0) as ox:
        await ox.write(f"{base}/only-in-ox", b"1")
        assert run_tool(oxenstored.env, "xenstore-read", f"{base}/only-in-ox").strip() == "1"
        async with XenStoreClient.for_unix_socket(C_SOCKET, 0) as c:
            assert not await c.exists(f"{base}/only-in-ox")
        await ox.rm(base)
    _c_daemon_answers()


async def test_roundtrip_with_the_c_tools(store: XenStoreClient, tool: Tool, base: str) -> None:
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


async def test_permissions_round_trip(store: XenStoreClient, tool: Tool, base: str) -> None:
    await store.write(f"{base}/k", b"v")
    perms = [Perm(0, "n"), Perm(5, "r")]
    await store.set_perms(f"{base}/k", perms)
    assert await store.get_perms(f"{base}/k") == perms
    assert "n0,r5" in (await tool("xenstore-ls", "-p", base)).replace(" ", "")
    await store.rm(base)


async def test_watch_sees_c_tool_writes(store: XenStoreClient, tool: Tool, base: str) -> None:
    await store.write(f"{base}/w", b"0")
    async with store.watch(f"{base}/w") as w:
        assert await w.next(timeout=HANG) == f"{base}/w"  # fires once on registration
        await tool("xenstore-write", f"{base}/w", "1")
        assert await w.next(timeout=HANG) == f"{base}/w"
        await tool("xenstore-rm", f"{base}/w")
        assert await w.next(timeout=HANG) == f"{base}/w"
    await store.rm(base)


async def test_transaction_conflict_and_retry(store: XenStoreClient, tool: Tool, base: str) -> None:
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
