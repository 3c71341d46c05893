"""aioxen in a real PV domU talking to aioxen in dom0: grants, event channels, XenStore
and vchan crossing real domains.

One peer domU serves the module (:mod:`peerdomu`): it runs the host's Python and this
tree's aioxen from its initramfs.  Each test runs its dom0 half here, on the ``plat``
fixture, and its domU half as ``python -m peer ACTION`` (:mod:`peer`) on the same kind of
event loop (asyncio or uvloop) as the test.  The domU's half is driven over its console
from a thread, so dom0's aioxen runs meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import os
import re
import signal
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from crossdomain import field, loop_name, sha
from domu import RESULTS
from peer import stream
from peerdomu import Peer

from aioxen import vchan
from aioxen.platforms.base import PAGE_SIZE
from aioxen.platforms.xen import XenPlatform
from aioxen.xenstore import Perm

HANG = 180.0  # hang guard only: the domU's Python under TCG is slow to start
MIB = 1 << 20
_ids = itertools.count()
T = TypeVar("T")


def port_name() -> str:
    return f"xd{os.getpid()}x{next(_ids)}"


async def in_domu(peer: Peer, action: str, *args: object, timeout: float = 300.0) -> str:
    """Run a ``peer`` action in the domU (foreground) while dom0's loop keeps running."""
    return await asyncio.to_thread(peer.run, loop_name(), action, *args, timeout=timeout)


async def test_domu_runs_aioxen(peer: Peer) -> None:
    """The domU's aioxen learns its own domid through /dev/xen/xenbus (it is no dom0)."""
    out = await in_domu(peer, "info")
    assert int(field(out, "domid")) == peer.domid != 0, out


# --------------------------------------------------------------------------- vchan


async def _dom0_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, nbytes: int, seed: int
) -> tuple[int, str]:
    data = stream(seed, nbytes)

    async def send() -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    h = hashlib.sha256()
    got = 0
    while chunk := await asyncio.wait_for(reader.read(1 << 16), HANG):
        h.update(chunk)
        got += len(chunk)
    await asyncio.wait_for(sender, HANG)
    return got, h.hexdigest()


BULK = 3 * MIB + 17  # three times a 1 MiB ring, and not a multiple of anything


async def test_vchan_domu_client_to_dom0_server(plat: XenPlatform, peer: Peer) -> None:
    """1 MiB rings each way, 3 MiB + 17 checksummed bytes each way at once."""
    port = port_name()
    done: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            done.set_result(await _dom0_exchange(reader, writer, BULK, 1))
        except BaseException as exc:
            done.set_exception(exc)
        finally:
            writer.close()

    server = await vchan.start_server(
        on_client, peer.domid, port, platform=plat, read_size=MIB, write_size=MIB
    )
    async with server:
        task = asyncio.ensure_future(in_domu(peer, "vchan-client", 0, port, MIB, BULK, 2))
        got, digest = await first_of(asyncio.wait_for(done, HANG), task)
        out = await task
    assert (got, digest) == (BULK, sha(stream(2, BULK)))
    assert field(out, "received") == str(BULK) and field(out, "sha256") == sha(stream(1, BULK))


async def first_of(coro: Awaitable[T], domu_task: asyncio.Future[Any]) -> T:
    """``coro``'s result; if the domU's half (``domu_task``) fails first, its error at
    once (instead of waiting out ``coro``'s hang guard)."""
    mine = asyncio.ensure_future(coro)
    await asyncio.wait([mine, domu_task], return_when=asyncio.FIRST_COMPLETED)
    if not mine.done() and domu_task.exception() is not None:
        mine.cancel()
        raise domu_task.exception()  # type: ignore[misc]
    return await mine


async def test_vchan_dom0_client_to_domu_server(plat: XenPlatform, peer: Peer) -> None:
    port = port_name()
    task = asyncio.ensure_future(in_domu(peer, "vchan-server", 0, port, MIB, BULK, 3))
    try:
        reader, writer = await first_of(
            vchan.open_connection(
                peer.domid, port, platform=plat, read_size=MIB, write_size=MIB, timeout=HANG
            ),
            task,
        )
        got, digest = await _dom0_exchange(reader, writer, BULK, 4)
        writer.close()
        out = await asyncio.wait_for(task, HANG)
    finally:
        if not task.done():
            await asyncio.wait([task], timeout=HANG)
    assert (got, digest) == (BULK, sha(stream(3, BULK)))
    assert field(out, "received") == str(BULK) and field(out, "sha256") == sha(stream(4, BULK))


