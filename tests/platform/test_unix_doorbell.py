"""unix event channels ring an eventfd (or pipe) doorbell once connected.

After the hello each end passes the ringing end of its doorbell over the socket
(``SCM_RIGHTS``); from then on ``notify()`` rings it instead of sending a socket byte.
The switch must be invisible: no notification lost or invented (the marker byte that
carries the doorbell is no event), peer death still seen through the socket, nothing
leaked, and a peer passing something that is not a doorbell is notified by socket bytes.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from aioxen.platforms.unix import UnixPlatform

T = 10.0


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def settle(*channels: Any) -> None:
    """Let the doorbell hand-over complete (a few loop iterations; bounded)."""
    async with asyncio.timeout(T):
        while any(ch._peer_bell is None for ch in channels):
            await asyncio.sleep(0.001)


async def no_event(ch: Any) -> bool:
    try:
        await ch.wait(timeout=0.2)
    except TimeoutError:
        return True
    return False


async def test_doorbells_replace_socket_bytes_exactly(tmp_path: Path) -> None:
    before = open_fds()
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        ch = await a.events.listen(2)
        peer = await b.events.connect(1, ch.port)
        await peer.wait(timeout=T)  # the connector starts with one pending event (as Xen)
        await settle(ch, peer)
        assert await no_event(ch) and await no_event(peer)  # the marker is no notification
        for sender, receiver in ((ch, peer), (peer, ch)):
            for _ in range(3):  # coalesce into one
                sender.notify()
            await receiver.wait(timeout=T)
            assert await no_event(receiver)
            # nothing went over the socket: the doorbell carried it
            with pytest.raises(BlockingIOError):
                receiver._conn.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        peer.close()  # the socket still reports the peer gone
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(T):
                while True:
                    await ch.wait(timeout=T)
        ch.close()
    assert open_fds() == before  # doorbells closed with their channels


async def test_notify_before_the_hand_over_is_not_lost(tmp_path: Path) -> None:
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        ch = await a.events.listen(2)
        peer = await b.events.connect(1, ch.port)
        peer.notify()  # before anyone's loop ran: a socket byte, with the doorbell marker
        await ch.wait(timeout=T)
        ch.notify()  # the listener rings the connector's doorbell (or sends a byte)
        await peer.wait(timeout=T)  # the pending bind event or this one
        await settle(ch, peer)
        ch.notify()
        await peer.wait(timeout=T)
        ch.close()
        peer.close()


async def test_something_else_passed_as_a_doorbell_is_refused(tmp_path: Path) -> None:
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        ch = await a.events.listen(2)
        peer = await b.events.connect(1, ch.port)
        await settle(ch, peer)
        os.close(ch._peer_bell)
        ch._peer_bell = None  # as if the peer had passed nothing yet
        fd = os.open(tmp_path / "plain-file", os.O_CREAT | os.O_RDWR, 0o600)
        ch._adopt_doorbell([fd])
        assert ch._peer_bell is None
        with pytest.raises(OSError):
            os.fstat(fd)  # closed, not kept
        ch.notify()  # falls back to a socket byte
        await peer.wait(timeout=T)
        ch.close()
        peer.close()


async def test_no_doorbells_when_many_fds_are_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Doorbells cost two fds per channel: past a quarter of RLIMIT_NOFILE, socket bytes."""
    from aioxen.platforms import _unix_events

    monkeypatch.setattr(_unix_events, "doorbell_fd_limit", lambda: 0)
    before = open_fds()
    async with UnixPlatform(1, tmp_path) as a, UnixPlatform(2, tmp_path) as b:
        ch = await a.events.listen(2)
        peer = await b.events.connect(1, ch.port)
        await peer.wait(timeout=T)
        ch.notify()
        await peer.wait(timeout=T)
        peer.notify()
        await ch.wait(timeout=T)
        assert ch._bell is None and peer._bell is None
        assert ch._peer_bell is None and peer._peer_bell is None
        ch.close()
        peer.close()
    assert open_fds() == before
