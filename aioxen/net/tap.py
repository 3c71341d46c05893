"""Linux TAP devices (``/dev/net/tun``) as a frame port for netfront and netback.

Theory of operation
-------------------
``open("/dev/net/tun")`` plus ``ioctl(TUNSETIFF, IFF_TAP | IFF_NO_PI)`` attaches the file
to a TAP interface (creating it if it does not exist, in the caller's network namespace):
every ``read`` returns one Ethernet frame the kernel sent out of the interface, every
``write`` injects one frame into the kernel as if received.  The fd is non-blocking and
watched with ``loop.add_reader``; each readiness callback drains up to a batch of frames.

With ``vnet_hdr=True`` (``IFF_VNET_HDR``) each frame is preceded by a 10-byte
``struct virtio_net_hdr`` carrying the same offloads netif carries
([`FrameInfo`][aioxen.net.netif.FrameInfo]): ``NEEDS_CSUM`` ↔ ``csum_blank``, ``DATA_VALID`` ↔
``data_validated``, ``GSO_TCPV4/6`` + ``gso_size`` ↔ a GSO extra.  ``TUNSETOFFLOAD`` says
which offloads *we* accept on reads (so the kernel only hands us super-frames and partial
checksums when the vif on the other side negotiated them); writes with any offload are
always accepted by the kernel.  Where netif has no ``csum_start`` the L4 header is located
by parsing ([`aioxen.net.offload`][]).

A TAP port can also be paused (``pause_reading``): the kernel then queues and eventually
drops, which is exactly how a NIC without free RX buffers behaves.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable
from typing import Final

from aioxen.net.netif import (
    PLAIN,
    XEN_NETIF_GSO_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    FrameInfo,
)
from aioxen.net.offload import locate_l4, resolve_offloads, tcp_header_end

TUN_DEVICE: Final = "/dev/net/tun"
TUNSETIFF: Final = 0x400454CA
TUNSETOFFLOAD: Final = 0x400454D0
TUNSETVNETHDRSZ: Final = 0x400454D8
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
SIOCGIFMTU: Final = 0x8921
SIOCSIFMTU: Final = 0x8922
SIOCSIFHWADDR: Final = 0x8924
SIOCGIFHWADDR: Final = 0x8927
IFF_UP: Final = 0x1
ARPHRD_ETHER: Final = 1
IFNAMSIZ: Final = 16

VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1
VIRTIO_NET_HDR_F_DATA_VALID: Final = 2
VIRTIO_NET_HDR_GSO_NONE: Final = 0
VIRTIO_NET_HDR_GSO_TCPV4: Final = 1
VIRTIO_NET_HDR_GSO_TCPV6: Final = 4
VNET_HDR: Final = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_*
MAX_FRAME: Final = 65536 + 14 + 4

_IFREQ_FLAGS = struct.Struct(f"{IFNAMSIZ}sH22x")
_IFREQ_INT = struct.Struct(f"{IFNAMSIZ}si20x")
_IFREQ_HWADDR = struct.Struct(f"{IFNAMSIZ}sH6s16x")

FrameHandler = Callable[[bytes | memoryview, FrameInfo], None]


def _ifname(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"invalid interface name {name!r} (1..15 bytes, no '/' or spaces)")
    return raw


def _ifreq(request: int, packed: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), request, packed)


def get_mtu(name: str) -> int:
    """The MTU of interface ``name`` (in this network namespace)."""
    return int(_IFREQ_INT.unpack(_ifreq(SIOCGIFMTU, _IFREQ_INT.pack(_ifname(name), 0)))[1])


def set_mtu(name: str, mtu: int) -> None:
    _ifreq(SIOCSIFMTU, _IFREQ_INT.pack(_ifname(name), mtu))


def get_mac(name: str) -> bytes:
    out = _ifreq(SIOCGIFHWADDR, _IFREQ_HWADDR.pack(_ifname(name), 0, bytes(6)))
    return bytes(_IFREQ_HWADDR.unpack(out)[2])


def set_mac(name: str, mac: bytes) -> None:
    if len(mac) != 6:
        raise ValueError("a MAC address is 6 bytes")
    _ifreq(SIOCSIFHWADDR, _IFREQ_HWADDR.pack(_ifname(name), ARPHRD_ETHER, mac))


def set_up(name: str, up: bool = True) -> None:
    raw = _ifname(name)
    flags = _IFREQ_FLAGS.unpack(_ifreq(SIOCGIFFLAGS, _IFREQ_FLAGS.pack(raw, 0)))[1]
    flags = flags | IFF_UP if up else flags & ~IFF_UP
    _ifreq(SIOCSIFFLAGS, _IFREQ_FLAGS.pack(raw, flags))


def parse_mac(text: str) -> bytes:
    """``"00:16:3e:01:02:03"`` → 6 bytes; ``ValueError`` otherwise."""
    parts = text.strip().split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"invalid MAC address {text!r}")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def info_from_vnet(hdr: bytes | memoryview) -> FrameInfo:
    flags, gso_type, _, gso_size, _, _ = VNET_HDR.unpack_from(hdr)
    if not flags and not gso_type:
        return PLAIN
    kind = gso_type & 0x7F
    if kind == VIRTIO_NET_HDR_GSO_TCPV4:
        xen_gso = XEN_NETIF_GSO_TYPE_TCPV4
    elif kind == VIRTIO_NET_HDR_GSO_TCPV6:
        xen_gso = XEN_NETIF_GSO_TYPE_TCPV6
    else:
        xen_gso, gso_size = XEN_NETIF_GSO_TYPE_NONE, 0
    return FrameInfo(
        bool(flags & VIRTIO_NET_HDR_F_NEEDS_CSUM),
        bool(flags & VIRTIO_NET_HDR_F_DATA_VALID),
        xen_gso,
        gso_size,
    )


_PLAIN_VNET = VNET_HDR.pack(0, 0, 0, 0, 0, 0)
_VALID_VNET = VNET_HDR.pack(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0)


def vnet_from_info(frame: bytes | bytearray | memoryview, info: FrameInfo) -> bytes | None:
    """The virtio header for writing ``frame`` with ``info``; ``None`` if its offloads
    cannot be expressed (an offloaded frame that is not TCP/UDP over IP)."""
    if info is PLAIN or not (info.csum_blank or info.gso_type):
        return _VALID_VNET if info.data_validated else _PLAIN_VNET
    loc = locate_l4(frame)
    if loc is None:
        return None
    flags = VIRTIO_NET_HDR_F_NEEDS_CSUM if info.csum_blank or info.gso_type else 0
    if info.data_validated:
        flags |= VIRTIO_NET_HDR_F_DATA_VALID
    if info.gso_type:
        if loc.proto != 6:
            return None
        kind = (
            VIRTIO_NET_HDR_GSO_TCPV4
            if info.gso_type == XEN_NETIF_GSO_TYPE_TCPV4
            else VIRTIO_NET_HDR_GSO_TCPV6
        )
        hdr_len = tcp_header_end(frame, loc)
        return VNET_HDR.pack(flags, kind, hdr_len, info.gso_size, loc.l4, loc.csum_offset)
    return VNET_HDR.pack(flags, 0, loc.l4 + loc.csum_offset + 2, 0, loc.l4, loc.csum_offset)


class TapDevice:
    """An open TAP interface: non-blocking frame reads and writes (no event loop).

    ``vnet_hdr`` enables offload metadata (see module docstring).  ``create_if_missing``
    False makes attaching to a non-existent interface a ``FileNotFoundError``.
    """

    def __init__(self, name: str, *, vnet_hdr: bool = True, create_if_missing: bool = True):
        raw = _ifname(name)
        if not create_if_missing and not os.path.exists(f"/sys/class/net/{name}"):
            raise FileNotFoundError(f"no network interface {name!r} in this namespace")
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            try:
                out = fcntl.ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(raw, flags))
            except OSError as exc:
                code = exc.errno or errno.EIO
                raise OSError(code, f"TUNSETIFF {name!r}: {os.strerror(code)}") from exc
            self._name: str = bytes(_IFREQ_FLAGS.unpack(out)[0]).rstrip(b"\0").decode()
            if vnet_hdr:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR.size))
                fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._vnet = vnet_hdr
        self._offloads = 0
        self.rx_frames = 0
        self.tx_frames = 0
        self.tx_dropped = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def vnet_hdr(self) -> bool:
        return self._vnet

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._fd

    def set_offload(self, *, csum: bool = False, tso4: bool = False, tso6: bool = False) -> None:
        """Which offloads this side accepts on reads (needs ``vnet_hdr``; TSO needs csum)."""
        if not self._vnet:
            if csum or tso4 or tso6:
                raise ValueError(f"tap {self._name}: offloads need vnet_hdr=True")
            return
        flags = 0
        if csum:
            flags |= TUN_F_CSUM
            if tso4:
                flags |= TUN_F_TSO4
            if tso6:
                flags |= TUN_F_TSO6
        fcntl.ioctl(self._fd, TUNSETOFFLOAD, flags)
        self._offloads = flags

    def read_frame(self) -> tuple[bytes | memoryview, FrameInfo] | None:
        """One frame the kernel sent, or ``None`` if none is queued."""
        try:
            data = os.read(self._fd, MAX_FRAME + VNET_HDR.size)
        except BlockingIOError:
            return None
        self.rx_frames += 1
        if not self._vnet:
            return data, PLAIN
        view = memoryview(data)
        return view[VNET_HDR.size :], info_from_vnet(view[: VNET_HDR.size])

    def write_frame(self, frame: bytes | bytearray | memoryview, info: FrameInfo = PLAIN) -> bool:
        """Inject one frame; ``False`` (counted in ``tx_dropped``) if it had to be dropped."""
        try:
            if self._vnet:
                hdr = vnet_from_info(frame, info)
                if hdr is None:
                    self.tx_dropped += 1
                    return False
                os.writev(self._fd, (hdr, frame))
            else:
                for part, _ in resolve_offloads(frame, info, accept_csum=False, accept_gso=False):
                    os.write(self._fd, part)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS, errno.EINVAL, errno.EIO):
                self.tx_dropped += 1
                return False
            raise
        self.tx_frames += 1
        return True

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"<TapDevice {self._name} fd={self._fd} vnet_hdr={self._vnet}>"


class TapPort:
    """A [`TapDevice`][] on an event loop: frames read are passed to ``on_frame``.

    ``batch`` bounds the frames handled per readiness callback so one busy TAP cannot
    starve the loop.  ``pause_reading``/``resume_reading`` are idempotent.
    """

    def __init__(
        self,
        tap: TapDevice,
        on_frame: FrameHandler,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        batch: int = 64,
        on_batch_end: Callable[[], None] | None = None,
    ) -> None:
        self.tap = tap
        self._on_frame = on_frame
        self._on_batch_end = on_batch_end
        self._loop = loop or asyncio.get_running_loop()
        self._batch = batch
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self.tap.closed:
            self._loop.add_reader(self.tap.fileno(), self._readable)
            self._reading = True

    def pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.tap.fileno())
            self._reading = False

    def is_reading(self) -> bool:
        return self._reading

    def _readable(self) -> None:
        read = self.tap.read_frame
        deliver = self._on_frame
        for _ in range(self._batch):
            got = read()
            if got is None:
                break
            deliver(got[0], got[1])
            if not self._reading:
                break
        if self._on_batch_end is not None:
            self._on_batch_end()

    def send(self, frame: bytes | bytearray | memoryview, info: FrameInfo = PLAIN) -> bool:
        return self.tap.write_frame(frame, info)

    def close(self) -> None:
        self.pause_reading()
        self.tap.close()


__all__ = [
    "TUN_DEVICE",
    "FrameHandler",
    "TapDevice",
    "TapPort",
    "format_mac",
    "get_mac",
    "get_mtu",
    "info_from_vnet",
    "parse_mac",
    "set_mac",
    "set_mtu",
    "set_up",
    "vnet_from_info",
]
