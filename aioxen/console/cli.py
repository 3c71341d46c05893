"""``aioxen console DOMID``: attach the terminal (or pipes) to a PV console.

By default this process is the console's back end (what ``xl console`` does through
xenconsoled): it waits for the guest ``DOMID`` to connect its ``console/N`` and copies
stdin to the guest and the guest's output to stdout.  ``--frontend`` plays the guest
instead (``DOMID`` is then the back end domain); it refuses (exit status 1) a device
that a kernel driver such as ``hvc_xen`` holds, naming the driver and how to unbind it.
On a terminal, input is raw and ``Ctrl-]`` detaches.  SIGINT/SIGTERM close the device
end in an orderly way.

Stdin and stdout may be anything ([`aioxen.apps.stdio`][]): a terminal, a pipe, a
regular file, ``/dev/null`` or closed (the command then reads nothing / discards the
output).  At the end of stdin the guest's output is still shown until the console ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import termios
import tty
from typing import Any

from aioxen.apps.clistd import (
    UsageError,
    check_root_env,
    describe,
    domid,
    nonnegative_int,
    plain,
    seconds,
)
from aioxen.apps.stderr_log import StderrLogHandler
from aioxen.apps.stdio import ByteSink, ByteSource, open_sink, open_source
from aioxen.cli import StopSignals
from aioxen.console.device import DEFAULT_DEVID, ConsoleBackend, ConsoleFrontend
from aioxen.console.inuse import FrontendInUse

ESCAPE = 0x1D  # Ctrl-]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "console",
        help="attach to a domain's PV console (back end), or act as the guest (--frontend)",
        description=plain(__doc__.split("\n\n")[1].replace("\n", " ")) if __doc__ else None,
    )
    p.add_argument(
        "domid", type=domid, help="the guest (default) or, with --frontend, the back end"
    )
    p.add_argument("--devid", type=nonnegative_int, default=DEFAULT_DEVID,
                   help=f"console device number (default {DEFAULT_DEVID})")  # fmt: skip
    p.add_argument("--frontend", action="store_true", help="be the guest side")
    p.add_argument("--force", action="store_true",
                   help="with --frontend: take the device over although its XenStore "
                        "state says a front end without an aioxen owner is at work (a stale "
                        "state left by one that died); never overrides a bound kernel "
                        "driver")  # fmt: skip
    p.add_argument("--create", action="store_true",
                   help="create the device first if missing (toolstack rights needed)")  # fmt: skip
    p.add_argument("--follow", action="store_true",
                   help="back end: wait for the guest to reconnect after it leaves")  # fmt: skip
    p.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                   help="how long to wait for the other end (default: forever)")  # fmt: skip
    p.set_defaults(func=_run)


async def _copy_in(src: ByteSource, dst: asyncio.StreamWriter, raw: bool) -> None:
    while True:
        data = await src.read(4096)
        if not data:
            return
        if raw and ESCAPE in data:
            data = data[: data.index(ESCAPE)]
            if data:
                dst.write(data)
                await dst.drain()
            raise _Detach
        dst.write(data)
        await dst.drain()


async def _copy_out(src: asyncio.StreamReader, out: ByteSink) -> None:
    while True:
        data = await src.read(65536)
        if not data:
            return
        await out.write(data)


class _Detach(Exception):
    pass


async def _session(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stdin: ByteSource,
    stdout: ByteSink,
    raw: bool,
) -> bool:
    """Copy both ways until the console ends (True) or the user detaches (False)."""
    out = asyncio.ensure_future(_copy_out(reader, stdout))
    inp = asyncio.ensure_future(_copy_in(stdin, writer, raw))
    try:
        while True:
            done, _ = await asyncio.wait({out, inp}, return_when=asyncio.FIRST_COMPLETED)
            if out in done:
                out.result()
                return True
            if inp in done:
                if isinstance(inp.exception(), _Detach):
                    return False
                inp.result()  # stdin EOF: keep showing output until the console ends
                await out
                return True
    finally:
        for t in (out, inp):
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(out, inp, return_exceptions=True)


async def _run(args: argparse.Namespace) -> int:
    check_root_env()  # a missing or non-directory $XEN_ROOT: before any I/O
    if args.force and not args.frontend:
        raise UsageError("--force goes with --frontend (it takes over a guest's device)")
    # Status and error lines never block the loop on stderr: with --follow a domain that
    # reconnects over and over writes two lines each time, and a pipe nobody reads
    # would otherwise freeze the back end for good, SIGTERM included.
    handler = StderrLogHandler()
    handler.setFormatter(logging.Formatter("aioxen console: %(message)s"))
    log = logging.getLogger("aioxen.console.cli")
    saved_log = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return await _run_logged(args, log)
    finally:
        log.removeHandler(handler)
        log.setLevel(saved_log[0])
        log.propagate = saved_log[1]
        handler.close()  # the last lines out first (bounded wait)


async def _run_logged(args: argparse.Namespace, log: logging.Logger) -> int:
    stop = StopSignals()  # SIGINT/SIGTERM/SIGHUP: orderly stop
    raw = sys.stdin.isatty()
    saved = termios.tcgetattr(0) if raw else None
    endpoint: ConsoleBackend | ConsoleFrontend | None = None
    stdin: ByteSource | None = None
    stdout: ByteSink | None = None
    try:
        if raw:
            tty.setraw(0)
        stdin = await open_source(os.dup(0))
        sys.stdout.flush()
        stdout = await open_sink(os.dup(1))

        async def body() -> int:
            nonlocal endpoint
            if args.frontend:
                fe = endpoint = await ConsoleFrontend.open(
                    args.domid, args.devid, timeout=args.timeout, force=args.force
                )
                log.info("connected to domain %d", args.domid)
                await _session(fe.reader, fe.writer, stdin, stdout, raw)
                return 0
            be = endpoint = await ConsoleBackend.start(args.domid, args.devid, create=args.create)
            log.info("waiting for domain %d console/%d", args.domid, args.devid)
            while True:
                reader, writer = await be.accept(timeout=args.timeout)
                log.info("domain %d connected", args.domid)
                if not await _session(reader, writer, stdin, stdout, raw) or not args.follow:
                    return 0
                log.info("domain %d disconnected", args.domid)

        work = asyncio.ensure_future(body())
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if work in done:
            return work.result()
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        return 0
    except TimeoutError as exc:
        if args.timeout is None:  # not ours: a XenStore request, say (its message says which)
            log.error("%s", describe(exc))
            return 1
        what = (
            f"the back end of console/{args.devid} in domain {args.domid}"
            if args.frontend
            else f"domain {args.domid} to connect console/{args.devid}"
        )
        detail = f" ({exc})" if str(exc) else ""
        log.error("waited %g s for %s, in vain%s", args.timeout, what, detail)
        return 1
    except (ConnectionError, FileNotFoundError, PermissionError, FrontendInUse) as exc:
        log.error("%s", describe(exc))
        return 1
    finally:
        if endpoint is not None:
            await endpoint.close(timeout=5)
        if stdout is not None:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(5):  # what a pipe still queues (bounded)
                    await stdout.close_write()
            stdout.abort()
        if stdin is not None:
            stdin.close()
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
