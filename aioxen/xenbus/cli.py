"""``aioxen device add|rm|ls``: the toolstack step for xenbus devices (as ``xl`` does it)."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from aioxen.apps.clistd import check_root_env, domid, nonnegative_int, seconds
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
    add.add_argument("type", type=_devtype, help="device type (console, vif, vbd, ...)")
    add.add_argument("frontend_domid", type=domid, help="the front end (guest) domain")
    add.add_argument("--devid", type=nonnegative_int, default=0, help="device number (default 0)")
    add.add_argument(
        "--backend-domid", type=domid, help="the back end domain (default: this domain)"
    )
    add.add_argument("--key", action="append", default=[], metavar="K=V", type=_pair,
                     help="extra front end key (repeatable)")  # fmt: skip
    add.add_argument("--backend-key", action="append", default=[], metavar="K=V", type=_pair,
                     help="extra back end key (repeatable)")  # fmt: skip
    add.add_argument("--replace", action="store_true", help="reset an existing device")
    add.set_defaults(func=_add)

    rm = sub.add_parser("rm", help="remove a device (asks the back end to close first)",
                        description="Remove a device's front and back end directories.  The "
                        "back end is first asked to close (state Closing) and given --timeout "
                        "seconds to reach Closed; --force skips that.")  # fmt: skip
    rm.add_argument("type", type=_devtype, help="device type (console, vif, vbd, ...)")
    rm.add_argument("frontend_domid", type=domid, help="the front end (guest) domain")
    rm.add_argument("--devid", type=nonnegative_int, default=0, help="device number (default 0)")
    rm.add_argument(
        "--backend-domid", type=domid, help="the back end domain (default: this domain)"
    )
    rm.add_argument("--force", action="store_true", help="remove without waiting for Closed")
    rm.add_argument("--timeout", type=seconds, default=10.0, metavar="SECONDS",
                    help="how long to wait for the back end to close (default 10)")  # fmt: skip
    rm.set_defaults(func=_rm)

    ls = sub.add_parser("ls", help="list devices")
    ls.add_argument("domid", type=domid, nargs="?", help="only devices of this (front end) domain")
    ls.set_defaults(func=_ls)


def _devtype(text: str) -> str:
    """A device type: a XenStore path component such as ``vif`` (checked before any I/O)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise argparse.ArgumentTypeError(
            f"invalid device type {text[:80]!r}: expected a name such as vif, vbd or console"
        )
    return text


def _pair(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not K=V")
    return k, v


async def _add(args: argparse.Namespace) -> int:
    check_root_env()  # a missing or non-directory $XEN_ROOT: before any I/O
    plat = await resolve(None)
    be = plat.domid if args.backend_domid is None else args.backend_domid
    try:
        info = await add_device(
            plat.store, args.type, args.frontend_domid, be, args.devid,
            frontend_keys=dict(args.key),
            backend_keys=dict(args.backend_key), replace=args.replace,
        )  # fmt: skip
    except (OSError, ValueError) as exc:  # FileExistsError, PermissionError, DeviceInUse
        print(f"aioxen device add: {exc}", file=sys.stderr)
        return 1
    print(f"{info.frontend_dir}\n{info.backend_dir}")
    return 0


async def _rm(args: argparse.Namespace) -> int:
    check_root_env()  # a missing or non-directory $XEN_ROOT: before any I/O
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
        print(
            f"aioxen device rm: the back end did not reach Closed within {args.timeout:g} s; "
            "removed anyway",
            file=sys.stderr,
        )
    return 0


async def _ls(args: argparse.Namespace) -> int:
    check_root_env()  # a missing or non-directory $XEN_ROOT: before any I/O
    plat = await resolve(None)
    devices = await list_devices(plat.store, args.domid)
    print(f"{'type':<10} {'devid':>5} {'front':>5} {'back':>5} {'f-state':<13} {'b-state':<13}")
    for d in devices:
        fs = str(d.frontend_state) if d.frontend_state is not None else "-"
        bs = str(d.backend_state) if d.backend_state is not None else "-"
        be = str(d.backend_domid) if d.backend_domid >= 0 else "?"
        print(f"{d.type:<10} {d.devid:>5} {d.frontend_domid:>5} {be:>5} {fs:<13} {bs:<13}")
    return 0
