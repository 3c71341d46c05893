"""``aioxen xenstored`` (the server) and ``aioxen xenstore ...`` (a client for people)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import stat
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from aioxen.apps.clistd import (
    Readiness,
    UsageError,
    add_readiness_arguments,
    domid,
    export_lines,
    nonnegative_int,
    notify_ready,
    seconds,
)
from aioxen.cli import StopSignals
from aioxen.errors import ProtocolError
from aioxen.platforms._rootdir import (
    RootPermissionError,
    check_socket,
    describe,
    ensure_private_dir,
    ensure_private_subdirs,
    inside,
)
from aioxen.xenstore.client import XenStoreClient
from aioxen.xenstore.engine import Quotas
from aioxen.xenstore.transport import default_socket_path
from aioxen.xenstore.wire import Perm

log = logging.getLogger(__name__)

STATE_FILE_NAME = "store.json"


def register(subparsers: Any) -> None:
    _register_xenstored(subparsers)
    _register_xenstore(subparsers)


# -- aioxen xenstored -----------------------------------------------------------------


def _register_xenstored(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "xenstored",
        help="run an asyncio xenstored on a Unix socket (the unix platform's XenStore)",
        description=(
            "Serve XenStore on DIR/xenstored/socket, speaking Xen's wire protocol (Xen's "
            "xenstore-* tools work against it with XENSTORED_PATH set).  When ready, prints "
            "shell export lines for XEN_ROOT and XENSTORED_PATH.  Runs in the foreground "
            "until SIGTERM/SIGINT."
        ),
    )
    p.add_argument(
        "--root",
        default=os.environ.get("XEN_ROOT"),
        help=(
            "the unix platform's root directory (default $XEN_ROOT): a private directory "
            "of yours, created 0700 if missing; a link, another user's directory or one "
            "group/other can access is refused.  Never a shared fixed path such as "
            '/tmp/NAME: use e.g. "$(mktemp -d)" or a directory in $XDG_RUNTIME_DIR'
        ),
    )
    p.add_argument("--socket", help="socket path (default ROOT/xenstored/socket)")
    p.add_argument(
        "--persist",
        action="store_true",
        help=f"keep the tree in ROOT/xenstored/{STATE_FILE_NAME} across restarts",
    )
    p.add_argument("--state-file", help="keep the tree in this file (implies --persist)")
    p.add_argument(
        "--quota",
        action="append",
        default=[],
        type=_quota,
        metavar="NAME=N",
        help=f"override a quota (repeatable); NAME is one of {', '.join(_QUOTA_NAMES)}",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log requests at debug level")
    add_readiness_arguments(p)
    p.set_defaults(func=_run_xenstored)


_QUOTA_NAMES = tuple(f.name.replace("_", "-") for f in dataclasses.fields(Quotas))
"""The quota names as the command line spells them (``node-size``; ``node_size`` works too)."""


def _quota(text: str) -> tuple[str, int]:
    """``NAME=N`` -> ``(name, N)``, checked before anything is opened."""
    name, sep, value = text.partition("=")
    name = name.strip().replace("_", "-")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=N, e.g. node-size=4096")
    if name not in _QUOTA_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown quota {name!r}; known: {', '.join(_QUOTA_NAMES)}"
        )
    if not value.strip().isdecimal():
        raise argparse.ArgumentTypeError(f"invalid quota {name}={value}: not a whole number >= 0")
    return name, int(value)


async def _run_xenstored(args: argparse.Namespace) -> int:
    from aioxen.apps.stderr_log import StderrLogHandler
    from aioxen.xenstore.server import XenStoreServer

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="aioxen xenstored: %(message)s",
        handlers=[StderrLogHandler()],  # never blocks the store on an unread stderr
    )
    if not args.root:
        print(
            "aioxen xenstored: --root DIR is required (or set $XEN_ROOT), a private directory "
            'such as --root "$(mktemp -d)"',
            file=sys.stderr,
        )
        return 2
    quotas = Quotas()
    for name, value in args.quota:
        quotas.set(name, value)
    root = os.path.abspath(args.root)
    try:
        # A private root: a real directory of ours, no group/other access, never a link
        # (created 0700 if missing); anything else is refused, nothing is repaired.
        ensure_private_dir(root)
        rundir = ensure_private_subdirs(root, "xenstored")
    except OSError as exc:
        print(f"aioxen xenstored: {_message(exc)}", file=sys.stderr)
        return 1
    sock = os.path.abspath(args.socket) if args.socket else os.path.join(rundir, "socket")
    state_file = args.state_file or (
        os.path.join(rundir, STATE_FILE_NAME) if args.persist else None
    )
    if args.env_file:
        args.env_file = os.path.abspath(args.env_file)
    if args.state_file:
        try:
            _check_state_file(os.path.abspath(args.state_file))
        except OSError as exc:
            print(f"aioxen xenstored: {_message(exc)}", file=sys.stderr)
            return 1
    try:
        server = XenStoreServer(sock, state_file=state_file, quotas=quotas)
        await server.start()
    except (OSError, ValueError) as exc:
        print(f"aioxen xenstored: {_message(exc)}", file=sys.stderr)
        return 1
    stop = StopSignals()  # SIGINT/SIGTERM: orderly stop
    ready: Readiness | None = None
    try:
        exports = {"XEN_ROOT": root, "XENSTORED_PATH": sock}
        sys.stdout.write(export_lines(exports))
        sys.stdout.flush()
        ready = notify_ready(args, exports=exports, status=f"serving {sock}")
        await stop.wait()
    finally:
        stop.close()
        if ready is not None:
            ready.stopping()
        await server.close()
    return 0


def _check_state_file(path: str) -> None:
    """The state file holds the whole tree (secrets included) and is loaded as the truth at
    start: it must live in a private directory of ours and, if present, be a regular file
    of ours (not a link)."""
    ensure_private_dir(os.path.dirname(path), what="the directory of a xenstored state file")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise RootPermissionError(
            errno.EPERM,
            f"refusing the state file {path}: not a regular file of yours ({describe(st)})",
        )


# -- aioxen xenstore ------------------------------------------------------------------


def _register_xenstore(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "xenstore",
        help="read, write, list, remove, watch and chmod XenStore nodes",
        description=(
            "A XenStore client for people.  Talks to the xenstored socket at "
            "$XENSTORED_PATH (default /var/run/xenstored/socket): aioxen xenstored or Xen's."
        ),
    )
    p.add_argument("--socket", help="xenstored socket (default $XENSTORED_PATH)")
    p.add_argument(
        "--domid",
        type=domid,
        default=os.environ.get("AIOXEN_DOMID", "0"),  # a string: checked by type= as well
        help="act as this domain (aioxen xenstored only; default $AIOXEN_DOMID or 0)",
    )
    p.add_argument(
        "--timeout",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for each reply (default %(default)g)",
    )
    sub = p.add_subparsers(dest="xs_command", metavar="OPERATION", required=True)

    s = sub.add_parser("read", help="print the value of each PATH")
    s.add_argument("paths", nargs="+", metavar="PATH", help="a node, e.g. /local/domain/0/name")
    s.set_defaults(func=_cmd(_read))

    s = sub.add_parser("write", help="write VALUE to PATH (pairs may repeat)")
    s.add_argument("pairs", nargs="+", metavar="PATH VALUE", help="a node and its new value")
    s.set_defaults(func=_cmd(_write))

    s = sub.add_parser("mkdir", help="make sure each PATH exists")
    s.add_argument("paths", nargs="+", metavar="PATH", help="a node to create if missing")
    s.set_defaults(func=_cmd(_mkdir))

    s = sub.add_parser("ls", help="list the tree below PATH with values (like xenstore-ls)")
    s.add_argument(
        "path", nargs="?", default="/", metavar="PATH", help="where to start (default /)"
    )
    s.add_argument("-p", "--perms", action="store_true", help="show permissions too")
    s.set_defaults(func=_cmd(_ls))

    s = sub.add_parser("rm", help="remove each PATH and everything below it")
    s.add_argument("paths", nargs="+", metavar="PATH", help="a node to remove")
    s.set_defaults(func=_cmd(_rm))

    s = sub.add_parser("watch", help="print each changed path below PATH")
    s.add_argument("path", metavar="PATH", help="the node to watch (with everything below it)")
    s.add_argument(
        "-n",
        "--count",
        type=nonnegative_int,
        default=0,
        metavar="N",
        help="exit after N events (default 0: run until interrupted)",
    )
    s.set_defaults(func=_cmd(_watch))

    s = sub.add_parser(
        "perms", help="show PATH's permissions, or set them (owner first: n0 r2 ...)"
    )
    s.add_argument("path", metavar="PATH", help="the node")
    s.add_argument(
        "perms",
        nargs="*",
        type=_perm,
        metavar="PERM",
        help="n, r, w or b followed by a domid (owner first, e.g. n0 r2); none: show them",
    )
    s.set_defaults(func=_cmd(_perms))


def _perm(text: str) -> Perm:
    """A permission ``[nrwb]DOMID`` for the command line, checked before any I/O."""
    if len(text) < 2 or text[0] not in "nrwb" or not text[1:].isdecimal():
        raise argparse.ArgumentTypeError(
            f"invalid permission {text!r}: expected n, r, w or b followed by a domid (e.g. r2)"
        )
    domid(text[1:])  # the range
    return Perm.parse(text)


Op = Callable[[XenStoreClient, argparse.Namespace], Coroutine[Any, Any, int]]


def _cmd(op: Op) -> Callable[[argparse.Namespace], Coroutine[Any, Any, int]]:
    async def run(args: argparse.Namespace) -> int:
        if args.xs_command == "write" and len(args.pairs) % 2:
            raise UsageError("write takes PATH VALUE pairs (an odd number of words given)")
        path = args.socket or default_socket_path()
        try:
            # Never talk to a socket another user could have put there (issue 13).
            check_socket(path, private=_in_own_root(path))
        except OSError as exc:
            print(f"aioxen xenstore {args.xs_command}: {_message(exc)}", file=sys.stderr)
            return 1
        client = XenStoreClient.for_unix_socket(path, args.domid, timeout=args.timeout)
        task = asyncio.current_task()
        assert task is not None
        # SIGINT/SIGTERM (a watch runs until then): cancel the operation, close the
        # connection in order; main then exits 128 + the signal.
        stop = StopSignals(on_signal=lambda _: task.cancel())
        try:
            return await op(client, args)
        except asyncio.CancelledError:
            if stop.received is None:
                raise
            return 0
        except (OSError, ValueError, TimeoutError, ProtocolError) as exc:
            print(f"aioxen xenstore {args.xs_command}: {_message(exc)}", file=sys.stderr)
            return 1
        finally:
            stop.close()
            with contextlib.suppress(Exception):
                await client.close()

    return run


def _message(exc: Exception) -> str:
    """``exc`` for people ([`aioxen.apps.clistd.describe`][]: no ``[Errno N]``)."""
    from aioxen.apps.clistd import describe as describe_exc

    return describe_exc(exc)


def _in_own_root(path: str) -> bool:
    """Whether the socket ``path`` is in ``$XEN_ROOT`` (whose directories must be private)."""
    root = os.environ.get("XEN_ROOT")
    return root is not None and root != "" and inside(path, root)


def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


async def _read(client: XenStoreClient, args: argparse.Namespace) -> int:
    for path in args.paths:
        _out(await client.read(path) + b"\n")
    return 0


async def _write(client: XenStoreClient, args: argparse.Namespace) -> int:
    pairs = args.pairs
    if len(pairs) % 2:
        raise ValueError("write takes PATH VALUE pairs")

    async def body(tx: Any) -> None:
        for path, value in zip(pairs[::2], pairs[1::2], strict=True):
            await tx.write(path, os.fsencode(value))

    await client.transact(body)
    return 0


async def _mkdir(client: XenStoreClient, args: argparse.Namespace) -> int:
    for path in args.paths:
        await client.mkdir(path)
    return 0


async def _rm(client: XenStoreClient, args: argparse.Namespace) -> int:
    for path in args.paths:
        await client.rm(path)
    return 0


def _escape(value: bytes) -> str:
    out = []
    for byte in value:
        ch = chr(byte)
        if ch == "\\" or ch == '"':
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


async def _ls(client: XenStoreClient, args: argparse.Namespace) -> int:
    async def show(path: str, depth: int) -> None:
        for name in await client.directory(path):
            child = f"/{name}" if path == "/" else f"{path}/{name}"
            try:
                value = _escape(await client.read(child))
            except PermissionError:
                value = "<no read permission>"
            line = f'{" " * depth}{name} = "{value}"'
            if args.perms:
                perms = ",".join(str(p) for p in await client.get_perms(child))
                line += f"  ({perms})"
            print(line, flush=False)
            await show(child, depth + 1)

    await show(args.path.rstrip("/") or "/", 0)
    sys.stdout.flush()
    return 0


async def _watch(client: XenStoreClient, args: argparse.Namespace) -> int:
    seen = 0
    async with client.watch(args.path) as w:
        async for changed in w:
            print(changed, flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    return 0


async def _perms(client: XenStoreClient, args: argparse.Namespace) -> int:
    if args.perms:
        await client.set_perms(args.path, args.perms)
    else:
        print(" ".join(str(p) for p in await client.get_perms(args.path)), flush=True)
    return 0


__all__ = ["register"]
