"""``aioxen qrexec agent|daemon|call|client-vm``: Qubes RPC from the command line.

``agent`` is the VM side (offers control port 512 to dom0, runs services from
directories, serves a ``qrexec-client-vm``-compatible trigger socket); ``daemon`` the
dom0 side for any number of domains (policy, VM-to-VM calls, ``qrexec-client``
sockets); ``call`` and ``client-vm`` make one call with this process's stdin and stdout
and exit with the service's exit status (126 refused, 127 no such service, 125 a
qrexec failure).  Every platform works: on ``unix`` each process plays the domain
``$AIOXEN_DOMID`` names.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

from aioxen.apps.clistd import (
    CommandError,
    UsageError,
    add_readiness_arguments,
    check_root_env,
    domid,
    int_range,
    notify_ready,
    plain,
    seconds,
)
from aioxen.cli import StopSignals

DEFAULT_DIR = "/var/run/qubes"


def _domain(text: str) -> tuple[str, int]:
    name, eq, num = text.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"want NAME=DOMID, not {text!r}")
    if name in ("dom0", "@adminvm") or "/" in name or name.startswith("."):
        raise argparse.ArgumentTypeError(f"{name!r} cannot name a VM")
    value = domid(num)
    if value == 0:
        raise argparse.ArgumentTypeError("dom0 (domid 0) is the daemon's own domain")
    return name, value


def _service(text: str) -> str:
    from aioxen.qrexec.wire import QrexecProtocolError, check_service_name

    try:
        return check_service_name(text)
    except QrexecProtocolError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _target(text: str) -> str:
    from aioxen.qrexec.wire import QrexecProtocolError, check_domain_name

    try:
        return check_domain_name(text, "target")
    except QrexecProtocolError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_version = int_range(2, 4, "protocol version")


def _transport_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vchan-socket",
        action="store_true",
        help="use Qubes' vchan-socket transport ($VCHAN_SOCKET_DIR, $VCHAN_DOMAIN) "
        "instead of aioxen vchan, to talk to Qubes' own programs built for tests",
    )


def _file_mode(text: str) -> int:
    """An octal file mode for a socket (``600``, ``0660``, ``666``); no set-id/sticky bits."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal file mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"file mode out of range (000..777): {text!r}")
    return mode


