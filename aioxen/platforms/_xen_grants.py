"""Grant memory of the ``xen`` platform: gntalloc to share, gntdev to map.

Theory of operation
-------------------
[`XenGrantTable.share`][] uses ``/dev/xen/gntalloc``: ``ALLOC_GREF`` returns the grant
references and an mmap offset (``index``), and one ``mmap`` (``MAP_SHARED``) of that offset
gives the zeroed pages.  [`XenGrantTable.map`][] uses ``/dev/xen/gntdev``: one
``MAP_GRANT_REF`` with all the refs reserves a contiguous range of the fd, and one ``mmap``
of it maps the refs in the order given (``PROT_READ`` only for read-only maps, which makes
Python's memoryview read-only too).

The kernel reports any failed grant mapping as ``EINVAL`` at ``mmap`` time.  To raise
``FileNotFoundError``/``PermissionError`` naming the ref, the failure is diagnosed with a
one-byte ``GRANT_COPY`` per ref, whose per-segment status is Xen's own ``GNTST_*`` code,
and for writable maps by mapping each ref alone.

Both kinds of memory take ``SET_UNMAP_NOTIFY`` (``CLEAR_BYTE`` and/or ``SEND_EVENT``): the
kernel performs it when the last user of the memory goes away — ``close()``, or the death of
the process.  (libxengnttab deallocates a share right after ``mmap``; we keep the gntalloc
entry until ``close`` because the notify can only be set while the entry exists.)  Close
order is munmap first, then ``DEALLOC_GREF``/``UNMAP_GRANT_REF``.  Python's ``mmap`` refuses
to unmap while views are exported, which is what makes ``close()`` raise ``BufferError``
rather than leave dangling memory.  An object dropped without ``close()`` ends its grant in
a ``weakref.finalize`` callback.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import struct
import time
import weakref
from typing import ClassVar

from aioxen import native
from aioxen.platforms import xen_abi as abi
from aioxen.platforms._grants_common import GrantTableBase, OwnedPages
from aioxen.platforms._xen_device import Device
from aioxen.platforms._xen_events import XenEventChannel
from aioxen.platforms.base import PAGE_SIZE, EventChannel


def _notify_args(
    kind: str, buf_len: int, writable: bool, offset: int | None, channel: EventChannel | None
) -> tuple[int, int, int]:
    """(byte offset within the memory, action, port) for SET_UNMAP_NOTIFY."""
    if offset is not None:
        if not isinstance(offset, int) or not 0 <= offset < buf_len:
            raise ValueError(f"unmap-notify offset {offset!r} outside the {buf_len}-byte {kind}")
        if not writable:
            raise ValueError(f"cannot clear a byte on unmap of a read-only {kind}")
    port = 0
    if channel is not None:
        if not isinstance(channel, XenEventChannel):
            raise TypeError(f"unmap notify needs a xen event channel, not {channel!r}")
        if channel.closed:
            raise ValueError(f"event channel port {channel.port} is closed")
        port = channel.port
    action = abi.unmap_notify_action(offset is not None, channel is not None)
    return (offset or 0), action, port


def _end_grant(dev: Device, end: tuple[int, struct.Struct], index: int, count: int) -> None:
    """End a grant range with ``end`` (``DEALLOC_GREF`` or ``UNMAP_GRANT_REF`` and its
    argument layout) and drop its hold on ``dev``."""
    request, fmt = end
    try:
        if not dev.closed:
            dev.ioctl(request, abi.pack_arg(fmt, index, count))
    except OSError:
        pass  # already gone with the fd
    finally:
        dev.release()


_DEALLOC_GREF = (abi.IOCTL_GNTALLOC_DEALLOC_GREF, abi.GNTALLOC_DEALLOC_GREF)
_UNMAP_GRANT_REF = (abi.IOCTL_GNTDEV_UNMAP_GRANT_REF, abi.GNTDEV_UNMAP_GRANT_REF)


class _XenGrant(OwnedPages):
    """A gntalloc or gntdev range of ``dev`` at mmap offset ``index``, mapped as ``mm``."""

    _SET_UNMAP_NOTIFY: ClassVar[tuple[int, struct.Struct]]
    _END: ClassVar[tuple[int, struct.Struct]]

    def __init__(
        self,
        dev: Device,
        remote_domid: int,
        refs: list[int],
        index: int,
        writable: bool,
        mm: mmap.mmap,
    ) -> None:
        super().__init__(remote_domid, refs, writable)
        self._dev = dev
        self._index = index
        self._own(mm)
        self._finalizer = weakref.finalize(self, _end_grant, dev, self._END, index, len(refs))

    def set_unmap_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        if self._closed:
            raise ValueError(f"{self._describe()} is closed")
        byte, action, port = _notify_args(
            self._kind, self._size, self._can_clear_byte, offset, channel
        )
        request, fmt = self._SET_UNMAP_NOTIFY
        self._dev.ioctl(request, abi.pack_arg(fmt, self._index + byte, action, port))

    def _unmap(self) -> None:
        """munmap first (the grant is ended after, in [`_end`][])."""
        try:
            self._unmap_view()
        except BufferError:
            raise BufferError(
                f"cannot close {self._describe()}: memoryviews derived from .buf are still alive"
            ) from None

    def _end(self) -> None:
        self._finalizer()


class XenShare(_XenGrant):
    """Pages granted with gntalloc (see module docstring)."""

    _kind = "share"
    _SET_UNMAP_NOTIFY = (abi.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, abi.GNTALLOC_UNMAP_NOTIFY)
    _END = _DEALLOC_GREF

    def __repr__(self) -> str:
        return f"<XenShare refs={self._refs} to domain {self._remote_domid}>"


class XenMapping(_XenGrant):
    """Foreign pages mapped with gntdev (see module docstring)."""

    _kind = "mapping"
    _SET_UNMAP_NOTIFY = (abi.IOCTL_GNTDEV_SET_UNMAP_NOTIFY, abi.GNTDEV_UNMAP_NOTIFY)
    _END = _UNMAP_GRANT_REF

    def __repr__(self) -> str:
        mode = "rw" if self._writable else "ro"
        return f"<XenMapping {mode} refs={self._refs} of domain {self._remote_domid}>"


def _eagain_pause(attempt: int) -> float:
    """Seconds to wait before retry ``attempt + 1`` of an mmap that failed with EAGAIN."""
    return 0.001 * (attempt + 1)


def _eagain_error() -> OSError:
    return OSError(errno.EAGAIN, "grant mapping kept failing with EAGAIN (paged out)")


class XenGrantTable(GrantTableBase[XenShare, XenMapping]):
    """The MEMORY signature over ``/dev/xen/gntalloc`` (share) and ``/dev/xen/gntdev`` (map).

    Each device is opened on first use, so a domain that only maps never needs gntalloc.
    Shares and mappings are tracked weakly: one dropped without ``close()`` ends its grant
    in its finalizer.
    """

    MMAP_EAGAIN_RETRIES = 20
    """``mmap`` of a grant fails with ``EAGAIN`` while Xen pages a paged-out granted page
    back in: retry, pausing 1, 2, 3 ... ms (at most ~210 ms in all).  `map` waits
    with ``time.sleep`` (bounded; a blocking call by contract); [`map_async`][], which
    coroutines use, with ``asyncio.sleep`` -- it never blocks the event loop."""

    def __init__(self, device_dir: str) -> None:
        super().__init__(weakref.WeakSet())
        self._device_dir = device_dir
        self._gntalloc: Device | None = None
        self._gntdev: Device | None = None
        self._closed = False

    def _device(self, name: str) -> Device:
        if self._closed:
            raise ValueError("the xen platform is closed")
        attr = "_" + name
        dev: Device | None = getattr(self, attr)
        if dev is None:
            dev = Device(self._device_dir, name)
            setattr(self, attr, dev)
        return dev

    def _share(self, remote_domid: int, npages: int, writable: bool) -> XenShare:
        dev = self._device("gntalloc")
        req = abi.alloc_gref_request(remote_domid, npages, writable)
        try:
            dev.ioctl(abi.IOCTL_GNTALLOC_ALLOC_GREF, req)
        except OSError as exc:
            code = exc.errno or errno.EIO
            msg = f"cannot grant {npages} page(s) to domain {remote_domid}: {os.strerror(code)}"
            if code == errno.ENOSPC:
                msg += " (gntalloc's grant limit reached; see the module parameter 'limit')"
            raise OSError(code, msg) from None
        index, refs = abi.alloc_gref_result(req, npages)
        dev.acquire()
        try:
            mm = self._mmap(dev, index, npages, True)
        except BaseException:
            _end_grant(dev, _DEALLOC_GREF, index, npages)
            raise
        return XenShare(dev, remote_domid, refs, index, writable, mm)

    def _map(self, remote_domid: int, refs: list[int], writable: bool) -> XenMapping:
        dev, index = self._reserve(remote_domid, refs)
        try:
            mm = self._mmap(dev, index, len(refs), writable)
        except OSError as exc:
            _end_grant(dev, _UNMAP_GRANT_REF, index, len(refs))
            raise self._diagnose(dev, remote_domid, refs, writable, exc) from None
        except BaseException:
            _end_grant(dev, _UNMAP_GRANT_REF, index, len(refs))
            raise
        return XenMapping(dev, remote_domid, refs, index, writable, mm)

    async def _map_async(self, remote_domid: int, refs: list[int], writable: bool) -> XenMapping:
        """[`_map`][] whose ``EAGAIN`` retries await instead of blocking the loop (and
        which a cancellation cleans up after)."""
        dev, index = self._reserve(remote_domid, refs)
        try:
            for attempt in range(self.MMAP_EAGAIN_RETRIES):
                mm = self._try_mmap(dev, index, len(refs), writable)
                if mm is not None:
                    break
                await asyncio.sleep(_eagain_pause(attempt))
            else:
                raise _eagain_error()
        except OSError as exc:
            _end_grant(dev, _UNMAP_GRANT_REF, index, len(refs))
            raise self._diagnose(dev, remote_domid, refs, writable, exc) from None
        except BaseException:
            _end_grant(dev, _UNMAP_GRANT_REF, index, len(refs))
            raise
        return XenMapping(dev, remote_domid, refs, index, writable, mm)

    def _reserve(self, remote_domid: int, refs: list[int]) -> tuple[Device, int]:
        """``MAP_GRANT_REF``: reserve a range of gntdev for ``refs``; its mmap offset."""
        dev = self._device("gntdev")
        req = abi.map_grant_ref_request(remote_domid, refs)
        try:
            dev.ioctl(abi.IOCTL_GNTDEV_MAP_GRANT_REF, req)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise OSError(
                code,
                f"cannot reserve {len(refs)} grant mapping(s) of domain {remote_domid}: "
                f"{os.strerror(code)}",
            ) from None
        index = abi.map_grant_ref_index(req)
        dev.acquire()
        return dev, index

    def _mmap(self, dev: Device, index: int, count: int, writable: bool) -> mmap.mmap:
        """mmap ``count`` pages at ``index``, waiting out ``EAGAIN`` (blocking, bounded:
        see [`MMAP_EAGAIN_RETRIES`][])."""
        for attempt in range(self.MMAP_EAGAIN_RETRIES):
            mm = self._try_mmap(dev, index, count, writable)
            if mm is not None:
                return mm
            time.sleep(_eagain_pause(attempt))
        raise _eagain_error()

    @staticmethod
    def _try_mmap(dev: Device, index: int, count: int, writable: bool) -> mmap.mmap | None:
        """One mmap; ``None`` on ``EAGAIN`` (a granted page is paged out; Xen pages it in)."""
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            return mmap.mmap(
                dev.fd, count * PAGE_SIZE, flags=mmap.MAP_SHARED, prot=prot, offset=index
            )
        except BlockingIOError:
            return None

    def _diagnose(
        self, dev: Device, domid: int, refs: list[int], writable: bool, exc: OSError
    ) -> OSError:
        """Turn the kernel's blanket EINVAL into an error naming the ref that failed."""
        for ref in refs:
            status = self._probe(dev, domid, ref)
            if status is None:
                break
            if status == abi.GNTST_OKAY:
                continue
            msg = (
                f"cannot map grant ref {ref} of domain {domid}: "
                f"{abi.GNTST_NAMES.get(status, f'GNTST {status}')}"
            )
            if status == abi.GNTST_PERMISSION_DENIED:
                return PermissionError(errno.EACCES, msg + " (granted to another domain?)")
            return FileNotFoundError(errno.ENOENT, msg + " (unknown or revoked)")
        else:
            # Every ref is readable by us.
            if writable:
                for ref in refs:
                    if not self._writable_alone(dev, domid, ref):
                        return PermissionError(
                            errno.EACCES,
                            f"cannot map grant ref {ref} of domain {domid} writable: "
                            "it is granted read-only",
                        )
        code = exc.errno or errno.EIO
        what = f"grant refs {refs} of domain {domid}"
        if code == errno.EINVAL:
            return FileNotFoundError(code, f"cannot map {what}: unknown, revoked or not ours")
        return OSError(code, f"cannot map {what}: {os.strerror(code)}")

    def _probe(self, dev: Device, domid: int, ref: int) -> int | None:
        """Xen's status for reading one byte of ``ref`` (GRANT_COPY), or None if the
        copy ioctl itself is unavailable."""
        scratch = bytearray(1)
        scratch_pin = native.ffi.from_buffer("char[]", scratch, require_writable=True)
        try:
            seg = abi.grant_copy_probe_segment(
                domid, ref, int(native.lib.ax_address(scratch_pin)), 1
            )
            seg_pin = native.ffi.from_buffer("char[]", seg, require_writable=True)
            try:
                arg = abi.pack_arg(abi.GNTDEV_GRANT_COPY, 1, int(native.lib.ax_address(seg_pin)))
                dev.ioctl(abi.IOCTL_GNTDEV_GRANT_COPY, arg)
            finally:
                native.ffi.release(seg_pin)
        except OSError:
            return None
        finally:
            native.ffi.release(scratch_pin)
        return abi.grant_copy_status(seg)

    def _writable_alone(self, dev: Device, domid: int, ref: int) -> bool:
        req = abi.map_grant_ref_request(domid, [ref])
        try:
            dev.ioctl(abi.IOCTL_GNTDEV_MAP_GRANT_REF, req)
        except OSError:
            return True  # cannot tell
        index = abi.map_grant_ref_index(req)
        dev.acquire()
        try:
            mm = self._mmap(dev, index, 1, True)
        except OSError:
            return False
        else:
            mm.close()
            return True
        finally:
            _end_grant(dev, _UNMAP_GRANT_REF, index, 1)

    def close(self) -> None:
        """Close every mapping and share that has no live views; release the devices."""
        self._closed = True
        # With live views its memory stays valid until they die; the fd stays open.
        self.close_all(ignore_busy=True)
        for name in ("_gntalloc", "_gntdev"):
            dev: Device | None = getattr(self, name)
            if dev is not None:
                dev.close()
                setattr(self, name, None)


__all__ = ["XenGrantTable", "XenMapping", "XenShare"]
