"""Linux ``/dev/xen/{evtchn,gntdev,gntalloc}`` ABI: ioctl numbers and struct layouts.

Theory of operation
-------------------
This module is pure data plus packing helpers: no file descriptors, no syscalls.  The
``xen`` platform ([`aioxen.platforms.xen`][]) builds each ioctl argument as a
``bytearray`` with the `struct.Struct` objects defined here, passes it to
[`aioxen.native.ioctl`][] (which lets the kernel write back into it), and unpacks the
result with the same objects.

Every request number is computed the way the kernel headers do it,
``_IOC(_IOC_NONE, type, nr, sizeof(struct))``, from the ``size`` of the matching
`struct.Struct`; the values in the comments are the ones measured on x86_64 and are
asserted by ``tests/test_xen_abi.py`` together with ``sizeof``/``offsetof`` of each struct
as compiled from ``libxen-dev``'s ``/usr/include/xen/sys/*.h``.

Formats use ``=`` (native byte order, standard sizes, no implicit alignment) and spell
padding out with ``x`` so that each layout is visible in one line.  The two
variable-length requests (``MAP_GRANT_REF`` and ``ALLOC_GREF``) end in an array declared
``[1]`` in C: the request number encodes the size with one element, and the buffer passed
holds ``count`` elements.
"""

from __future__ import annotations

import struct

# --- asm-generic/ioctl.h ----------------------------------------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0


