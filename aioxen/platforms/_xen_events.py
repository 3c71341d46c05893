"""Event channels of the ``xen`` platform, over one ``/dev/xen/evtchn`` fd.

Theory of operation
-------------------
A platform object opens the evtchn device once, makes the fd non-blocking (uvloop would
anyway) and watches it with ``loop.add_reader``.  [`XenEventChannels.listen`][] binds an
unbound port (``BIND_UNBOUND_PORT``), [`XenEventChannels.connect`][] binds to a peer's
(``BIND_INTERDOMAIN``); each bound port is registered with a pure
[`PortDispatcher`][aioxen.platforms._xen_dispatch.PortDispatcher].

Each readiness callback reads *one* u32 port (``EAGAIN``: a spurious wake-up; the reader is
level-triggered, so remaining ports call again), writes it straight back — the kernel keeps a
port masked from the moment it fires until it is written back — and then dispatches it to
its [`XenEventChannel`][], whose [`ChannelCore`][aioxen.platforms._channel.ChannelCore] sets the
coalescing flag and wakes ``wait()`` or calls the handler.  ``EFBIG`` (the kernel's port ring
overflowed) is answered with ``IOCTL_EVTCHN_RESET``, an unmask of every bound port (ports
whose entries were lost would otherwise stay masked for ever) and one batch for every
channel.  Any other read/write failure of the device marks every channel's peer as lost.

**The connecting side starts with one event.**  Xen marks a port pending as it is bound
with ``BIND_INTERDOMAIN`` (notifications sent to the still-unbound peer port may have been
lost), so the first ``wait()`` after [`XenEventChannels.connect`][] returns at once.
Events are hints to re-check shared state, so this is harmless; it is not filtered out
because it cannot be told apart from a real notification sent before the bind.

**Peer loss.**  Xen tells nobody when the other end of an interdomain channel is closed or
its domain dies: the peer's port just reverts to *unbound* and notifications are dropped.
On Xen a protocol learns of a dead peer from shared memory: the peer's unmap notify clears
a "live" byte and sends one last event (vchan's crash detection).  So
[`XenEventChannel.peer_lost`][] stays false unless the device reports an error —
``NOTIFY`` failing (the port is no longer ours) or the fd failing.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable

from aioxen.platforms import xen_abi as abi
from aioxen.platforms._channel import ChannelCore
from aioxen.platforms._xen_device import Device
from aioxen.platforms._xen_dispatch import PortDispatcher
from aioxen.platforms.base import DOMID_SELF, check_domid


class XenEventChannel(ChannelCore):
    """One bound port on the platform's evtchn fd."""

    def __init__(
        self,
        owner: XenEventChannels,
        loop: asyncio.AbstractEventLoop,
        port: int,
        remote_domid: int,
        local_domid: int,
    ) -> None:
        super().__init__(loop, port, remote_domid, local_domid)
        self._owner = owner

    async def wait(self, timeout: float | None = None) -> None:
        try:
            await super().wait(timeout)
        except TimeoutError as exc:
            if exc.args:
                raise
            raise TimeoutError(f"no event on {self._describe()} within {timeout} s") from None

    def notify(self) -> None:
        """Send one event.  A no-op after ``close()`` or once the peer is known lost."""
        if self._closed or self._peer_lost:
            return
        try:
            self._owner._ioctl(abi.IOCTL_EVTCHN_NOTIFY, abi.pack_arg(abi.EVTCHN_NOTIFY, self._port))
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.EINVAL, errno.EBADF):
                self._peer_gone()
                return
            raise

    def close(self) -> None:
        """Unbind the port.  Idempotent; a pending ``wait`` raises ``ConnectionResetError``."""
        if self._closed:
            return
        self._mark_closed()
        self._owner._unbind(self._port)


