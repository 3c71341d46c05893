"""XenStore layout of a vif: paths, feature keys and their parsing (pure).

Theory of operation
-------------------
A vif ``devid`` between frontend domain ``fe`` and backend domain ``be`` lives in two
directories written by the toolstack (``xl`` on Xen, ``aioxen netback`` on ``unix``):

* frontend dir ``/local/domain/<fe>/device/vif/<devid>``: ``backend``, ``backend-id``,
  ``mac``, ``mtu``, ``handle``, ``state``; the frontend adds ``tx-ring-ref``,
  ``rx-ring-ref``, ``event-channel``, ``request-rx-copy`` and its ``feature-*`` keys;
* backend dir ``/local/domain/<be>/backend/vif/<fe>/<devid>``: ``frontend``,
  ``frontend-id``, ``online``, ``state``, ``mac``, ``handle``; the backend adds its
  ``feature-*`` keys.

A feature is on iff its value is ``"1"`` (missing means off), except where netif.h gives a
different default (IPv4 checksum offload is on unless ``feature-no-csum-offload=1``).
``feature-persistent`` is aioxen's: "my TX/RX buffer grants stay granted for the life of
the connection", so a backend may keep them mapped instead of mapping per packet (blkif
uses the same key for the same promise).
"""

from __future__ import annotations

from dataclasses import dataclass

from aioxen.errors import ProtocolError

XENBUS_UNKNOWN = 0
XENBUS_INITIALISING = 1
XENBUS_INIT_WAIT = 2
XENBUS_INITIALISED = 3
XENBUS_CONNECTED = 4
XENBUS_CLOSING = 5
XENBUS_CLOSED = 6

DEFAULT_MTU = 1500
BACKEND_MAC = bytes.fromhex("feffffffffff")
"""The MAC a backend vif uses for itself (libxl/Qubes convention)."""


def frontend_dir(fe: int, devid: int) -> str:
    return f"/local/domain/{fe}/device/vif/{devid}"


def backend_dir(be: int, fe: int, devid: int) -> str:
    return f"/local/domain/{be}/backend/vif/{fe}/{devid}"


def backend_root(be: int) -> str:
    return f"/local/domain/{be}/backend/vif"


def flag(value: bytes | None) -> bool:
    """A feature value: on iff it is ``"1"``."""
    return value is not None and value.strip() == b"1"


def parse_int(value: bytes, what: str, lo: int = 0, hi: int = 2**32 - 1) -> int:
    """A decimal XenStore value in ``lo..hi``; ``ProtocolError`` naming ``what`` else."""
    text = value.strip().rstrip(b"\0")
    if not text.isdigit():
        raise ProtocolError(f"{what}: {value!r} is not a decimal number", field=what)
    number = int(text)
    if not lo <= number <= hi:
        raise ProtocolError(f"{what}: {number} out of range {lo}..{hi}", field=what)
    return number


def parse_state(value: bytes | None) -> int:
    if value is None:
        return XENBUS_UNKNOWN
    try:
        return parse_int(value, "state", 0, 8)
    except ProtocolError:
        return XENBUS_UNKNOWN


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
            rx_copy=flag(values.get("feature-rx-copy")),
            sg=flag(values.get("feature-sg")),
            gso_tcpv4=flag(values.get("feature-gso-tcpv4")),
            gso_tcpv6=flag(values.get("feature-gso-tcpv6")),
            ipv6_csum_offload=flag(values.get("feature-ipv6-csum-offload")),
            max_queues=parse_int(mq, "multi-queue-max-queues", 1, 64) if mq else 1,
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
            rx_copy=flag(values.get("request-rx-copy")),
            rx_notify=flag(values.get("feature-rx-notify")),
            sg=flag(values.get("feature-sg")),
            gso_tcpv4=flag(values.get("feature-gso-tcpv4")),
            gso_tcpv6=flag(values.get("feature-gso-tcpv6")),
            csum_offload=not flag(values.get("feature-no-csum-offload")),
            ipv6_csum_offload=flag(values.get("feature-ipv6-csum-offload")),
            persistent=flag(values.get("feature-persistent")),
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
    "XENBUS_CLOSED",
    "XENBUS_CLOSING",
    "XENBUS_CONNECTED",
    "XENBUS_INITIALISED",
    "XENBUS_INITIALISING",
    "XENBUS_INIT_WAIT",
    "XENBUS_UNKNOWN",
    "BackendFeatures",
    "FrontendFeatures",
    "backend_dir",
    "backend_root",
    "flag",
    "frontend_dir",
    "mac_text",
    "parse_int",
    "parse_mac_value",
    "parse_state",
]
