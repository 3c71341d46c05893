"""A Platform speaking the emulation of ``c/xenvchan_peer.c`` (the real libxenvchan).

Grants are 4096-byte files ``SHIM_DIR/g<ref>`` composed into contiguous ``MAP_FIXED``
regions (as the C side does); the single event channel is a connected Unix socket, one
byte per notification, EOF = the peer is gone.  Only what the vchan endpoint code uses is
implemented.  Unmap notifications clear the byte and send one event, as Linux does.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aioxen import native
from aioxen.platforms._channel import ChannelCore
from aioxen.platforms.base import PAGE_SIZE, EventChannel, Platform


class ShimChannel(ChannelCore):
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, port: int) -> None:
        super().__init__(loop, port, 1, 0)
        self._sock = sock
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self._sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._events_arrived()
        else:
            self._loop.remove_reader(self._sock.fileno())
            self._peer_gone()

    def notify(self) -> None:
        if not self._closed:
            with contextlib.suppress(OSError):
                self._sock.send(b"\1", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._mark_closed()


class _Events:
    def __init__(self, plat: ShimPlatform) -> None:
        self._plat = plat

    async def listen(self, remote_domid: int) -> EventChannel:
        return self._plat._take_channel(7)

    async def connect(self, remote_domid: int, remote_port: int) -> EventChannel:
        return self._plat._take_channel(8)


class _Region:
    """``count`` ref files mapped contiguously."""

    def __init__(self, directory: Path, refs: Sequence[int], writable: bool, create: bool) -> None:
        self.refs = list(refs)
        self.dir = directory
        self.owner = create
        self._mm = mmap.mmap(-1, len(refs) * PAGE_SIZE)
        base = native.address_of(self._mm)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        for i, ref in enumerate(refs):
            path = directory / f"g{ref}"
            if create:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                os.ftruncate(fd, PAGE_SIZE)
            else:
                fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
            try:
                native.mmap_fixed(base + i * PAGE_SIZE, PAGE_SIZE, prot, fd, 0)
            finally:
                os.close(fd)
        view = memoryview(self._mm)
        self._view: memoryview | None = view if writable else view.toreadonly()
        if not writable:
            view.release()
        self._notify: tuple[int | None, EventChannel | None] = (None, None)

    @property
    def buf(self) -> memoryview:
        assert self._view is not None
        return self._view

    @property
    def writable(self) -> bool:
        return self._view is not None and not self._view.readonly

    @property
    def remote_domid(self) -> int:
        return 1

    def set_unmap_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        self._notify = (offset, channel)

    def close(self) -> None:
        if self._view is None:
            return
        offset, channel = self._notify
        if offset is not None:
            self._mm[offset] = 0
        self._view.release()
        self._view = None
        self._mm.close()
        if self.owner:
            for ref in self.refs:
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / f"g{ref}").unlink()
        if channel is not None:
            channel.notify()


class _Grants:
    def __init__(self, plat: ShimPlatform) -> None:
        self._plat = plat
        self._next = 1000

    def share(self, remote_domid: int, npages: int, writable: bool = True) -> Any:
        refs = list(range(self._next, self._next + npages))
        self._next += npages
        return _Region(self._plat.dir, refs, True, True)

    async def map_async(self, remote_domid: int, refs: Sequence[int], writable: bool = True) -> Any:
        return self.map(remote_domid, refs, writable)

    def map(self, remote_domid: int, refs: Sequence[int], writable: bool = True) -> Any:
        try:
            return _Region(self._plat.dir, refs, writable, False)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"grant refs {list(refs)} of domain 1: {exc}") from None


class ShimPlatform(Platform):
    """Domain 0 of a two-domain world shared with one ``xenvchan_peer`` process."""

    name = "shim"

    def __init__(self, directory: Path, sock: socket.socket) -> None:
        super().__init__(0)
        self.dir = directory
        self._sock: socket.socket | None = sock
        self._events = _Events(self)
        self._grants = _Grants(self)

    def _take_channel(self, port: int) -> ShimChannel:
        sock, self._sock = self._sock, None
        assert sock is not None, "the shim has a single event channel"
        return ShimChannel(asyncio.get_running_loop(), sock, port)

    @property
    def events(self) -> Any:
        return self._events

    @property
    def grants(self) -> Any:
        return self._grants

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
