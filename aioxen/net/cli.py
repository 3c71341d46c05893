"""``aioxen netback`` and ``aioxen netfront``: vifs on the command line.

``aioxen netback --frontend DOMID [--frontend DOMID ...] (--tap NAME | --switch [--tap NAME])``
creates the vif devices (the toolstack's job on ``unix``; skip with ``--no-create`` under
a real toolstack) and serves them: with ``--tap`` the single vif is cross-connected to the
TAP interface, with ``--switch`` all vifs (and the TAP, as an uplink) share a learning
switch.  ``aioxen netfront --backend DOMID --tap NAME`` connects this domain's vif and
cross-connects it with a TAP, so the kernel's own stack is the guest.  Both print one
``READY`` line when serving/connected and run until interrupted (SIGINT/SIGTERM), then
disconnect cleanly.

The commands follow the command-line standard ([`aioxen.apps.clistd`][]): arguments are
checked before any I/O (a bad domid, device id, MAC, MTU or interface name, a missing
``--tap``/``--switch``: usage errors, rc 2); a frontend whose device never appears or
whose backend never connects fails after ``--timeout`` with a message naming the XenStore
path and states it waited on (rc 1); a stop by SIGINT or SIGTERM exits 130 or 143 after
the orderly disconnect.  Readiness for supervisors: besides the ``READY`` line,
``--ready-fd N`` and systemd's ``$NOTIFY_SOCKET`` ([`aioxen.apps.clistd.notify_ready`][]).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from aioxen.apps import clistd as std
from aioxen.cli import StopSignals
from aioxen.net import keys


def _mac(text: str) -> bytes:
    try:
        return keys.parse_mac_value(text.encode())
    except Exception:
        raise argparse.ArgumentTypeError(f"invalid MAC address {text!r}") from None


def _ifname(text: str) -> str:
    """A network interface name: 1..15 bytes, no ``/`` or white space."""
    from aioxen.net.tap import IFNAMSIZ

    raw = text.encode()
    if not raw or len(raw) >= IFNAMSIZ or "/" in text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(
            f"invalid interface name {text!r}: 1..{IFNAMSIZ - 1} bytes, no '/' or spaces"
        )
    return text


def _ready(args: argparse.Namespace, line: str) -> std.Readiness:
    """Print the ``READY`` line and tell a supervisor (``--ready-fd``, ``$NOTIFY_SOCKET``)."""
    print(line, flush=True)
    return std.notify_ready(args, status=line)


async def run_netback(args: argparse.Namespace) -> int:
    import aioxen
    from aioxen.net.back import Netback, Vif
    from aioxen.net.switch import FunctionPort, LearningSwitch
    from aioxen.net.tap import TapDevice, TapPort
    from aioxen.net.tap_glue import attach_tap_to_vif

    frontends: list[int] = args.frontend
    if not args.switch and args.tap is None:
        raise std.UsageError("give --tap NAME, --switch, or both")
    if not args.switch and len(frontends) != 1:
        raise std.UsageError("several --frontend domains need --switch")
    stop = StopSignals()  # SIGINT/SIGTERM: orderly stop
    plat = aioxen.platform()
    async with plat:
        switch = LearningSwitch() if args.switch else None
        tap = TapDevice(args.tap) if args.tap else None
        ports: dict[int, TapPort] = {}
        if switch is not None and tap is not None:
            tap.set_offload(csum=True, tso4=True, tso6=True)
            uplink = FunctionPort(tap.name, tap.write_frame, accept_csum=True, accept_gso=True)
            switch.add_port(uplink)
            up = TapPort(tap, lambda f, i: switch.input(uplink, f, i))
            up.resume_reading()

        def connect(vif: Vif) -> Any:
            if switch is None:
                assert tap is not None
                ports[id(vif)] = attach_tap_to_vif(vif, tap)
                return tap.write_frame
            switch.add_port(vif)
            return lambda frame, info: switch.input(vif, frame, info)

        def disconnect(vif: Vif) -> None:
            port = ports.pop(id(vif), None)
            if port is not None:
                port.pause_reading()
            if switch is not None:
                switch.remove_port(vif)

        netback = Netback(plat, connect=connect, disconnect=disconnect)
        try:  # each vif is claimed first: one another process serves fails here, untouched
            for fe in frontends:
                await netback.add(
                    fe, args.devid, create=not args.no_create, mac=args.mac, mtu=args.mtu
                )
        except BaseException:
            await netback.close(remove=not args.no_create)
            if tap is not None:
                tap.close()
            raise
        ready = _ready(
            args,
            f"READY netback domain {plat.domid} serving "
            + ", ".join(f"vif {fe}/{args.devid}" for fe in frontends),
        )
        waiter = asyncio.ensure_future(netback.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        waiter.cancel()
        ready.stopping()
        await netback.close(remove=not args.no_create)
        if tap is not None:
            tap.close()
    return 0


async def run_netfront(args: argparse.Namespace) -> int:
    import aioxen
    from aioxen.net.keys import VIF
    from aioxen.xenbus.claim import Claim
    from aioxen.xenbus.driver import frontend_device, frontend_dir

    stop = StopSignals()  # SIGINT/SIGTERM: orderly stop
    plat = aioxen.platform()
    async with plat:
        # wait (read-only) for the toolstack's device, then claim it before the TAP is
        # touched: a second netfront for this vif fails here and changes nothing
        try:
            dev = await frontend_device(plat, VIF, args.devid, timeout=args.timeout)
        except TimeoutError:
            own = frontend_dir(plat.domid, VIF, args.devid)
            raise TimeoutError(
                f"vif {plat.domid}/{args.devid}: no such device after {args.timeout:g} s "
                f"(waited for {own}/backend and backend-id, which the toolstack or "
                "aioxen netback writes)"
            ) from None
        claim = Claim(plat.store, dev.own_dir, f"vif {plat.domid}/{args.devid}")
        try:
            await claim.acquire()
        except BaseException:
            claim.abandon()
            raise
        try:
            return await _netfront_claimed(args, plat, claim, stop)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await claim.release()
            claim.abandon()


async def _netfront_claimed(
    args: argparse.Namespace, plat: Any, claim: Any, stop: StopSignals
) -> int:
    from aioxen.net.front import create_frontend
    from aioxen.net.tap import TapDevice, format_mac
    from aioxen.net.tap_glue import TapFrontend

    tap = TapDevice(args.tap)
    try:
        transport, protocol = await create_frontend(
            lambda: TapFrontend(tap, configure_link=not args.keep_link),
            args.backend,
            args.devid,
            platform=plat,
            offload=not args.no_offload,
            timeout=args.timeout,
            claim=claim,
        )
        assert isinstance(protocol, TapFrontend)
        ready = _ready(
            args,
            f"READY netfront vif {plat.domid}/{args.devid} on {tap.name} "
            f"mac {format_mac(transport.get_extra_info('mac'))} "
            f"mtu {transport.get_extra_info('mtu')}",
        )
        stopper = asyncio.ensure_future(stop.wait())
        waits: list[asyncio.Future[Any]] = [stopper, protocol.closed]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        ready.stopping()
        if protocol.closed.done():
            exc = protocol.closed.result()
            if exc is not None:
                print(f"aioxen netfront: disconnected: {exc}", file=sys.stderr)
                return 1
            return 0
        transport.close()
        await transport.wait_closed()
    finally:
        tap.close()
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "netback",
        help="serve netfront vifs: to a TAP device, a learning switch, or both",
        description="Create and serve vif --devid of each --frontend domain: with --tap the "
        "single vif is cross-connected to the TAP interface, with --switch all vifs (and "
        "the TAP, as an uplink) share a learning switch.  Prints one READY line when "
        "serving and runs until interrupted (SIGINT exits 130, SIGTERM 143, after an "
        "orderly disconnect).",
    )
    p.add_argument(
        "--frontend",
        type=std.domid,
        action="append",
        required=True,
        metavar="DOMID",
        help="frontend domain to serve (repeat for several)",
    )
    p.add_argument(
        "--devid",
        type=std.nonnegative_int,
        default=0,
        metavar="N",
        help="vif device id (default 0)",
    )
    p.add_argument("--tap", type=_ifname, metavar="NAME", help="TAP interface (created if missing)")
    p.add_argument("--switch", action="store_true", help="switch between all vifs (+ --tap)")
    p.add_argument(
        "--mac", type=_mac, default=None, help="frontend MAC address (default 00:16:3e:...)"
    )
    p.add_argument(
        "--mtu",
        type=std.int_range(68, 65535, "MTU"),
        metavar="BYTES",
        default=keys.DEFAULT_MTU,
        help="vif MTU, 68..65535 (default 1500)",
    )
    p.add_argument(
        "--no-create",
        action="store_true",
        help="serve devices a toolstack created instead of creating them",
    )
    std.add_readiness_arguments(p, env_file=False)
    p.set_defaults(func=run_netback)

    f = subparsers.add_parser(
        "netfront",
        help="connect this domain's vif and cross-connect it with a TAP device",
        description="Connect vif --devid of this domain (created by a toolstack or aioxen "
        "netback) and cross-connect it with a TAP interface, so that the kernel's own "
        "network stack is the guest.  Prints one READY line when connected and runs until "
        "interrupted (SIGINT exits 130, SIGTERM 143, after an orderly disconnect).",
    )
    f.add_argument(
        "--backend",
        type=std.domid,
        default=None,
        metavar="DOMID",
        help="expected backend domain (default: whatever the toolstack wrote)",
    )
    f.add_argument(
        "--devid",
        type=std.nonnegative_int,
        default=0,
        metavar="N",
        help="vif device id (default 0)",
    )
    f.add_argument(
        "--tap",
        type=_ifname,
        metavar="NAME",
        required=True,
        help="TAP interface (created if missing)",
    )
    f.add_argument(
        "--no-offload", action="store_true", help="refuse partial checksums and GSO on receive"
    )
    f.add_argument(
        "--keep-link", action="store_true", help="do not copy the vif's MAC/MTU to the TAP"
    )
    f.add_argument(
        "--timeout",
        type=std.seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds to wait for the device to appear and connect (default 30)",
    )
    std.add_readiness_arguments(f, env_file=False)
    f.set_defaults(func=run_netfront)


__all__ = ["register", "run_netback", "run_netfront"]
