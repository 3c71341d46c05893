"""``aioxen device add|rm|ls``: the toolstack step for xenbus devices (as ``xl`` does it)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aioxen.platforms import resolve
from aioxen.xenbus.toolstack import add_device, list_devices, remove_device


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "device",
        help="create, remove and list xenbus devices (the toolstack step)",
        description=(
            "Create or remove the two XenStore directories of a split device (front end "
            "/local/domain/F/device/TYPE/N, back end /local/domain/B/backend/TYPE/F/N) with "
            "xl's keys and permissions.  Needs toolstack rights (domain 0)."
        ),
    )
    sub = p.add_subparsers(dest="device_command", metavar="COMMAND", required=True)

    add = sub.add_parser("add", help="create a device")
    add.add_argument("type", help="device type (console, vif, vbd, ...)")
    add.add_argument("frontend_domid", type=int, help="the front end (guest) domain")
    add.add_argument("--devid", type=int, default=0, help="device number (default 0)")
    add.add_argument("--backend-domid", type=int, help="the back end domain (default: this domain)")
    add.add_argument("--key", action="append", default=[], metavar="K=V",
                     help="extra front end key (repeatable)")  # fmt: skip
    add.add_argument("--backend-key", action="append", default=[], metavar="K=V",
                     help="extra back end key (repeatable)")  # fmt: skip
    add.add_argument("--replace", action="store_true", help="reset an existing device")
    add.set_defaults(func=_add)

    rm = sub.add_parser("rm", help="remove a device (asks the back end to close first)")
    rm.add_argument("type")
    rm.add_argument("frontend_domid", type=int)
    rm.add_argument("--devid", type=int, default=0)
    rm.add_argument("--backend-domid", type=int)
    rm.add_argument("--force", action="store_true", help="remove without waiting for Closed")
    rm.add_argument("--timeout", type=float, default=10.0,
                    help="seconds to wait for the back end to close (default 10)")  # fmt: skip
    rm.set_defaults(func=_rm)

    ls = sub.add_parser("ls", help="list devices")
    ls.add_argument("domid", type=int, nargs="?", help="only devices of this domain")
    ls.set_defaults(func=_ls)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SystemExit(f"aioxen device: {what} {item!r} is not K=V")
        out[k] = v
    return out


async def _add(args: argparse.Namespace) -> int:
    plat = await resolve(None)
    be = plat.domid if args.backend_domid is None else args.backend_domid
    try:
        info = await add_device(
            plat.store, args.type, args.frontend_domid, be, args.devid,
            frontend_keys=_pairs(args.key, "--key"),
            backend_keys=_pairs(args.backend_key, "--backend-key"), replace=args.replace,
        )  # fmt: skip
    except (OSError, ValueError) as exc:  # FileExistsError, PermissionError, DeviceInUse
        print(f"aioxen device add: {exc}", file=sys.stderr)
        return 1
    print(f"{info.frontend_dir}\n{info.backend_dir}")
    return 0


async def _rm(args: argparse.Namespace) -> int:
    plat = await resolve(None)
    be = plat.domid if args.backend_domid is None else args.backend_domid
    try:
        orderly = await remove_device(
            plat.store, args.type, args.frontend_domid, be, args.devid,
            force=args.force, timeout=args.timeout,
        )  # fmt: skip
    except (FileNotFoundError, PermissionError) as exc:
        print(f"aioxen device rm: {exc}", file=sys.stderr)
        return 1
    if not orderly and not args.force:
        print("aioxen device rm: back end did not close in time; removed anyway", file=sys.stderr)
    return 0


async def _ls(args: argparse.Namespace) -> int:
    plat = await resolve(None)
    devices = await list_devices(plat.store, args.domid)
    print(f"{'type':<10} {'devid':>5} {'front':>5} {'back':>5} {'f-state':<13} {'b-state':<13}")
    for d in devices:
        fs = str(d.frontend_state) if d.frontend_state is not None else "-"
        bs = str(d.backend_state) if d.backend_state is not None else "-"
        be = str(d.backend_domid) if d.backend_domid >= 0 else "?"
        print(f"{d.type:<10} {d.devid:>5} {d.frontend_domid:>5} {be:>5} {fs:<13} {bs:<13}")
    return 0