def register(subparsers: Any) -> None:
    doc = plain(__doc__.split("\n\n")[1].replace("\n", " ")) if __doc__ else None
    top = subparsers.add_parser("qrexec", help="Qubes RPC: agent, daemon, calls", description=doc)
    sub = top.add_subparsers(dest="qrexec_command", metavar="COMMAND", required=True)

    a = sub.add_parser("agent", help="the VM side: offer port 512 to dom0, run services")
    a.add_argument("--services-dir", action="append", default=[], metavar="DIR",
                   help="directory of executable services (repeatable, in order)")  # fmt: skip
    a.add_argument("--trigger-socket", metavar="PATH",
                   help="serve qrexec-client-vm's trigger socket at PATH (new)")  # fmt: skip
    a.add_argument("--trigger-mode", type=_file_mode, default=0o666, metavar="OCTAL",
                   help="the trigger socket's file mode (default 666: any local user "
                        "may ask, dom0's policy decides, as in Qubes)")  # fmt: skip
    a.add_argument("--daemon-domid", type=domid, default=0, metavar="DOMID",
                   help="the domain whose daemon may connect (default 0)")  # fmt: skip
    a.add_argument("--max-version", type=_version, default=4,
                   help="highest protocol version to offer (2..4, default 4)")  # fmt: skip
    a.add_argument("-v", "--verbose", action="count", default=0,
                   help="log every call (-vv: debug)")  # fmt: skip
    _transport_argument(a)
    add_readiness_arguments(a)
    a.set_defaults(func=_agent)

    d = sub.add_parser("daemon", help="the dom0 side: policy, VM-to-VM calls, client sockets")
    d.add_argument("--domain", action="append", type=_domain, default=[], metavar="NAME=DOMID",
                   required=True, help="a VM to serve (repeatable)")  # fmt: skip
    pol = d.add_mutually_exclusive_group()
    pol.add_argument("--policy", metavar="FILE",
                     help="rule file: SERVICE ARG SOURCE TARGET allow|deny [opts]")  # fmt: skip
    pol.add_argument("--policy-socket", metavar="PATH",
                     help="ask Qubes' policy daemon protocol at PATH")  # fmt: skip
    pol.add_argument("--policy-program", metavar="PROGRAM",
                     help="run PROGRAM -- SOURCE TARGET SERVICE (Qubes style)")  # fmt: skip
    d.add_argument("--socket-dir", metavar="DIR",
                   help="create qrexec.<domid>, qrexec.<name> client sockets in DIR")  # fmt: skip
    d.add_argument("--socket-mode", type=_file_mode, default=0o600, metavar="OCTAL",
                   help="the client sockets' file mode (default 600: owner only)")  # fmt: skip
    d.add_argument("--services-dir", metavar="DIR", help="dom0's own executable services")
    d.add_argument("--default-user", default="user", metavar="USER",
                   help="user for DEFAULT: command lines (default user)")  # fmt: skip
    d.add_argument("--max-version", type=_version, default=4,
                   help="highest protocol version to offer (2..4, default 4)")  # fmt: skip
    d.add_argument("-v", "--verbose", action="count", default=0,
                   help="log every decision (-vv: debug)")  # fmt: skip
    _transport_argument(d)
    add_readiness_arguments(d)
    d.set_defaults(func=_daemon)

    for name, helptext in (
        ("call", "call a service with stdin/stdout (dom0: via the daemon; a VM: via the agent)"),
        ("client-vm", "call a service from a VM through the agent's trigger socket"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("target", type=_target, help="the domain to run the service in")
        c.add_argument("service", type=_service, help="SERVICE or SERVICE+ARG")
        where = "--trigger-socket" if name == "client-vm" else "--dir"
        c.add_argument(where, dest="where", metavar="PATH",
                       help="the agent's trigger socket, or in dom0 the daemon's socket "
                       f"directory (default $AIOXEN_QREXEC_DIR or {DEFAULT_DIR})")  # fmt: skip
        c.add_argument("--user", default="user", help="user to run as (dom0 calls)")
        c.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                       help="give up after SECONDS (default: never)")  # fmt: skip
        _transport_argument(c)
        c.set_defaults(func=_call, vm_only=name == "client-vm")


def _logging(verbose: int) -> None:
    """Warnings (a dropped peer, a refused call) always; ``-v`` info, ``-vv`` debug.  The
    library's messages start with ``qrexec agent:``/``qrexec daemon:``."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    from aioxen.apps.stderr_log import StderrLogHandler

    # never a blocking log write: a VM can make the daemon log, and stderr may be a full
    # pipe nobody reads (aioxen.apps.stderr_log)
    logging.basicConfig(level=level, format="aioxen %(message)s", handlers=[StderrLogHandler()])


def _platform_env(args: argparse.Namespace) -> None:
    if args.vchan_socket:
        return
    if os.environ.get("AIOXEN_PLATFORM", "") in ("", "unix"):
        check_root_env()


@contextlib.asynccontextmanager
async def _channels(args: argparse.Namespace) -> Any:
    """The command's channels: Qubes' vchan-socket wire with ``--vchan-socket``
    (``$VCHAN_SOCKET_DIR``/``$VCHAN_DOMAIN``, as Qubes' programs built for tests use),
    else aioxen vchan on the platform the environment names."""
    if args.vchan_socket:
        from aioxen.qrexec.vchan_socket import VchanSocketChannels

        try:
            yield VchanSocketChannels.from_environ()
        except ValueError as e:
            raise UsageError(f"--vchan-socket: {e}") from None
        return
    from aioxen.platforms import resolve
    from aioxen.qrexec import VchanChannels

    plat = await resolve(None)
    async with plat:
        yield VchanChannels(plat)


async def _agent(args: argparse.Namespace) -> int:
    _platform_env(args)
    _logging(args.verbose)
    for d in args.services_dir:
        if not os.path.isdir(d):
            raise UsageError(f"--services-dir {d}: not a directory")
    from aioxen.qrexec import Agent

    stop = StopSignals()
    with stop:
        async with _channels(args) as channels:
            agent = Agent(
                channels,
                services_dir=args.services_dir,
                daemon_domid=args.daemon_domid,
                max_version=args.max_version,
            )
            async with agent:
                exports = {}
                if args.trigger_socket:
                    await agent.start_trigger_socket(args.trigger_socket, mode=args.trigger_mode)
                    exports["AIOXEN_QREXEC_TRIGGER"] = os.path.abspath(args.trigger_socket)
                await agent.wait_listening()
                ready = notify_ready(args, exports=exports, status="serving")
                try:
                    await _until_stopped(stop, agent.serve_forever())
                finally:
                    ready.stopping()
    return 0


async def _until_stopped(stop: StopSignals, work: Any) -> None:
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    finally:
        for t in (task, stopper):
            t.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)


def _policy(args: argparse.Namespace) -> Any:
    from aioxen.qrexec.policy import PolicyProgram, PolicySocket, RulePolicy

    if args.policy:
        try:
            return RulePolicy.load(args.policy)
        except OSError as e:
            raise UsageError(f"--policy {args.policy}: {e.strerror or e}") from None
        except ValueError as e:
            raise UsageError(f"--policy: {e}") from None
    if args.policy_socket:
        return PolicySocket(args.policy_socket)
    if args.policy_program:
        if not os.access(args.policy_program, os.X_OK):
            raise UsageError(f"--policy-program {args.policy_program}: not an executable")
        return PolicyProgram(args.policy_program)
    return None


async def _daemon(args: argparse.Namespace) -> int:
    _platform_env(args)
    _logging(args.verbose)
    policy = _policy(args)
    names = [n for n, _ in args.domain]
    ids = [i for _, i in args.domain]
    if len(set(names)) != len(names) or len(set(ids)) != len(ids):
        raise UsageError("--domain: each name and each domid only once")
    for opt, path in (("--socket-dir", args.socket_dir), ("--services-dir", args.services_dir)):
        if path is not None and not os.path.isdir(path):
            raise UsageError(f"{opt} {path}: not a directory")
    from aioxen.qrexec import Daemon

    stop = StopSignals()
    with stop:
        async with _channels(args) as channels:
            daemon = Daemon(
                channels,
                domains=dict(args.domain),
                policy=policy,
                services_dir=args.services_dir,
                socket_dir=args.socket_dir,
                socket_mode=args.socket_mode,
                max_version=args.max_version,
                default_user=args.default_user,
            )
            async with daemon:
                exports = {}
                if args.socket_dir:
                    exports["AIOXEN_QREXEC_DIR"] = os.path.abspath(args.socket_dir)
                ready = notify_ready(args, exports=exports, status="serving")
                try:
                    await _until_stopped(stop, daemon.serve_forever())
                finally:
                    ready.stopping()
    return 0


async def _call(args: argparse.Namespace) -> int:
    _platform_env(args)
    from aioxen.apps.stdio import open_sink, open_source
    from aioxen.qrexec import ServiceRefused, connect

    where = args.where or os.environ.get("AIOXEN_QREXEC_DIR", DEFAULT_DIR)
    stop = StopSignals()
    with stop:
        async with _channels(args) as channels:
            if args.vm_only and channels.local_domid == 0:
                raise UsageError("client-vm runs in a VM, not in dom0 (domid 0)")

            stdin = await open_source(os.dup(0))
            sys.stdout.flush()
            stdout = await open_sink(os.dup(1))
            stderr = await open_sink(os.dup(2))
            try:

                async def body() -> int:
                    try:
                        ctx = connect(
                            args.target,
                            args.service,
                            via=where,
                            channels=channels,
                            user=args.user,
                        )
                        async with ctx as (reader, writer):
                            code = await _pump(reader, writer, stdin, stdout, stderr)
                    except ServiceRefused as e:
                        raise CommandError(f"{args.service} in {args.target}: {e}", 126) from None
                    except FileNotFoundError as e:
                        raise CommandError(f"{where}: no qrexec socket ({e.strerror})") from None
                    return code

                async with asyncio.timeout(args.timeout):
                    work = asyncio.ensure_future(body())
                    stopper = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    stopper.cancel()
                    if not work.done():
                        work.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await work
                        return 1
                    return work.result()
            finally:
                stdin.close()
                for sink in (stdout, stderr):
                    with contextlib.suppress(OSError):
                        await sink.close_write()


async def _pump(reader: Any, writer: Any, stdin: Any, stdout: Any, stderr: Any) -> int:
    async def feed() -> None:
        with contextlib.suppress(ConnectionError):
            while data := await stdin.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()

    async def copy(src: asyncio.StreamReader, dst: Any) -> None:
        while data := await src.read(65536):
            await dst.write(data)

    feeder = asyncio.ensure_future(feed())
    try:
        await asyncio.gather(copy(reader, stdout), copy(writer.stderr, stderr))
        code: int = await writer.exit_code()
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feeder
    return code
