"""The vchan <-> TCP bridge across real domains (``aioxen bridge`` and ``aioxen.bridge``).

Both ways round, with the peer domU (:mod:`peerdomu`) on the other side of the vchan:

* the domU offers a TCP service of its own (a server on the domU's 127.0.0.1,
  :mod:`peer_qrexec` ``bulk-server tcp``) to dom0 over vchan with the ``aioxen bridge``
  command (``--listen vchan:0/PORT --connect tcp:127.0.0.1:P``); dom0 connects with
  aioxen's vchan client;
* dom0 bridges a TCP listener to a vchan server in the domU with the library
  (:func:`aioxen.bridge.start_bridge`, ``tcp:127.0.0.1:0`` -> ``vchan:DOMU/PORT``); dom0
  connects over TCP.

Each time several connections run at once, each with checksummed bulk both ways
(:func:`peer_qrexec.bulk_client` / :func:`peer_qrexec.serve_bulk`), on the default
ring size (64 KiB each way); then the bridge is torn down with a connection still open,
which ends with a clean EOF, and the bridge leaves nothing behind (no connection, no
advertisement in XenStore).  With 1 MiB rings the domU's bridge meets Xen's gntalloc
limit (1,024 pages; one such vchan holds 513) and serves concurrent clients in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from crossdomain import loop_name, sha
from peer import stream
from peer_qrexec import bulk_client, command, exit_status, spawn
from peerdomu import Peer, Spawned

from aioxen import bridge, vchan
from aioxen.platforms.xen import XenPlatform

HANG = 180.0  # hang guard only: the domU's Python under TCG is slow
KIB = 1 << 10
MIB = 1 << 20
BULK = 384 * KIB + 5  # per connection and direction: six 64 KiB rings' worth, and then some
CONNECTIONS = 4
_ids = itertools.count()


def port_name() -> str:
    return f"br{os.getpid()}x{next(_ids)}"


@pytest.fixture(scope="module", autouse=True)
def dom0_loopback() -> None:
    """dom0's 127.0.0.1 (autouse: set up before the module's ``peer`` from conftest)."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


async def wait_conn_lines(server: Spawned, seeds: list[int], nbytes: int = BULK) -> None:
    """Wait until the domU's server reports each connection's bytes (the ``CONN`` lines
    of ``bulk-server``; a client can finish before the server has read its EOF)."""
    for seed in seeds:
        line = f"CONN seed={seed} received={nbytes} sha256={sha(stream(seed + 1, nbytes))}"
        m = await asyncio.to_thread(server.wait_for, f"^CONN seed={seed} .*$", HANG)
        assert m.group(0) == line


async def bulk_connections(
    open_one: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
    seeds: list[int],
    nbytes: int = BULK,
) -> list[tuple[int, str]]:
    """One connection per seed, all at once, each with ``nbytes`` both ways."""

    async def one(seed: int) -> tuple[int, str]:
        reader, writer = await open_one()
        try:
            return await asyncio.wait_for(bulk_client(reader, writer, seed, nbytes), HANG)
        finally:
            writer.close()

    return await asyncio.gather(*(one(s) for s in seeds))


@contextlib.asynccontextmanager
async def domu_bridge(peer: Peer, count: int, *options: str) -> AsyncIterator[DomuBridge]:
    """``bulk-server tcp`` for ``count`` connections and ``aioxen bridge --listen
    vchan:0/PORT --connect tcp:127.0.0.1:P OPTIONS`` in front of it, both in the domU."""
    port = port_name()
    tcp_port = 7000 + next(_ids)
    server = await asyncio.to_thread(
        spawn, peer, command(peer, loop_name(), "bulk-server", "tcp", tcp_port, count)
    )
    procs = [server]
    try:
        await asyncio.to_thread(server.wait_for, "^READY", HANG)
        bridge_cmd = (
            f"{peer.python_command()} -m aioxen bridge -v --listen vchan:0/{port}"
            f" --connect tcp:127.0.0.1:{tcp_port} {' '.join(options)}"
        )
        proc = await asyncio.to_thread(spawn, peer, bridge_cmd)
        procs.append(proc)
        await asyncio.to_thread(proc.wait_for, "listening on vchan", HANG)
        yield DomuBridge(port, server, proc)
    finally:
        for p in procs:
            await asyncio.to_thread(p.kill9_if_alive)


@dataclasses.dataclass
class DomuBridge:
    port: str
    server: Spawned  # the TCP server
    proc: Spawned  # aioxen bridge


