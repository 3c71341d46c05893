"""``aioxen xenstored`` (the server) and ``aioxen xenstore ...`` (a client for people)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shlex
import stat
import sys
from collections.abc import Callable, Coroutine
from typing import Any

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
        metavar="NAME=N",
        help=(
            "override a quota: nodes, node-size, watches, transactions, permissions, "
            "transaction-nodes, outstanding, watch-event-backlog"
        ),
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log requests at debug level")
    p.set_defaults(func=_run_xenstored)


async def _run_xenstored(args: argparse.Namespace) -> int:
    from aioxen.xenstore.server import XenStoreServer

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="aioxen xenstored: %(message)s",
        stream=sys.stderr,
    )
    if not args.root:
        print(
            "aioxen xenstored: --root DIR is required (or set $XEN_ROOT), a private directory "
            'such as --root "$(mktemp -d)"',
            file=sys.stderr,
        )
        return 2
    quotas = Quotas()
    try:
        for item in args.quota:
            name, _, value = item.partition("=")
            quotas.set(name, int(value))
    except ValueError as exc:
        print(f"aioxen xenstored: bad --quota: {exc}", file=sys.stderr)
        return 2
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
    try:
        sys.stdout.write(
            f"XEN_ROOT={shlex.quote(root)}; export XEN_ROOT;\n"
            f"XENSTORED_PATH={shlex.quote(sock)}; export XENSTORED_PATH;\n"
        )
        sys.stdout.flush()
        await stop.wait()
    finally:
        stop.close()
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
        type=int,
        default=int(os.environ.get("AIOXEN_DOMID", "0")),
        help="act as this domain (aioxen xenstored only; default $AIOXEN_DOMID or 0)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (seconds)")
    sub = p.add_subparsers(dest="xs_command", metavar="OPERATION", required=True)

    s = sub.add_parser("read", help="print the value of each PATH")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.set_defaults(func=_cmd(_read))

    s = sub.add_parser("write", help="write VALUE to PATH (pairs may repeat)")
    s.add_argument("pairs", nargs="+", metavar="PATH VALUE")
    s.set_defaults(func=_cmd(_write))

    s = sub.add_parser("mkdir", help="make sure each PATH exists")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.set_defaults(func=_cmd(_mkdir))

    s = sub.add_parser("ls", help="list the tree below PATH with values (like xenstore-ls)")
    s.add_argument("path", nargs="?", default="/", metavar="PATH")
    s.add_argument("-p", "--perms", action="store_true", help="show permissions too")
    s.set_defaults(func=_cmd(_ls))

    s = sub.add_parser("rm", help="remove each PATH and everything below it")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.set_defaults(func=_cmd(_rm))

    s = sub.add_parser("watch", help="print each changed path below PATH")
    s.add_argument("path", metavar="PATH")
    s.add_argument("-n", "--count", type=int, default=0, help="exit after N events")
    s.set_defaults(func=_cmd(_watch))

    s = sub.add_parser(
        "perms", help="show PATH's permissions, or set them (owner first: n0 r2 ...)"
    )
    s.add_argument("path", metavar="PATH")
    s.add_argument("perms", nargs="*", metavar="PERM")
    s.set_defaults(func=_cmd(_perms))


Op = Callable[[XenStoreClient, argparse.Namespace], Coroutine[Any, Any, int]]


def _cmd(op: Op) -> Callable[[argparse.Namespace], Coroutine[Any, Any, int]]:
    async def run(args: argparse.Namespace) -> int:
        path = args.socket or default_socket_path()
        try:
            # Never talk to a socket another user could have put there (issue 13).
            check_socket(path, private=_in_own_root(path))
        except OSError as exc:
            print(f"aioxen xenstore {args.xs_command}: {_message(exc)}", file=sys.stderr)
            return 1
        client = XenStoreClient.for_unix_socket(path, args.domid, timeout=args.timeout)
        try:
            return await op(client, args)
        except (OSError, ValueError, TimeoutError, ProtocolError) as exc:
            print(f"aioxen xenstore {args.xs_command}: {exc}", file=sys.stderr)
            return 1
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    return run


def _message(exc: Exception) -> str:
    """``exc`` for people: an ``OSError``'s own sentence without the ``[Errno N]`` prefix."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        return exc.strerror
    return str(exc)


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
        await client.set_perms(args.path, [Perm.parse(p) for p in args.perms])
    else:
        print(" ".join(str(p) for p in await client.get_perms(args.path)), flush=True)
    return 0


__all__ = ["register"]
