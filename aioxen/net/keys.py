"""The vif's XenStore keys: link settings and feature keys, and their parsing (pure).

Theory of operation
-------------------
A vif ``devid`` between frontend domain ``fe`` and backend domain ``be`` is a xenbus
device of type ``vif`` ([`aioxen.xenbus`][]: directories, states and the toolstack step).
On top of the generic keys the toolstack writes the link settings [`link_keys`][] into
both directories (``mac``, ``mtu``, ``handle``); the backend advertises
[`BackendFeatures`][] with ``InitWait``, and the frontend publishes its ring refs,
event channel and [`FrontendFeatures`][] when it connects.

A feature is on iff its value is ``"1"`` (missing means off), except where netif.h gives a
different default (IPv4 checksum offload is on unless ``feature-no-csum-offload=1``).
``feature-persistent`` is aioxen's: "my TX/RX buffer grants stay granted for the life of
the connection", so a backend may keep them mapped instead of mapping per packet (blkif
uses the same key for the same promise).
"""

from __future__ import annotations

from dataclasses import dataclass

from aioxen.errors import ProtocolError
from aioxen.xenbus.driver import feature, read_int

VIF = "vif"
"""The xenbus device type."""
DEFAULT_MTU = 1500
BACKEND_MAC = bytes.fromhex("feffffffffff")
"""The MAC a backend vif uses for itself (libxl/Qubes convention)."""
FRONTEND_RING_KEYS = ("tx-ring-ref", "rx-ring-ref", "event-channel")


def parse_mac_value(value: bytes, what: str = "mac") -> bytes:
    parts = value.strip().rstrip(b"\0").split(b":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ProtocolError(f"{what}: {value!r} is not a MAC address", field=what)
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ProtocolError(f"{what}: {value!r} is not a MAC address", field=what) from None


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(frontend_domid: int, devid: int) -> bytes:
    """Xen's OUI 00:16:3e with the domain and device in the low bytes."""
    return bytes([0x00, 0x16, 0x3E, (frontend_domid >> 8) & 0x7F, frontend_domid & 0xFF, devid])


def link_keys(mac: bytes, mtu: int, devid: int) -> dict[str, str]:
    """What the toolstack writes into both directories of a vif."""
    return {"mac": mac_text(mac), "mtu": str(mtu), "handle": str(devid)}


def parse_link(mac: bytes | None, mtu: bytes | None, directory: str) -> tuple[bytes, int]:
    """The frontend's ``(mac, mtu)`` from its directory's values (``mtu`` defaults to
    1500; a missing ``mac`` is ``FileNotFoundError``, garbage a ``ProtocolError``)."""
    if mac is None:
        raise FileNotFoundError(f"{directory}/mac is missing (no MAC address for this vif)")
    return (
        parse_mac_value(mac, f"{directory}/mac"),
        read_int(mtu, f"{directory}/mtu", DEFAULT_MTU, 68, 65535),
    )


@dataclass(frozen=True)
class BackendFeatures:
    """What the backend advertises in its directory."""

    rx_copy: bool = True
    sg: bool = False
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False
    ipv6_csum_offload: bool = False
    max_queues: int = 1

    KEYS = (
        "feature-rx-copy",
        "feature-sg",
        "feature-gso-tcpv4",
        "feature-gso-tcpv6",
        "feature-ipv6-csum-offload",
        "multi-queue-max-queues",
    )

    @classmethod
    def parse(cls, values: dict[str, bytes | None]) -> BackendFeatures:
        mq = values.get("multi-queue-max-queues")
        return cls(
            rx_copy=feature(values.get("feature-rx-copy")),
            sg=feature(values.get("feature-sg")),
            gso_tcpv4=feature(values.get("feature-gso-tcpv4")),
            gso_tcpv6=feature(values.get("feature-gso-tcpv6")),
            ipv6_csum_offload=feature(values.get("feature-ipv6-csum-offload")),
            max_queues=read_int(mq or None, "multi-queue-max-queues", 1, 1, 64),
        )

    def entries(self) -> dict[str, str]:
        return {
            "feature-rx-copy": str(int(self.rx_copy)),
            "feature-rx-flip": "0",
            "feature-sg": str(int(self.sg)),
            "feature-gso-tcpv4": str(int(self.gso_tcpv4)),
            "feature-gso-tcpv6": str(int(self.gso_tcpv6)),
            "feature-ipv6-csum-offload": str(int(self.ipv6_csum_offload)),
            "multi-queue-max-queues": str(self.max_queues),
        }


@dataclass(frozen=True)
class FrontendFeatures:
    """What the frontend requests/accepts (on its receive side) in its directory."""

    rx_copy: bool = True
    rx_notify: bool = True
    sg: bool = False
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False
    csum_offload: bool = False  # accepts partial IPv4 checksums on RX
    ipv6_csum_offload: bool = False
    persistent: bool = False

    KEYS = (
        "request-rx-copy",
        "feature-rx-notify",
        "feature-sg",
        "feature-gso-tcpv4",
        "feature-gso-tcpv6",
        "feature-no-csum-offload",
        "feature-ipv6-csum-offload",
        "feature-persistent",
    )

    @classmethod
    def parse(cls, values: dict[str, bytes | None]) -> FrontendFeatures:
        return cls(
            rx_copy=feature(values.get("request-rx-copy")),
            rx_notify=feature(values.get("feature-rx-notify")),
            sg=feature(values.get("feature-sg")),
            gso_tcpv4=feature(values.get("feature-gso-tcpv4")),
            gso_tcpv6=feature(values.get("feature-gso-tcpv6")),
            csum_offload=not feature(values.get("feature-no-csum-offload")),
            ipv6_csum_offload=feature(values.get("feature-ipv6-csum-offload")),
            persistent=feature(values.get("feature-persistent")),
        )

    def entries(self) -> dict[str, str]:
        return {
            "request-rx-copy": str(int(self.rx_copy)),
            "feature-rx-notify": str(int(self.rx_notify)),
            "feature-sg": str(int(self.sg)),
            "feature-gso-tcpv4": str(int(self.gso_tcpv4)),
            "feature-gso-tcpv6": str(int(self.gso_tcpv6)),
            "feature-no-csum-offload": str(int(not self.csum_offload)),
            "feature-ipv6-csum-offload": str(int(self.ipv6_csum_offload)),
            "feature-persistent": str(int(self.persistent)),
        }


__all__ = [
    "BACKEND_MAC",
    "DEFAULT_MTU",
    "FRONTEND_RING_KEYS",
    "VIF",
    "BackendFeatures",
    "FrontendFeatures",
    "default_mac",
    "link_keys",
    "mac_text",
    "parse_link",
    "parse_mac_value",
]
