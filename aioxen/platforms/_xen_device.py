"""A ``/dev/xen`` device file shared by the objects created through it.

Theory of operation
-------------------
A grant must be ended with the fd it was created on (the kernel keys the ``index`` by
file).  Shares and mappings can outlive the platform object that made them (a view still
exported, a forgotten object whose finalizer runs later), so the fd is reference-counted:
each share or mapping [`acquire`][Device.acquire]\\ s it, releases it once its grant is ended,
and [`close`][Device.close] only closes the fd when nobody holds it any more.
"""

from __future__ import annotations

import errno
import os

from aioxen import native

KERNEL_MODULE = {"evtchn": "xen-evtchn", "gntdev": "xen-gntdev", "gntalloc": "xen-gntalloc"}


class Device:
    """One open ``<directory>/<name>`` device with a user count."""

    def __init__(self, directory: str, name: str) -> None:
        self.path = os.path.join(directory, name)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT,
                f"{self.path} does not exist: not running in a Xen domain, or the "
                f"{KERNEL_MODULE.get(name, name)} kernel module is not loaded",
                self.path,
            ) from None
        except PermissionError as exc:
            raise PermissionError(
                exc.errno, f"cannot open {self.path}: {exc.strerror} (need root?)", self.path
            ) from None
        self._users = 0
        self._closing = False

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def acquire(self) -> None:
        if self._closing:
            raise ValueError(f"{self.path} is closed")
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if self._closing and self._users <= 0:
            self._close_fd()

    def close(self) -> None:
        self._closing = True
        if self._users <= 0:
            self._close_fd()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def ioctl(self, request: int, arg: bytearray | None) -> int:
        """[`aioxen.native.ioctl`][] on this device (``OSError`` with errno on failure)."""
        if self.fd < 0:
            raise OSError(errno.EBADF, f"{self.path} is closed")
        return native.ioctl(self.fd, request, arg)

    def __repr__(self) -> str:
        return f"<Device {self.path} fd={self.fd} users={self._users}>"


__all__ = ["KERNEL_MODULE", "Device"]