def _IOC(direction: int, type_: str, nr: int, size: int) -> int:
    """The kernel's ``_IOC`` macro (x86/arm layout: dir 2 bits, size 14, type 8, nr 8)."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (ord(type_) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


# --- /dev/xen/evtchn (xen/sys/evtchn.h, type 'E') ---------------------------------------

EVTCHN_BIND_VIRQ = struct.Struct("=I")  # virq
EVTCHN_BIND_INTERDOMAIN = struct.Struct("=II")  # remote_domain, remote_port
EVTCHN_BIND_UNBOUND_PORT = struct.Struct("=I")  # remote_domain
EVTCHN_UNBIND = struct.Struct("=I")  # port
EVTCHN_NOTIFY = struct.Struct("=I")  # port
EVTCHN_RESTRICT_DOMID = struct.Struct("=H")  # domid (domid_t)

EVTCHN_PORT = struct.Struct("=I")
"""One element of what ``read()`` returns and ``write()`` takes: a native u32 port."""

IOCTL_EVTCHN_BIND_VIRQ = _IOC(_IOC_NONE, "E", 0, EVTCHN_BIND_VIRQ.size)  # 0x00044500
IOCTL_EVTCHN_BIND_INTERDOMAIN = _IOC(_IOC_NONE, "E", 1, EVTCHN_BIND_INTERDOMAIN.size)  # 0x00084501
IOCTL_EVTCHN_BIND_UNBOUND_PORT = _IOC(
    _IOC_NONE, "E", 2, EVTCHN_BIND_UNBOUND_PORT.size
)  # 0x00044502
IOCTL_EVTCHN_UNBIND = _IOC(_IOC_NONE, "E", 3, EVTCHN_UNBIND.size)  # 0x00044503
IOCTL_EVTCHN_NOTIFY = _IOC(_IOC_NONE, "E", 4, EVTCHN_NOTIFY.size)  # 0x00044504
IOCTL_EVTCHN_RESET = _IOC(_IOC_NONE, "E", 5, 0)  # 0x00004505
IOCTL_EVTCHN_RESTRICT_DOMID = _IOC(_IOC_NONE, "E", 6, EVTCHN_RESTRICT_DOMID.size)  # 0x00024506

# --- /dev/xen/gntdev (xen/sys/gntdev.h, type 'G') ---------------------------------------

GNTDEV_GRANT_REF = struct.Struct("=II")  # domid, ref
GNTDEV_MAP_GRANT_REF = struct.Struct("=I 4x Q")  # count, pad, index(out); then refs[count]
GNTDEV_MAP_GRANT_REF_C = struct.Struct("=I 4x Q II")  # as declared in C, with refs[1]
GNTDEV_UNMAP_GRANT_REF = struct.Struct("=Q I 4x")  # index, count, pad
GNTDEV_GET_OFFSET_FOR_VADDR = struct.Struct("=Q Q I 4x")  # vaddr, offset(out), count(out)
GNTDEV_SET_MAX_GRANTS = struct.Struct("=I")  # count
GNTDEV_UNMAP_NOTIFY = struct.Struct("=Q I I")  # index, action, event_channel_port

# struct ioctl_gntdev_grant_copy_segment: two 8-byte unions (void *virt, or
# {u32 ref; u16 offset; u16 domid}), then len u16, flags u16, status s16, tail padding.
GNTDEV_COPY_PTR = struct.Struct("=Q")  # the ``virt`` member of the union
GNTDEV_COPY_FOREIGN = struct.Struct("=I H H")  # the ``foreign`` member: ref, offset, domid
GNTDEV_GRANT_COPY_SEGMENT = struct.Struct("=8s 8s H H h 2x")
GNTDEV_GRANT_COPY = struct.Struct("=I 4x Q")  # count, pad, segments (pointer)

IOCTL_GNTDEV_MAP_GRANT_REF = _IOC(_IOC_NONE, "G", 0, GNTDEV_MAP_GRANT_REF_C.size)  # 0x00184700
IOCTL_GNTDEV_UNMAP_GRANT_REF = _IOC(_IOC_NONE, "G", 1, GNTDEV_UNMAP_GRANT_REF.size)  # 0x00104701
IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR = _IOC(
    _IOC_NONE, "G", 2, GNTDEV_GET_OFFSET_FOR_VADDR.size
)  # 0x00184702
IOCTL_GNTDEV_SET_MAX_GRANTS = _IOC(_IOC_NONE, "G", 3, GNTDEV_SET_MAX_GRANTS.size)  # 0x00044703
IOCTL_GNTDEV_SET_UNMAP_NOTIFY = _IOC(_IOC_NONE, "G", 7, GNTDEV_UNMAP_NOTIFY.size)  # 0x00104707
IOCTL_GNTDEV_GRANT_COPY = _IOC(_IOC_NONE, "G", 8, GNTDEV_GRANT_COPY.size)  # 0x00104708

UNMAP_NOTIFY_CLEAR_BYTE = 0x1
UNMAP_NOTIFY_SEND_EVENT = 0x2

GNTCOPY_SOURCE_GREF = 1 << 0
GNTCOPY_DEST_GREF = 1 << 1

# --- /dev/xen/gntalloc (xen/sys/gntalloc.h, type 'G') -----------------------------------

GNTALLOC_ALLOC_GREF = struct.Struct("=H H I Q")  # domid, flags, count, index(out); gref_ids
GNTALLOC_GREF_ID = struct.Struct("=I")
GNTALLOC_ALLOC_GREF_C = struct.Struct("=H H I Q I 4x")  # as declared in C: gref_ids[1], tail pad
GNTALLOC_DEALLOC_GREF = struct.Struct("=Q I 4x")  # index, count, tail padding
GNTALLOC_UNMAP_NOTIFY = struct.Struct("=Q I I")  # index, action, event_channel_port

IOCTL_GNTALLOC_ALLOC_GREF = _IOC(_IOC_NONE, "G", 5, GNTALLOC_ALLOC_GREF_C.size)  # 0x00184705
IOCTL_GNTALLOC_DEALLOC_GREF = _IOC(_IOC_NONE, "G", 6, GNTALLOC_DEALLOC_GREF.size)  # 0x00104706
IOCTL_GNTALLOC_SET_UNMAP_NOTIFY = _IOC(_IOC_NONE, "G", 7, GNTALLOC_UNMAP_NOTIFY.size)  # 0x00104707

GNTALLOC_FLAG_WRITABLE = 1

# --- Xen grant status codes (xen/grant_table.h GNTST_*) ---------------------------------

GNTST_OKAY = 0
GNTST_GENERAL_ERROR = -1
GNTST_BAD_DOMAIN = -2
GNTST_BAD_GNTREF = -3
GNTST_BAD_HANDLE = -4
GNTST_BAD_VIRT_ADDR = -5
GNTST_BAD_DEV_ADDR = -6
GNTST_NO_DEVICE_SPACE = -7
GNTST_PERMISSION_DENIED = -8
GNTST_BAD_PAGE = -9
GNTST_BAD_COPY_ARG = -10
GNTST_ADDRESS_TOO_BIG = -11
GNTST_EAGAIN = -12
GNTST_NO_SPACE = -13

GNTST_NAMES = {
    GNTST_OKAY: "okay",
    GNTST_GENERAL_ERROR: "general error",
    GNTST_BAD_DOMAIN: "bad domain",
    GNTST_BAD_GNTREF: "bad grant reference",
    GNTST_BAD_HANDLE: "bad handle",
    GNTST_BAD_VIRT_ADDR: "bad virtual address",
    GNTST_BAD_DEV_ADDR: "bad device address",
    GNTST_NO_DEVICE_SPACE: "no device space",
    GNTST_PERMISSION_DENIED: "permission denied",
    GNTST_BAD_PAGE: "bad page",
    GNTST_BAD_COPY_ARG: "bad copy argument",
    GNTST_ADDRESS_TOO_BIG: "address too big",
    GNTST_EAGAIN: "operation not done; try again",
    GNTST_NO_SPACE: "out of space",
}

# --- request builders (pure) ------------------------------------------------------------


def pack_arg(fmt: struct.Struct, *values: int) -> bytearray:
    """A writable ioctl buffer holding ``values`` packed with ``fmt``."""
    return bytearray(fmt.pack(*values))


def map_grant_ref_request(domid: int, refs: list[int]) -> bytearray:
    """``struct ioctl_gntdev_map_grant_ref`` with ``len(refs)`` elements in ``refs[]``."""
    if not refs:
        raise ValueError("MAP_GRANT_REF needs at least one grant reference")
    buf = bytearray(GNTDEV_MAP_GRANT_REF.size + GNTDEV_GRANT_REF.size * len(refs))
    GNTDEV_MAP_GRANT_REF.pack_into(buf, 0, len(refs), 0)
    off = GNTDEV_MAP_GRANT_REF.size
    for ref in refs:
        GNTDEV_GRANT_REF.pack_into(buf, off, domid, ref)
        off += GNTDEV_GRANT_REF.size
    return buf


def map_grant_ref_index(buf: bytearray) -> int:
    """The ``index`` (an mmap byte offset) the kernel wrote into a MAP_GRANT_REF buffer."""
    _count, index = GNTDEV_MAP_GRANT_REF.unpack_from(buf, 0)
    return int(index)


def alloc_gref_request(domid: int, count: int, writable: bool) -> bytearray:
    """``struct ioctl_gntalloc_alloc_gref`` with room for ``count`` grant ids."""
    if count < 1:
        raise ValueError(f"ALLOC_GREF needs count >= 1, not {count}")
    flags = GNTALLOC_FLAG_WRITABLE if writable else 0
    size = max(GNTALLOC_ALLOC_GREF_C.size, GNTALLOC_ALLOC_GREF.size + GNTALLOC_GREF_ID.size * count)
    buf = bytearray(size)
    GNTALLOC_ALLOC_GREF.pack_into(buf, 0, domid, flags, count, 0)
    return buf


def alloc_gref_result(buf: bytearray, count: int) -> tuple[int, list[int]]:
    """``(index, gref_ids)`` from a completed ALLOC_GREF buffer."""
    _domid, _flags, _count, index = GNTALLOC_ALLOC_GREF.unpack_from(buf, 0)
    base = GNTALLOC_ALLOC_GREF.size
    refs = [GNTALLOC_GREF_ID.unpack_from(buf, base + 4 * i)[0] for i in range(count)]
    return int(index), refs


def unmap_notify_action(clear_byte: bool, send_event: bool) -> int:
    """The ``action`` bit set for SET_UNMAP_NOTIFY."""
    return (UNMAP_NOTIFY_CLEAR_BYTE if clear_byte else 0) | (
        UNMAP_NOTIFY_SEND_EVENT if send_event else 0
    )


def grant_copy_probe_segment(domid: int, ref: int, dest_address: int, length: int) -> bytearray:
    """A GRANT_COPY segment reading ``length`` bytes of (``domid``, ``ref``) into local
    memory at ``dest_address``: used to learn the Xen status code of a ref that failed to
    map, because the kernel reports every failed mapping as ``EINVAL``."""
    source = GNTDEV_COPY_FOREIGN.pack(ref, 0, domid)
    dest = GNTDEV_COPY_PTR.pack(dest_address)
    return bytearray(GNTDEV_GRANT_COPY_SEGMENT.pack(source, dest, length, GNTCOPY_SOURCE_GREF, 0))


def grant_copy_status(segment: bytearray) -> int:
    """The ``status`` (a ``GNTST_*`` code) of a completed GRANT_COPY segment."""
    return int(GNTDEV_GRANT_COPY_SEGMENT.unpack_from(segment, 0)[4])