async def test_vchan_killed_domu_client_is_noticed(plat: XenPlatform, peer: Peer) -> None:
    """kill -9 of the domU's client: its unmap notify (done by the domU's kernel) ends
    dom0's reader, as EOF or ConnectionResetError, instead of a hang."""
    port = port_name()
    got: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await got.put((reader, writer))

    server = await vchan.start_server(on_client, peer.domid, port, platform=plat)
    async with server:
        proc = await asyncio.to_thread(peer.spawn, loop_name(), "vchan-hold", "client", 0, port)
        ready = asyncio.ensure_future(asyncio.to_thread(proc.wait_for, "^READY"))
        reader, _writer = await first_of(asyncio.wait_for(got.get(), HANG), ready)
        assert await asyncio.wait_for(reader.readline(), HANG) == b"hello from the domU\n"
        await ready
        await asyncio.to_thread(proc.kill9)
        try:
            rest = await asyncio.wait_for(reader.read(), HANG)
        except ConnectionResetError:
            rest = b""
        assert rest == b""


DOM0_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from aioxen import vchan
    from aioxen.platforms.xen import XenPlatform

    async def main(domid, port):
        async with XenPlatform() as plat:
            reader, writer = await vchan.open_connection(domid, port, platform=plat, timeout=300)
            line = await reader.readline()
            print("READY", line.decode().strip(), flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
    """
)


async def test_vchan_killed_dom0_client_is_noticed_in_domu(plat: XenPlatform, peer: Peer) -> None:
    """kill -9 of a dom0 process holding a vchan to a domU server: the domU's reader ends."""
    port = port_name()
    proc = await asyncio.to_thread(peer.spawn, loop_name(), "vchan-hold", "server", 0, port)
    await asyncio.to_thread(proc.wait_for, "^LISTENING")
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DOM0_HOLDER, str(peer.domid), port,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), HANG)
        assert line == b"READY hello from the domU\n"
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
        m = await asyncio.to_thread(proc.wait_for, r"^RESULT (eof rest=0|reset .*)$")
        assert m
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        await asyncio.to_thread(proc.kill9_if_alive)


# --------------------------------------------------------------------------- grants + events


async def test_event_channel_ping_pong(plat: XenPlatform, peer: Peer) -> None:
    ch = await plat.events.listen(peer.domid)
    proc = await asyncio.to_thread(peer.spawn, loop_name(), "events", 0, ch.port, 20)
    try:
        await asyncio.to_thread(proc.wait_for, "^READY")
        for _ in range(20):
            ch.notify()
            await ch.wait(timeout=HANG)
        await asyncio.to_thread(proc.wait_for, "^RESULT rounds=20")
    finally:
        ch.close()


async def test_domu_maps_dom0_grant(plat: XenPlatform, peer: Peer) -> None:
    share = plat.grants.share(peer.domid, 3)
    share.buf[:] = stream(5, 3 * PAGE_SIZE)
    refs = ",".join(map(str, share.refs))
    out = await in_domu(peer, "map", 0, refs, 1, "-")
    assert field(out, "sha256") == sha(stream(5, 3 * PAGE_SIZE))
    assert field(out, "readonly") == "False"
    assert bytes(share.buf[1:6]) == b"domU!"  # the domU wrote into dom0's pages
    share.close()


async def test_domu_maps_readonly_grant(plat: XenPlatform, peer: Peer) -> None:
    share = plat.grants.share(peer.domid, 1, writable=False)
    share.buf[:] = stream(6, PAGE_SIZE)
    out = await in_domu(peer, "map", 0, share.refs[0], 0, "-")
    assert field(out, "sha256") == sha(stream(6, PAGE_SIZE))
    assert field(out, "readonly") == "True"
    bad = await asyncio.to_thread(
        peer.console.run, peer.command(loop_name(), "map", 0, share.refs[0], 1, "-"), 300, False
    )
    assert "ERROR PermissionError" in bad and f"ref {share.refs[0]}" in bad, bad
    share.close()


