"""Soak: sequential qrexec calls through ``aioxen qrexec daemon`` and ``aioxen qrexec
agent`` running as real processes on the ``unix`` platform (one ``aioxen xenstored``),
called from this process as a dom0 client (the daemon's client socket, then the data
vchan).  The daemon's and the agent's descriptor counts must not grow, nor their memory
(beyond a generous bound), over the run.

The call count is ``$AIOXEN_QREXEC_SOAK_CALLS`` (default 10,000), bounded in time by
``$AIOXEN_QREXEC_SOAK_SECONDS`` (default 45 s, so the CI run stays short; 0 = no bound):
the run stops at the bound, but never before 500 calls, and says how many it made.  The
full 10,000-call soak (several minutes on a loaded machine) is::

    AIOXEN_QREXEC_SOAK_SECONDS=0 .venv/bin/python -m pytest -s tests/qrexec/test_soak.py

A call costs a few milliseconds of vchan setup (XenStore round trips through the
xenstored process) besides the call itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.xenstored import Xenstored
from vchan_harness import UnixWorld

from aioxen import qrexec
from aioxen.qrexec import VchanChannels

CALLS = int(os.environ.get("AIOXEN_QREXEC_SOAK_CALLS", "10000"))
BUDGET = float(os.environ.get("AIOXEN_QREXEC_SOAK_SECONDS", "45"))
"""Stop early (after at least MIN_CALLS) when the calls take longer than this; 0: never."""
MIN_CALLS = 500
WARMUP = 200
WORK = 2
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.xs = Xenstored(tmp / "root")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.qdir = tmp / "dom0"
        self.qdir.mkdir(mode=0o700)
        self.rpc = tmp / "rpc"
        self.rpc.mkdir()
        (self.rpc / "test.Echo").symlink_to("/bin/cat")

    def start(self, domid: int, *args: str) -> subprocess.Popen[bytes]:
        r, w = os.pipe()
        p = subprocess.Popen(
            [sys.executable, "-m", "aioxen", "qrexec", *args, "--ready-fd", str(w)],
            env=self.xs.env(domid),
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(w)
        self.procs.append(p)
        with os.fdopen(r, "rb") as ready:
            assert ready.read(), f"{args[0]} never became ready (rc {p.wait(10)})"
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            rc = p.wait(30)
            assert p.stderr is not None
            err = p.stderr.read().decode()
            p.stderr.close()
            assert rc == 143, (p.args, rc, err)
            assert "Traceback" not in err, err


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    try:
        yield ps
        ps.stop()
    finally:
        for p in ps.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert ps.xs.stop() == 0


async def echo_socket_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A Qubes socket service: the agent sends ``"name+arg source\\0"``, then the call's
    stdin; echo the stdin back and close at its end."""
    try:
        descriptor = await reader.readuntil(b"\0")
        assert descriptor == b"test.Sock+ dom0\0", descriptor
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def test_sequential_calls_no_fd_or_memory_growth(procs: Procs) -> None:
    """Up to ``CALLS`` sequential calls (every tenth runs the executable ``cat``, the
    others a socket service); the daemon's and agent's descriptors and memory stay flat.

    A synchronous test on purpose: the loops under test are the daemon's and the agent's,
    in their own processes; this process only drives them (running it once per event
    loop would double a multi-minute test for nothing)."""
    asyncio.run(_soak(procs))


async def _soak(procs: Procs) -> None:
    server = await asyncio.start_unix_server(echo_socket_service, str(procs.rpc / "test.Sock"))
    agent = procs.start(WORK, "agent", "--services-dir", str(procs.rpc))
    daemon = procs.start(0, "daemon", "--domain", f"work={WORK}", "--socket-dir", str(procs.qdir))
    world = UnixWorld(procs.xs)
    dom0 = VchanChannels(await world.platform(0))
    own = os.getpid()

    async def one(i: int) -> None:
        data = i.to_bytes(4, "little")
        service = "test.Echo" if i % 10 == 0 else "test.Sock"
        r = await qrexec.call("work", service, input=data, via=procs.qdir, channels=dom0)
        assert (r.stdout, r.stderr, r.exit_code) == (data, b"", 0), (i, service, r)

    try:
        for i in range(WARMUP):
            await one(i)
        await asyncio.sleep(0.5)  # let the last call's CONNECTION_TERMINATED settle
        before = {p: (fd_count(p), rss_kib(p)) for p in (agent.pid, daemon.pid, own)}
        t0 = time.perf_counter()
        made = 0
        while made < CALLS:
            await one(made)
            made += 1
            if BUDGET and made >= MIN_CALLS and time.perf_counter() - t0 > BUDGET:
                break
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        after = {p: (fd_count(p), rss_kib(p)) for p in (agent.pid, daemon.pid, own)}
    finally:
        server.close()
        leaks = world.leaks()
        await world.close()
        assert leaks == [], leaks
    report = {
        name: (before[p], after[p])
        for name, p in (("agent", agent.pid), ("daemon", daemon.pid), ("test", own))
    }
    print(
        f"\nqrexec soak: {made} of {CALLS} calls in {elapsed:.1f} s "
        f"({made / elapsed:.0f} calls/s, {elapsed / made * 1e3:.2f} ms each); "
        f"(fds, RSS KiB) before/after: {report}"
    )
    for name, ((fd0, rss0), (fd1, rss1)) in report.items():
        assert fd1 <= fd0, f"{name}: descriptors grew from {fd0} to {fd1} over {made} calls"
        assert rss1 - rss0 < 32 * 1024, f"{name}: RSS grew from {rss0} to {rss1} KiB"