class XenEventChannels:
    """The EVENTS signature over one ``/dev/xen/evtchn`` fd.

    ``local_domid`` returns this domain's id for messages (``DOMID_SELF`` if not yet known).
    """

    def __init__(self, device_dir: str, local_domid: Callable[[], int | None]) -> None:
        self._device_dir = device_dir
        self._local_domid = local_domid
        self._dev: Device | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher = PortDispatcher()
        self._channels: dict[int, XenEventChannel] = {}
        self._failed: OSError | None = None
        self._closed = False
        self.overflows = 0
        """How many times the kernel's port ring overflowed (``EFBIG``) and was reset."""

    # -- lifecycle -----------------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the device and start watching it on ``loop`` (idempotent)."""
        if self._closed:
            raise ValueError("the xen platform's event channels are closed")
        if self._dev is not None:
            if loop is not self._loop:
                raise RuntimeError("this xen platform's event channels belong to another loop")
            return
        dev = Device(self._device_dir, "evtchn")
        try:
            os.set_blocking(dev.fd, False)
            loop.add_reader(dev.fd, self._readable)
        except BaseException:
            dev.close()
            raise
        self._dev = dev
        self._loop = loop

    def close(self) -> None:
        """Unbind every port and close the device (closing the fd unbinds too)."""
        self._closed = True
        for ch in list(self._channels.values()):
            ch.close()
        dev, self._dev = self._dev, None
        if dev is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(dev.fd)
            dev.close()

    def live(self) -> list[XenEventChannel]:
        """Channels bound here and not yet closed."""
        return list(self._channels.values())

    @property
    def bound_ports(self) -> list[int]:
        """Ports currently bound through this object."""
        return list(self._channels)

    def _device(self) -> tuple[Device, asyncio.AbstractEventLoop]:
        loop = asyncio.get_running_loop()
        self.open(loop)
        assert self._dev is not None
        return self._dev, loop

    def _ioctl(self, request: int, arg: bytearray | None) -> int:
        if self._dev is None:
            raise OSError(errno.EBADF, f"{self._device_dir}/evtchn is not open")
        return self._dev.ioctl(request, arg)

    # -- EVENTS --------------------------------------------------------------------------

    async def listen(self, remote_domid: int) -> XenEventChannel:
        check_domid(remote_domid, "remote_domid")
        dev, loop = self._device()
        try:
            port = dev.ioctl(
                abi.IOCTL_EVTCHN_BIND_UNBOUND_PORT,
                abi.pack_arg(abi.EVTCHN_BIND_UNBOUND_PORT, remote_domid),
            )
        except OSError as exc:
            raise _error(exc, f"cannot allocate a port for domain {remote_domid}") from None
        return self._register(loop, port, remote_domid)

    async def connect(self, remote_domid: int, remote_port: int) -> XenEventChannel:
        check_domid(remote_domid, "remote_domid")
        if isinstance(remote_port, bool) or not isinstance(remote_port, int):
            raise TypeError(f"remote_port must be an int, not {type(remote_port).__name__}")
        if not 0 < remote_port < 2**32:
            raise ValueError(f"remote_port {remote_port} is not a valid event channel port")
        dev, loop = self._device()
        try:
            port = dev.ioctl(
                abi.IOCTL_EVTCHN_BIND_INTERDOMAIN,
                abi.pack_arg(abi.EVTCHN_BIND_INTERDOMAIN, remote_domid, remote_port),
            )
        except OSError as exc:
            where = f"port {remote_port} of domain {remote_domid}"
            code = exc.errno or errno.EIO
            if code in (errno.EINVAL, errno.ESRCH, errno.ENOENT):
                # Xen says EINVAL for "no such port", "not unbound" and "offered to another
                # domain" alike, ESRCH for "no such domain".
                raise ConnectionRefusedError(
                    code,
                    f"cannot bind to {where}: no unbound port offered to this domain there "
                    f"({os.strerror(code)})",
                ) from None
            raise _error(exc, f"cannot bind to {where}") from None
        return self._register(loop, port, remote_domid)

    def _register(
        self, loop: asyncio.AbstractEventLoop, port: int, remote_domid: int
    ) -> XenEventChannel:
        local = self._local_domid()
        ch = XenEventChannel(self, loop, port, remote_domid, DOMID_SELF if local is None else local)
        if self._dispatcher.remove(port) is not None:  # the kernel reused a port: drop stale
            self._channels.pop(port, None)
        self._dispatcher.add(port, ch)
        self._channels[port] = ch
        if self._failed is not None:
            ch._peer_gone()
        return ch

    def _unbind(self, port: int) -> None:
        ch = self._channels.pop(port, None)
        self._dispatcher.remove(port)
        if ch is None or self._dev is None:
            return
        try:
            self._dev.ioctl(abi.IOCTL_EVTCHN_UNBIND, abi.pack_arg(abi.EVTCHN_UNBIND, port))
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EINVAL, errno.EBADF):
                raise

    # -- the reader callback -------------------------------------------------------------

    def _readable(self) -> None:
        dev = self._dev
        if dev is None or dev.closed:
            return
        try:
            data = os.read(dev.fd, abi.EVTCHN_PORT.size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                self._overflow(dev)
            else:
                self._device_failed(dev, exc)
            return
        ports = self._dispatcher.parse(data)
        self._unmask(dev, self._dispatcher.to_unmask(ports))
        for port in ports:
            self._dispatcher.dispatch(port)

    def _unmask(self, dev: Device, ports: list[int]) -> None:
        if not ports:
            return
        try:
            os.write(dev.fd, self._dispatcher.encode(ports))
        except OSError as exc:
            self._device_failed(dev, exc)

    def _overflow(self, dev: Device) -> None:
        self.overflows += 1
        try:
            dev.ioctl(abi.IOCTL_EVTCHN_RESET, None)
        except OSError as exc:
            self._device_failed(dev, exc)
            return
        self._unmask(dev, self._dispatcher.ports())  # unmasking an unmasked port is a no-op
        self._dispatcher.fire_all()

    def _device_failed(self, dev: Device, exc: OSError) -> None:
        if self._failed is not None:
            return
        self._failed = exc
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(dev.fd)
            self._loop.call_exception_handler(
                {"message": f"{dev.path} failed; its event channels are lost", "exception": exc}
            )
        self._dispatcher.lose_all()


def _error(exc: OSError, what: str) -> OSError:
    code = exc.errno or errno.EIO
    msg = f"{what}: {os.strerror(code)}"
    if code in (errno.EPERM, errno.EACCES):
        return PermissionError(code, msg)
    if code in (errno.ESRCH, errno.ENOENT):
        return FileNotFoundError(code, msg)
    return OSError(code, msg)


__all__ = ["XenEventChannel", "XenEventChannels"]