async def test_grant_to_another_domain_is_refused_in_domu(plat: XenPlatform, peer: Peer) -> None:
    share = plat.grants.share(peer.domid + 50, 1)  # offered to a domain that is not the domU
    bad = await asyncio.to_thread(
        peer.console.run, peer.command(loop_name(), "map", 0, share.refs[0], 0, "-"), 300, False
    )
    assert re.search(r"ERROR (PermissionError|FileNotFoundError)", bad), bad
    share.close()


async def test_killed_domu_mapper_fires_unmap_notify(plat: XenPlatform, peer: Peer) -> None:
    """The domU's process maps dom0's page with an unmap notify (clear byte 0, notify the
    channel); kill -9 in the domU: the domU's kernel does both, dom0 sees them."""
    share = plat.grants.share(peer.domid, 1)
    share.buf[0] = 1
    ch = await plat.events.listen(peer.domid)
    proc = await asyncio.to_thread(peer.spawn, loop_name(), "map", 0, share.refs[0], 1, ch.port)
    try:
        await asyncio.to_thread(proc.wait_for, "^READY")
        assert bytes(share.buf[1:6]) == b"domU!" and share.buf[0] == 1
        await asyncio.to_thread(proc.kill9)
        await ch.wait(timeout=HANG)
        assert share.buf[0] == 0
    finally:
        ch.close()
    share.close()


async def test_dom0_maps_domu_grant(plat: XenPlatform, peer: Peer) -> None:
    """The domU shares (gntalloc in a guest), dom0 maps, reads, writes, and notifies."""
    proc = await asyncio.to_thread(peer.spawn, loop_name(), "share", 0, 4, 1, 7)
    m = await asyncio.to_thread(proc.wait_for, r"^READY refs=(\S+) port=(\d+)")
    refs = [int(r) for r in m.group(1).split(",")]
    mapping = plat.grants.map(peer.domid, refs)
    ro = plat.grants.map(peer.domid, refs[::-1], writable=False)
    try:
        assert bytes(mapping.buf) == stream(7, 4 * PAGE_SIZE)
        assert bytes(ro.buf[:PAGE_SIZE]) == bytes(mapping.buf[3 * PAGE_SIZE :])
        for i in range(4):
            mapping.buf[i * PAGE_SIZE] = 0xA0 + i
        ch = await plat.events.connect(peer.domid, int(m.group(2)))
        await ch.wait(timeout=HANG)  # Xen's bind event
        ch.notify()
        await ch.wait(timeout=HANG)
        done = await asyncio.to_thread(proc.wait_for, r"^RESULT first=(\S+)")
        assert done.group(1) == "a0a1a2a3"
        ch.close()
    finally:
        ro.close()
        mapping.close()


# --------------------------------------------------------------------------- XenStore


async def test_xenstore_with_guest_permissions(plat: XenPlatform, peer: Peer) -> None:
    """The domU's aioxen on /dev/xen/xenbus: it may write its own data/ and read what
    dom0 granted; Xen's xenstored refuses the rest with EACCES."""
    granted = "/local/domain/0/data/aioxen-granted"
    private = "/local/domain/0/data/aioxen-private"
    await plat.store.write(granted, b"for-the-domU")
    await plat.store.set_perms(granted, [Perm(0, "n"), Perm(peer.domid, "r")])
    await plat.store.write(private, b"dom0-only")
    await plat.store.set_perms(private, [Perm(0, "n")])
    try:
        out = await in_domu(peer, "xenstore")
        got = dict(re.findall(r"^(\w+)=(.*)$", out, re.MULTILINE))
        d = peer.domid
        assert got["own_domid"] == f"ok:b'{d}'"
        assert got["own_path"] == f"ok:'/local/domain/{d}'"
        assert got["write_data"].startswith("ok")
        assert got["read_data"] == "ok:b'from-domU'" == got["read_relative"]
        assert got["read_dom0_granted"] == "ok:b'for-the-domU'"
        # dom0's own nodes are n0 (xen-init-dom0), so even its name and directory are
        # closed to the guest; and "r" lets it read, not remove.
        refused = ("read_dom0_name", "ls_dom0", "write_dom0", "write_root",
                   "read_dom0_private", "rm_dom0_granted")  # fmt: skip
        for name in refused:
            assert got[name] == "err:EACCES:True", (name, got)
        assert await plat.store.read(f"/local/domain/{d}/data/aioxen-test") == b"from-domU"
        assert await plat.store.read(granted) == b"for-the-domU"
    finally:
        await plat.store.rm(granted)
        await plat.store.rm(private)


