"""unix event-channel ports: the kept-open port counter and the accept fast path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from aioxen.platforms._unix_events import allocate_port
from aioxen.platforms.unix import UnixPlatform

T = 10.0


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_ports_unique_across_objects_and_processes(tmp_path: Path) -> None:
    """Two platform objects playing one domid (each keeps its counter open), the
    open-per-call allocate_port and another process all draw from one counter."""
    async with UnixPlatform(1, tmp_path) as a1, UnixPlatform(1, tmp_path) as a2:
        ports = [(await a1.events.listen(2)).port, (await a2.events.listen(2)).port]
        d = str(tmp_path / "evtchn" / "1")
        ports.append(allocate_port(d))
        code = (
            "import sys; from aioxen.platforms._unix_events import allocate_port as a; "
            "print(' '.join(str(a(sys.argv[1])) for _ in range(5)))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, d], check=True, capture_output=True, text=True
        ).stdout
        ports += [int(x) for x in out.split()]
        for p in (a1, a2, a1):
            ports.append((await p.events.listen(2)).port)
        assert len(set(ports)) == len(ports) == 11
        assert sorted(ports) == list(range(1, 12))


async def test_counter_closed_with_the_platform(tmp_path: Path) -> None:
    before = open_fds()
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        for _ in range(3):
            ch = await a.events.listen(2)
            peer = await b.events.connect(1, ch.port)
            ch.close()
            peer.close()
    assert open_fds() == before


async def test_listener_gets_hello_and_first_event_together(tmp_path: Path) -> None:
    """The connector's hello and a notification sent before the listener's loop ran are
    both taken from the accepted socket: the port binds and the event is delivered."""
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        ch = await a.events.listen(2)
        peer = await b.events.connect(1, ch.port)
        peer.notify()
        await ch.wait(timeout=T)
        assert ch.remote_port == peer.port and ch.state == "connected"
        ch.notify()
        await peer.wait(timeout=T)  # the connector's bind event, then ours (coalesced)
        ch.close()
        peer.close()
