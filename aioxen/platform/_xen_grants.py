"""Grant memory of the ``xen`` platform: gntalloc to share, gntdev to map.

Theory of operation
-------------------
:meth:`XenGrantTable.share` uses ``/dev/xen/gntalloc``: ``ALLOC_GREF`` returns the grant
references and an mmap offset (``index``), and one ``mmap`` (``MAP_SHARED``) of that offset
gives the zeroed pages.  :meth:`XenGrantTable.map` uses ``/dev/xen/gntdev``: one
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

import contextlib
import errno
import mmap
import os
import time
import weakref
from collections.abc import Sequence

from aioxen import native
from aioxen.platform import xen_abi as abi
from aioxen.platform._xen_device import Device
from aioxen.platform._xen_events import XenEventChannel
from aioxen.platform.base import PAGE_SIZE, EventChannel, check_domid


def _notify_args(
    kind: str, buf_len: int, writable: bool, offset: int | None, channel: EventChannel | None
) -> tuple[int, int, int]:
    """(byte offset within the memory, action, port) for SET_UNMAP_NOTIFY."""
    if offset is not None:
        if not isinstance(offset, int) or not 0 <= offset < buf_len:
            raise ValueError(f"unmap-notify offset {offset!r} outside the {buf_len}-byte {kind}")
        if not writable:
            raise PermissionError(
                errno.EACCES, f"cannot clear a byte on unmap of a read-only {kind}"
            )
    port = 0
    if channel is not None:
        if not isinstance(channel, XenEventChannel):
            raise TypeError(f"unmap notify needs a xen event channel, not {channel!r}")
        if channel.closed:
            raise ValueError(f"event channel port {channel.port} is closed")
        port = channel.port
    action = abi.unmap_notify_action(offset is not None, channel is not None)
    return (offset or 0), action, port


def _close_mmap(mm: mmap.mmap, view: memoryview, what: str) -> None:
    """Release our view and munmap ``mm``; ``BufferError`` if user views are alive."""
    view.release()
    try:
        mm.close()
    except BufferError:
        raise BufferError(
            f"cannot close {what}: memoryviews derived from .buf are still alive"
        ) from None


class XenShare:
    """Pages granted with gntalloc (see module docstring)."""

    def __init__(
        self, dev: Device, remote_domid: int, refs: list[int], index: int, writable: bool
    ) -> None:
        self._dev = dev
        self._remote_domid = remote_domid
        self._refs = refs
        self._index = index
        self._writable = writable
        self._mm: mmap.mmap | None = mmap.mmap(
            dev.fd,
            len(refs) * PAGE_SIZE,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=index,
        )
        self._view: memoryview | None = memoryview(self._mm)
        self._finalizer = weakref.finalize(self, _dealloc_gref, dev, index, len(refs))

    @property
    def refs(self) -> list[int]:
        return list(self._refs)

    @property
    def buf(self) -> memoryview:
        if self._view is None:
            raise ValueError(f"share of refs {self._refs} is closed")
        return self._view

    @property
    def remote_domid(self) -> int:
        return self._remote_domid

    @property
    def writable(self) -> bool:
        """Whether the *peer* may map these pages writable."""
        return self._writable

    @property
    def closed(self) -> bool:
        return self._mm is None

    def __repr__(self) -> str:
        return f"<XenShare refs={self._refs} to domain {self._remote_domid}>"

    def set_unmap_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        if self._mm is None:
            raise ValueError(f"share of refs {self._refs} is closed")
        byte, action, port = _notify_args(
            "share", len(self._refs) * PAGE_SIZE, True, offset, channel
        )
        self._dev.ioctl(
            abi.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY,
            abi.pack_arg(abi.GNTALLOC_UNMAP_NOTIFY, self._index + byte, action, port),
        )

    def close(self) -> None:
        if self._mm is None or self._view is None:
            return
        mm, view = self._mm, self._view
        try:
            _close_mmap(mm, view, f"share of refs {self._refs}")
        except BufferError:
            self._view = memoryview(mm)
            raise
        self._mm = None
        self._view = None
        self._finalizer()


def _dealloc_gref(dev: Device, index: int, count: int) -> None:
    try:
        if not dev.closed:
            dev.ioctl(
                abi.IOCTL_GNTALLOC_DEALLOC_GREF,
                abi.pack_arg(abi.GNTALLOC_DEALLOC_GREF, index, count),
            )
    except OSError:
        pass  # already gone with the fd
    finally:
        dev.release()


class XenMapping:
    """Foreign pages mapped with gntdev (see module docstring)."""

    def __init__(
        self,
        dev: Device,
        remote_domid: int,
        refs: list[int],
        index: int,
        writable: bool,
        mm: mmap.mmap,
    ) -> None:
        self._dev = dev
        self._remote_domid = remote_domid
        self._refs = refs
        self._index = index
        self._writable = writable
        self._mm: mmap.mmap | None = mm
        self._view: memoryview | None = memoryview(mm)
        self._finalizer = weakref.finalize(self, _unmap_grant_ref, dev, index, len(refs))

    @property
    def buf(self) -> memoryview:
        if self._view is None:
            raise ValueError(f"mapping of refs {self._refs} is closed")
        return self._view

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def refs(self) -> list[int]:
        return list(self._refs)

    @property
    def remote_domid(self) -> int:
        return self._remote_domid

    @property
    def closed(self) -> bool:
        return self._mm is None

    def __repr__(self) -> str:
        mode = "rw" if self._writable else "ro"
        return f"<XenMapping {mode} refs={self._refs} of domain {self._remote_domid}>"

    def set_unmap_notify(self, offset: int | None, channel: EventChannel | None) -> None:
        if self._mm is None:
            raise ValueError(f"mapping of refs {self._refs} is closed")
        byte, action, port = _notify_args(
            "mapping", len(self._refs) * PAGE_SIZE, self._writable, offset, channel
        )
        self._dev.ioctl(
            abi.IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
            abi.pack_arg(abi.GNTDEV_UNMAP_NOTIFY, self._index + byte, action, port),
        )

    def close(self) -> None:
        if self._mm is None or self._view is None:
            return
        mm, view = self._mm, self._view
        try:
            _close_mmap(mm, view, f"mapping of refs {self._refs} of domain {self._remote_domid}")
        except BufferError:
            self._view = memoryview(mm)
            raise
        self._mm = None
        self._view = None
        self._finalizer()


def _unmap_grant_ref(dev: Device, index: int, count: int) -> None:
    try:
        if not dev.closed:
            dev.ioctl(
                abi.IOCTL_GNTDEV_UNMAP_GRANT_REF,
                abi.pack_arg(abi.GNTDEV_UNMAP_GRANT_REF, index, count),
            )
    except OSError:
        pass  # already gone with the fd
    finally:
        dev.release()


class XenGrantTable:
    """The MEMORY signature over ``/dev/xen/gntalloc`` (share) and ``/dev/xen/gntdev`` (map).

    Each device is opened on first use, so a domain that only maps never needs gntalloc.
    """

    MMAP_EAGAIN_RETRIES = 20

    def __init__(self, device_dir: str) -> None:
        self._device_dir = device_dir
        self._gntalloc: Device | None = None
        self._gntdev: Device | None = None
        self._objects: weakref.WeakSet[XenShare | XenMapping] = weakref.WeakSet()
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

    def share(self, remote_domid: int, npages: int, writable: bool = True) -> XenShare:
        check_domid(remote_domid, "remote_domid")
        if not isinstance(npages, int) or npages < 1:
            raise ValueError(f"npages must be a positive int, not {npages!r}")
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
            share = XenShare(dev, remote_domid, refs, index, writable)
        except BaseException:
            _dealloc_gref(dev, index, npages)
            raise
        self._objects.add(share)
        return share

    def map(self, remote_domid: int, refs: Sequence[int], writable: bool = True) -> XenMapping:
        check_domid(remote_domid, "remote_domid")
        ref_list = [int(r) for r in refs]
        if not ref_list:
            raise ValueError("map() needs at least one grant reference")
        for r in ref_list:
            if not 0 <= r < 2**32:
                raise ValueError(f"grant reference {r} out of range")
        dev = self._device("gntdev")
        req = abi.map_grant_ref_request(remote_domid, ref_list)
        try:
            dev.ioctl(abi.IOCTL_GNTDEV_MAP_GRANT_REF, req)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise OSError(
                code,
                f"cannot reserve {len(ref_list)} grant mapping(s) of domain {remote_domid}: "
                f"{os.strerror(code)}",
            ) from None
        index = abi.map_grant_ref_index(req)
        dev.acquire()
        try:
            mm = self._mmap(dev, index, len(ref_list), writable)
        except OSError as exc:
            _unmap_grant_ref(dev, index, len(ref_list))
            raise self._diagnose(dev, remote_domid, ref_list, writable, exc) from None
        except BaseException:
            _unmap_grant_ref(dev, index, len(ref_list))
            raise
        mapping = XenMapping(dev, remote_domid, ref_list, index, writable, mm)
        self._objects.add(mapping)
        return mapping

    def _mmap(self, dev: Device, index: int, count: int, writable: bool) -> mmap.mmap:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        for attempt in range(self.MMAP_EAGAIN_RETRIES):
            try:
                return mmap.mmap(
                    dev.fd, count * PAGE_SIZE, flags=mmap.MAP_SHARED, prot=prot, offset=index
                )
            except BlockingIOError:  # EAGAIN: a granted page is paged out; Xen pages it in
                time.sleep(0.001 * (attempt + 1))
        raise OSError(errno.EAGAIN, "grant mapping kept failing with EAGAIN (paged out)")

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
            _unmap_grant_ref(dev, index, 1)

    def live(self) -> list[XenShare | XenMapping]:
        """Shares and mappings created here and not yet closed."""
        return [o for o in list(self._objects) if not o.closed]

    def close(self) -> None:
        """Close every share and mapping that has no live views; release the devices."""
        self._closed = True
        for obj in list(self._objects):
            # With live views its memory stays valid until they die; the fd stays open.
            with contextlib.suppress(BufferError):
                obj.close()
        for name in ("_gntalloc", "_gntdev"):
            dev: Device | None = getattr(self, name)
            if dev is not None:
                dev.close()
                setattr(self, name, None)


__all__ = ["XenGrantTable", "XenMapping", "XenShare"]