async def test_domu_bridge_command_offers_its_tcp_service_over_vchan(
    plat: XenPlatform, peer: Peer
) -> None:
    async with domu_bridge(peer, CONNECTIONS + 1) as br:
        seeds = [100 + 10 * i for i in range(CONNECTIONS)]
        results = await bulk_connections(
            lambda: vchan.open_connection(peer.domid, br.port, platform=plat, timeout=HANG),
            seeds,
        )
        assert results == [(BULK, sha(stream(s, BULK))) for s in seeds]
        await wait_conn_lines(br.server, seeds)
        # Teardown with a connection open: SIGTERM to the bridge closes it cleanly.
        reader, writer = await vchan.open_connection(
            peer.domid, br.port, platform=plat, timeout=HANG
        )
        writer.write(b"HOLD\n")
        assert await asyncio.wait_for(reader.readline(), HANG) == b"held\n"
        await asyncio.to_thread(peer.console.run, f"kill -TERM {br.proc.pid}")
        assert await asyncio.wait_for(reader.read(), HANG) == b""  # EOF, not a reset
        writer.close()
        await asyncio.to_thread(br.server.wait_for, r"^RESULT done", HANG)
        assert "CONN hold eof rest=0" in await asyncio.to_thread(br.server.output)
        status = None
        async with asyncio.timeout(HANG):
            while status is None:
                status = await asyncio.to_thread(exit_status, br.proc)
        assert status == 128 + signal.SIGTERM, await asyncio.to_thread(br.proc.output)
        ad = f"/local/domain/{peer.domid}/data/vchan/0/{br.port}"
        assert not await plat.store.exists(ad), f"{ad} left behind"


async def test_domu_bridge_with_1mib_rings_waits_at_the_grant_limit(
    plat: XenPlatform, peer: Peer
) -> None:
    """1 MiB rings: one connection holds 513 of the domU's 1,024 gntalloc pages, so the
    bridge (the vchan server) cannot make a second endpoint while it lasts; three
    connections at once are served in turn, none fails."""
    nbytes = MIB + 5
    async with domu_bridge(peer, 3, "--buffer-size", str(MIB)) as br:
        seeds = [300, 310, 320]
        results = await bulk_connections(
            lambda: vchan.open_connection(peer.domid, br.port, platform=plat, timeout=HANG),
            seeds,
            nbytes,
        )
        assert results == [(nbytes, sha(stream(s, nbytes))) for s in seeds]
        await wait_conn_lines(br.server, seeds, nbytes)
        assert "cannot make the next endpoint" in await asyncio.to_thread(br.proc.output)


async def test_dom0_bridge_forwards_tcp_to_a_domu_vchan_service(
    plat: XenPlatform, peer: Peer
) -> None:
    port = port_name()
    server = await asyncio.to_thread(
        spawn,
        peer,
        command(peer, loop_name(), "bulk-server", "vchan", f"0/{port}", CONNECTIONS + 1),
    )
    try:
        await asyncio.to_thread(server.wait_for, "^READY", HANG)
        b = await bridge.start_bridge(
            "tcp:127.0.0.1:0", f"vchan:{peer.domid}/{port}", platform=plat,
            connect_timeout=HANG,
        )  # fmt: skip
        async with b:
            addr = b.listen_address
            assert isinstance(addr, bridge.TcpAddress)
            seeds = [200 + 10 * i for i in range(CONNECTIONS)]
            results = await bulk_connections(
                lambda: asyncio.open_connection("127.0.0.1", addr.port), seeds
            )
            assert results == [(BULK, sha(stream(s, BULK))) for s in seeds]
            await wait_conn_lines(server, seeds)
            assert b.accepted == CONNECTIONS
            # Teardown with a connection open: closing the bridge ends it with EOF.
            reader, writer = await asyncio.open_connection("127.0.0.1", addr.port)
            writer.write(b"HOLD\n")
            assert await asyncio.wait_for(reader.readline(), HANG) == b"held\n"
            await asyncio.wait_for(b.aclose(), HANG)
            assert await asyncio.wait_for(reader.read(), HANG) == b""
            writer.close()
            assert b.active == 0
        await asyncio.to_thread(server.wait_for, r"^RESULT done", HANG)
        out = await asyncio.to_thread(server.output)
        assert re.search(r"^CONN hold (eof rest=0|reset \w+)$", out, re.MULTILINE), out
    finally:
        await asyncio.to_thread(server.kill9_if_alive)