async def test_xenstore_watch_from_domu(plat: XenPlatform, peer: Peer) -> None:
    path = "/local/domain/0/data/aioxen-watched"
    await plat.store.write(path, b"0")
    await plat.store.set_perms(path, [Perm(0, "n"), Perm(peer.domid, "r")])
    proc = await asyncio.to_thread(peer.spawn, loop_name(), "watch", path, 2)
    try:
        await asyncio.to_thread(proc.wait_for, "^READY")
        await plat.store.write(path, b"1")
        await asyncio.to_thread(proc.wait_for, "^EVENT ")
        await plat.store.write(path, b"2")
        await asyncio.to_thread(proc.wait_for, "^RESULT done")
        assert proc.output().count(f"EVENT {path}") == 2
    finally:
        await plat.store.rm(path)


# --------------------------------------------------------------------------- pytest in the domU

TREE = Path(__file__).resolve().parents[3]
PEER_DIR = "tests/xenlab/peer"
PEER_JUNIT = "/tmp/peer-junit.xml"  # in the domU


@functools.cache
def peer_manifest() -> list[str]:
    """Node ids of ``tests/xenlab/peer``, collected here (the domU runs the same files)."""
    env = dict(os.environ, AIOXEN_XENLAB_PEER="1")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-p", "no:hypothesispytest", PEER_DIR],
        cwd=TREE, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    ids = [ln.strip() for ln in out.stdout.splitlines() if ln.startswith(PEER_DIR + "/")]
    if out.returncode != 0 or not ids:
        raise RuntimeError(f"collecting {PEER_DIR} failed (rc {out.returncode}):\n{out.stdout}")
    return ids


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "peer_test" in metafunc.fixturenames:
        ids = peer_manifest()
        metafunc.parametrize("peer_test", ids, ids=ids)


def junit_outcomes(xml: str) -> dict[str, str]:
    """``nodeid-like key -> "passed" or what went wrong`` from pytest's junit XML."""
    outcomes: dict[str, str] = {}
    for case in ET.fromstring(xml).iter("testcase"):
        key = f"{case.get('classname', '')}::{case.get('name', '')}"
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = f"{tag}: {el.get('message', '')}\n{el.text or ''}".strip()
                break
        if outcomes.get(key, "passed") == "passed":
            outcomes[key] = status
    return outcomes


def junit_key(nodeid: str) -> str:
    """``classname::name`` of ``nodeid`` as pytest's junit XML spells them."""
    path, bracket, params = nodeid.partition("[")
    parts = path.split("::")
    module = parts[0].removesuffix(".py").replace("/", ".")
    return ".".join([module, *parts[1:-1]]) + f"::{parts[-1]}{bracket}{params}"


@pytest.fixture(scope="module")
def peer_pytest(peer: Peer) -> dict[str, str]:
    """One pytest session in the domU over ``tests/xenlab/peer``; its junit outcomes."""
    env = (
        f"AIOXEN_XENLAB_PEER=1 XENLAB_PEER_DOMID={peer.domid} USER=root HOME=/tmp"
        " PYTEST_DISABLE_PLUGIN_AUTOLOAD=1"
    )
    run = (
        f"cd {TREE} && {peer.python_command(env)} -m pytest -p pytest_asyncio.plugin"
        f" -p pytest_timeout -p no:cacheprovider -q -rfE --timeout 200"
        f" --junitxml={PEER_JUNIT} {PEER_DIR} >/tmp/peer-pytest.log 2>&1; echo rc=$?"
    )
    out = peer.console.run(run, timeout=900)
    log = peer.console.run("cat /tmp/peer-pytest.log", timeout=120, check=False)
    (RESULTS / "peer-pytest.log").write_text(log)
    xml = peer.console.run(f"cat {PEER_JUNIT}", timeout=120, check=False)
    (RESULTS / "peer-junit.xml").write_text(xml)
    if "<testsuite" not in xml:
        pytest.fail(f"pytest in the domU left no junit XML ({out.strip()}):\n{log[-3000:]}")
    return junit_outcomes(xml)


def test_in_peer_domu(peer_pytest: dict[str, str], peer_test: str) -> None:
    """One test of the domU's own pytest session (``tests/xenlab/peer``)."""
    outcome = peer_pytest.get(junit_key(peer_test))
    assert outcome is not None, f"{peer_test} did not run in the domU"
    assert outcome == "passed", f"in the peer domU: {outcome}"
