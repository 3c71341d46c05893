"""``aioxen cat`` and ``aioxen bridge``: argument parsing only; the work is in
[`aioxen.apps.cat`][] and [`aioxen.apps.bridge`][]."""

from __future__ import annotations

import argparse
from typing import Any

from aioxen import vchan
from aioxen.apps.clistd import (
    add_readiness_arguments,
    connect_address,
    domid,
    inherited_fd,
    listen_address,
    notify_ready,
    positive_int,
    seconds,
    size_in,
    vchan_port,
)

_size = size_in(1, vchan.MAX_RING_SIZE, "ring size")  # 65536, 0x10000, 64k

HELP_CAT = """\
Copy stdin to a vchan and the vchan to stdout (xencat/unixcat).  DOMID is always the peer:
the server's domain for a client, the client's domain with -l.  Each direction is closed
on its own (stdin EOF sends the vchan EOF; vchan EOF closes stdout); the command exits 0
when both are done.  With -l and no $XEN_ROOT on the unix platform, it creates a private
root with its own xenstored and prints the shell lines a second process evaluates to
connect as domain DOMID (to --env-fd, else to stderr):

  mkfifo env; aioxen cat -l 2 foo --env-fd 3 3>env <in >out &
  eval "$(cat env)"; aioxen cat 0 foo <in2 >out2
"""

HELP_BRIDGE = """\
Accept connections on one address and bridge each one, both directions, to a new
connection to the other address, with back-pressure end to end and half-close carried
through.  Addresses: tcp:HOST:PORT (tcp:[::1]:PORT for IPv6; PORT 0 picks a free one),
unix:PATH, vchan:DOMID/PORT (DOMID is the peer domain).  Examples:

  aioxen bridge --listen tcp:127.0.0.1:8080 --connect vchan:0/web   # use a vchan service
  aioxen bridge --listen vchan:2/web --connect tcp:127.0.0.1:8000   # offer a TCP service

When listening it prints 'aioxen bridge: listening on ADDR' on stdout (and, with
--env-file, writes AIOXEN_BRIDGE_ADDRESS=ADDR there).  SIGTERM/SIGINT stop it, closing
every bridged connection (exit status 143/130).
"""


def register(subparsers: Any) -> None:
    _register_cat(subparsers)
    _register_bridge(subparsers)


def _register_cat(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cat",
        help="stdin -> vchan -> stdout (xencat/unixcat)",
        description=HELP_CAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-l", "--listen", action="store_true", help="be the server (share the pages)")
    p.add_argument("domid", type=domid, metavar="DOMID", help="the peer domain")
    p.add_argument("port", type=vchan_port, metavar="PORT", help="vchan port name [A-Za-z0-9_-]+")
    p.add_argument(
        "--buffer-size",
        type=_size,
        default=vchan.DEFAULT_SIZE,
        metavar="N",
        help="ring size each way in bytes, chosen by the listener (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help=(
            "how long to wait for the peer (default: a client "
            f"{vchan.DEFAULT_CONNECT_TIMEOUT:g} s, a listener forever)"
        ),
    )
    p.add_argument(
        "--env-fd",
        type=inherited_fd,
        metavar="FD",
        help="with -l: write the export lines to this descriptor and close it",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="report connect/disconnect")
    p.set_defaults(func=_run_cat)


async def _run_cat(args: argparse.Namespace) -> int:
    from aioxen.apps import cat

    opts = cat.CatOptions(
        domid=args.domid,
        port=args.port,
        listen=args.listen,
        buffer_size=args.buffer_size,
        timeout=args.timeout,
        verbose=args.verbose,
        env_fd=args.env_fd,
    )
    return await cat.main(opts)


def _register_bridge(subparsers: Any) -> None:
    from aioxen.apps.bridge import DEFAULT_CONNECT_TIMEOUT, DEFAULT_GRACE

    p = subparsers.add_parser(
        "bridge",
        help="bridge vchan <-> TCP / Unix sockets (both directions, many connections)",
        description=HELP_BRIDGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen", required=True, type=listen_address, metavar="ADDR", help="accept here"
    )
    p.add_argument(
        "--connect",
        required=True,
        type=connect_address,
        metavar="ADDR",
        help="and connect each to here",
    )
    p.add_argument(
        "--buffer-size",
        type=_size,
        default=vchan.DEFAULT_SIZE,
        metavar="N",
        help="ring size each way of a vchan the bridge serves (default %(default)s)",
    )
    p.add_argument(
        "--connect-timeout",
        type=seconds,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="give up on an outgoing connection after this long (default %(default)g)",
    )
    p.add_argument(
        "--grace",
        type=seconds,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help="on shutdown, let connections flush this long before aborting (default %(default)g)",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=None,
        metavar="N",
        help="bridge at most N connections at once; more are closed at once and logged "
        "(default: only the descriptor limit)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every connection on stderr")
    add_readiness_arguments(p)
    p.set_defaults(func=_run_bridge)


async def _run_bridge(args: argparse.Namespace) -> int:
    from aioxen.apps.bridge import run_bridge_command

    return await run_bridge_command(
        args.listen,
        args.connect,
        buffer_size=args.buffer_size,
        connect_timeout=args.connect_timeout,
        grace=args.grace,
        verbose=args.verbose,
        max_connections=args.max_connections,
        on_ready=lambda where: (
            notify_ready(
                args, exports={"AIOXEN_BRIDGE_ADDRESS": str(where)}, status=f"listening on {where}"
            ).stopping
        ),
    )
