"""``aioxen blkback`` and ``aioxen blkfront``: virtual block devices on the command line.

``aioxen blkback --image FILE --frontend DOMID`` serves a raw image file as virtual block
device ``--devid`` (default ``xvda``) of domain ``DOMID``.  It creates the device's
XenStore directories first (the toolstack's job on ``unix``/``inheap``; skip with
``--no-create`` under a real toolstack), prints one ``READY`` line, and serves until
interrupted (SIGINT/SIGTERM), then closes in order and removes what it created.

``aioxen blkfront nbd --listen HOST:PORT DEVICE...`` connects this domain's virtual block
devices (``xvda``, ``51712``, ...) and exports each over NBD under its name (the first
one is also the default export), so that any NBD client — ``nbdcopy``, ``qemu-img``,
``qemu-io``, ``nbd-client`` — can use it.  ``aioxen blkfront info DEVICE`` prints what
XenStore says about a device (states, owners, what the backend offers and what a connected
frontend negotiated) without touching it.

Each command claims the device end it serves before writing anything
([`aioxen.xenbus.claim`][]): a second ``blkback`` for the same vbd, or a second
``blkfront`` for the same device, fails with ``aioxen blkback: ... is held by pid N``
(rc 1) and leaves the running one alone; a killed holder's claim is reclaimed.

The commands follow the command-line standard ([`aioxen.apps.clistd`][]): arguments are
checked before any I/O (a missing, unreadable or unwritable image, a directory, a bad
``--devid``/``--frontend``/``--listen`` are usage errors, rc 2); an image that is empty or
not a whole number of sectors is refused (rc 1: blkback serves whole sectors only and
would silently drop the tail); runtime failures print one line, rc 1; a stop by SIGINT or
SIGTERM exits 130 or 143 after the orderly close.  Readiness for supervisors: besides the
``READY`` line, ``--ready-fd N`` and systemd's ``$NOTIFY_SOCKET``
([`aioxen.apps.clistd.notify_ready`][]).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import stat
from typing import Any

from aioxen.apps import clistd as std
from aioxen.apps.stderr_log import StderrLogHandler
from aioxen.cli import StopSignals


def _logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    # a log write never blocks the event loop (stderr a pipe nobody reads: any NBD client
    # can make the server log); see aioxen.apps.stderr_log
    handler = StderrLogHandler()
    logging.basicConfig(level=level, format="%(name)s: %(message)s", handlers=[handler])


def _vdev(text: str) -> int:
    """``--devid``: a virtual device number or xvd name -> its number (usage error)."""
    from aioxen.blk.vbd import parse_vdev

    try:
        return parse_vdev(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _vdev_name(text: str) -> str:
    """A DEVICE argument: checked like ``--devid`` but kept as written (the export name)."""
    _vdev(text)
    return text


def _listen(text: str) -> str:
    """``--listen``: the standard address syntax, TCP (port 0: any free port) or Unix."""
    from aioxen.apps.addresses import TcpAddress, UnixAddress

    addr = std.listen_address(text)
    if isinstance(addr, TcpAddress):
        host = f"[{addr.host}]" if ":" in addr.host else addr.host
        return f"tcp:{host}:{addr.port}"
    if isinstance(addr, UnixAddress):
        return str(addr)
    raise argparse.ArgumentTypeError(f"{text!r}: NBD listens on tcp:HOST:PORT or unix:PATH")


async def _open_image(args: argparse.Namespace) -> Any:
    """The ``--image`` as a [`FileSource`][aioxen.blk.source.FileSource], after the checks of the
    standard: a missing file, a directory, an unreadable or (without ``--readonly``)
    unwritable one is a usage error; an empty image, or one that is not a whole number of
    sectors (the tail could not be served), is refused."""
    from aioxen.blk.source import FileSource

    path = args.image
    try:
        st = os.stat(path)
    except OSError as exc:
        raise std.UsageError(f"--image {path}: {_reason(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise std.UsageError(f"--image {path}: is a directory, not an image file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise std.UsageError(f"--image {path}: not a regular file or block device")
    try:
        source = FileSource(
            path, readonly=args.readonly, sector_size=args.sector_size, workers=args.workers
        )
    except OSError as exc:
        if not args.readonly and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise std.UsageError(
                f"--image {path}: not writable ({_reason(exc)}); "
                "add --readonly to serve it read-only"
            ) from None
        raise std.UsageError(f"--image {path}: {_reason(exc)}") from None
    raw = os.lseek(source.fd, 0, os.SEEK_END)
    sector = args.sector_size
    problem = None
    if raw == 0:
        problem = f"--image {path} is empty (0 bytes): there is nothing to serve"
    elif raw % sector:
        whole = raw - raw % sector
        problem = (
            f"--image {path} is {raw} bytes, not a whole number of {sector}-byte sectors: "
            f"its last {raw % sector} bytes could not be served (pad it to "
            f"{whole + sector} bytes, e.g. truncate -s {whole + sector} {path})"
        )
    if problem is not None:
        await source.close()
        raise std.CommandError(problem)
    return source


def _reason(exc: OSError) -> str:
    return exc.strerror.lower() if exc.strerror else str(exc)


def _ready(args: argparse.Namespace, line: str) -> std.Readiness:
    """Print the ``READY`` line and tell a supervisor (``--ready-fd``, ``$NOTIFY_SOCKET``)."""
    print(line, flush=True)
    return std.notify_ready(args, status=line)


async def run_blkback(args: argparse.Namespace) -> int:
    import aioxen
    from aioxen.blk.back import BackendConfig
    from aioxen.blk.vbd import TYPE
    from aioxen.xenbus.claim import Claim
    from aioxen.xenbus.driver import backend_dir
    from aioxen.xenbus.toolstack import add_device, remove_device

    _logging(args.verbose)
    devid: int = args.devid
    config = BackendConfig(
        max_indirect_segments=args.max_indirect_segments,
        max_ring_page_order=args.max_ring_page_order,
        persistent=not args.no_persistent,
        max_queues=args.max_queues,
        queue_depth=args.queue_depth,
        discard=not args.no_discard,
    )
    source = await _open_image(args)
    stop = StopSignals()  # SIGINT/SIGTERM: orderly stop
    plat = aioxen.platform()
    try:
        async with plat:
            # One owner per device: claimed before anything is written (with the device
            # itself when we create it), so a second blkback fails here, touching nothing.
            claim = Claim(
                plat.store, backend_dir(plat.domid, TYPE, args.frontend, devid),
                f"vbd {devid} of domain {args.frontend}",
            )  # fmt: skip
            try:
                if not args.no_create:
                    await add_device(
                        plat.store, TYPE, args.frontend, plat.domid, devid,
                        backend_keys={"mode": "r" if args.readonly else "w", "type": "aioxen",
                                      "params": source.path},
                        frontend_keys={"virtual-device": str(devid), "device-type": "disk"},
                        replace=True, claim=claim,
                    )  # fmt: skip
                else:
                    await claim.acquire()
            except BaseException:
                claim.abandon()
                raise
            try:
                await _serve_blkback(args, plat, source, config, devid, claim, stop)
            finally:
                if not args.no_create:  # remove the device only while it is still ours
                    with contextlib.suppress(FileNotFoundError):
                        await remove_device(plat.store, TYPE, args.frontend, plat.domid, devid,
                                            force=True, claim=claim)  # fmt: skip
                await claim.release()
    finally:
        await source.close()
    return 0


async def _serve_blkback(
    args: argparse.Namespace, plat: Any, source: Any, config: Any, devid: int, claim: Any,
    stop: StopSignals,
) -> None:  # fmt: skip
    from aioxen.blk.vbd import Blkback

    bk = Blkback(source, args.frontend, devid, platform=plat, config=config, claim=claim)
    task = asyncio.ensure_future(bk.run())
    ready = _ready(
        args,
        f"READY blkback domain {plat.domid} serving {source.path} "
        f"({source.size} bytes{', read-only' if source.readonly else ''}) "
        f"as vbd {devid} of domain {args.frontend}",
    )
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    ready.stopping()
    if not task.done():
        await bk.close(timeout=10)
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_blkfront_nbd(args: argparse.Namespace) -> int:
    import aioxen
    from aioxen.blk.device import BlockDevice
    from aioxen.blk.nbd import bind_tcp, start_server
    from aioxen.blk.vbd import open_blkfront

    _logging(args.verbose)
    stop = StopSignals()  # SIGINT/SIGTERM: orderly stop
    listener = bind_tcp(args.listen)  # a TCP port in use fails here, before any device
    owned = False
    plat = aioxen.platform()
    config = _front_config(args)
    async with plat, contextlib.AsyncExitStack() as stack:
        if listener is not None:  # closed here unless the server took it over
            stack.callback(lambda: None if owned else listener.close())
        exports: dict[str, BlockDevice] = {}
        for name in args.devices:
            dev = await stack.enter_async_context(
                open_blkfront(name, platform=plat, config=config, backend_domid=args.backend,
                              timeout=args.timeout)
            )  # fmt: skip
            exports[name] = dev
        server = await start_server(
            exports, args.listen, sock=listener, max_connections=args.max_connections
        )
        owned = True
        sockets = getattr(server, "sockets", None)
        sock = sockets[0].getsockname() if sockets else args.listen
        where = f"{sock[0]}:{sock[1]}" if isinstance(sock, tuple) else str(sock)
        ready = _ready(
            args,
            f"READY blkfront nbd listening on {where} exporting "
            + ", ".join(f"{n} ({d.size} bytes)" for n, d in exports.items()),
        )
        try:
            await stop.wait()
        finally:
            ready.stopping()
            # stop listening and end every session before the devices close under them
            await server.shutdown()
    return 0


def _front_config(args: argparse.Namespace) -> Any:
    from aioxen.blk.front import FrontendConfig

    return FrontendConfig(
        ring_page_order=args.ring_page_order,
        queues=args.queues,
        max_indirect_segments=args.max_indirect_segments,
        pool_pages=args.pool_pages,
        persistent=not args.no_persistent,
    )


async def run_blkfront_info(args: argparse.Namespace) -> int:
    """Read-only: print what XenStore says about the device; never connects it, never
    changes its state (a live device stays as it is)."""
    import aioxen
    from aioxen.blk.vbd import vbd_info

    _logging(args.verbose)
    async with aioxen.platform() as plat:
        info = await vbd_info(plat, args.device)
    print(json.dumps(info, indent=2))
    return 0


_MAX_INDIRECT = 4096  # aioxen.blk.blkif.MAX_INDIRECT_SEGMENTS (not imported: parser stays light)


def _verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log progress on stderr (-v: info, -vv: debug)",
    )


def _front_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        type=std.domid,
        default=None,
        metavar="DOMID",
        help="expected backend domain (default: whatever the toolstack wrote)",
    )
    p.add_argument(
        "--timeout",
        type=std.seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds to wait for each device to appear and connect (default 30)",
    )
    p.add_argument(
        "--queues",
        type=std.int_range(1, 1024, "queue count"),
        metavar="N",
        default=1,
        help="queues per device (default 1, capped by the backend)",
    )
    p.add_argument(
        "--ring-page-order",
        type=std.int_range(0, 16, "ring page order"),
        metavar="N",
        default=2,
        help="ring size as a power of two pages (default 2, capped by the backend)",
    )
    p.add_argument(
        "--max-indirect-segments",
        type=std.int_range(0, _MAX_INDIRECT, "segment count"),
        metavar="N",
        default=256,
        help=f"segments per indirect request (default 256, at most {_MAX_INDIRECT})",
    )
    p.add_argument(
        "--pool-pages",
        type=std.positive_int,
        metavar="N",
        default=2048,
        help="granted data pages per device (default 2048 = 8 MiB)",
    )
    p.add_argument("--no-persistent", action="store_true", help="do not offer persistent grants")
    _verbose(p)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "blkback",
        help="serve a raw image file as a virtual block device",
        description="Serve a raw image file to a frontend domain as virtual block device "
        "DEVID (blkif protocol), until interrupted (SIGINT exits 130, SIGTERM 143, after "
        "an orderly close).  The image must be a non-empty whole number of sectors.",
    )
    p.add_argument(
        "--image",
        required=True,
        metavar="FILE",
        help="raw image file (or block device) to serve; its size must be a non-zero "
        "multiple of the sector size",
    )
    p.add_argument(
        "--frontend", required=True, type=std.domid, metavar="DOMID", help="the frontend domain"
    )
    p.add_argument(
        "--devid",
        type=_vdev,
        default="xvda",
        help="virtual device: number or xvd name (default xvda = 51712)",
    )
    p.add_argument(
        "--readonly", action="store_true", help="serve read-only (needed for an unwritable image)"
    )
    p.add_argument(
        "--sector-size",
        type=int,
        default=512,
        choices=[512, 4096],
        help="logical sector size in bytes (default 512)",
    )
    p.add_argument(
        "--no-create",
        action="store_true",
        help="do not create the XenStore device entries (a toolstack did)",
    )
    p.add_argument(
        "--max-indirect-segments",
        type=std.int_range(0, _MAX_INDIRECT, "segment count"),
        metavar="N",
        default=256,
        help="advertised feature-max-indirect-segments (default 256; 0: no indirect)",
    )
    p.add_argument(
        "--max-ring-page-order",
        type=std.int_range(0, 4, "ring page order"),
        metavar="N",
        default=4,
        help="largest ring a frontend may use, as a power of two pages (0..4, default 4)",
    )
    p.add_argument(
        "--max-queues",
        type=std.int_range(1, 1024, "queue count"),
        metavar="N",
        default=4,
        help="most queues (rings) a frontend may use (default 4)",
    )
    p.add_argument(
        "--queue-depth",
        type=std.positive_int,
        metavar="N",
        default=64,
        help="requests served concurrently per queue (default 64)",
    )
    p.add_argument(
        "--workers", type=std.int_range(1, 1024, "worker count"), default=4, metavar="N",
        help="I/O threads (default 4)",
    )  # fmt: skip
    p.add_argument("--no-persistent", action="store_true", help="do not offer persistent grants")
    p.add_argument("--no-discard", action="store_true", help="do not offer discard")
    _verbose(p)
    std.add_readiness_arguments(p, env_file=False)
    p.set_defaults(func=run_blkback)

    f = subparsers.add_parser(
        "blkfront",
        help="use virtual block devices (export them over NBD)",
        description="Connect this domain's virtual block devices.",
    )
    fsub = f.add_subparsers(
        dest="blkfront_command", metavar="COMMAND", required=True, help="what to do"
    )
    nbd = fsub.add_parser(
        "nbd",
        help="export devices over NBD",
        description="Export virtual block devices as NBD exports (fixed newstyle; "
        "NBD_OPT_GO/INFO, READ/WRITE/FLUSH/TRIM/WRITE_ZEROES, structured replies), until "
        "interrupted (SIGINT exits 130, SIGTERM 143, after an orderly close).",
    )
    nbd.add_argument(
        "--listen",
        type=_listen,
        default="tcp:127.0.0.1:10809",
        metavar="ADDRESS",
        help="tcp:HOST:PORT, HOST:PORT or unix:PATH (default tcp:127.0.0.1:10809; "
        "port 0 picks a free one)",
    )
    nbd.add_argument(
        "--max-connections", type=std.positive_int, default=None, metavar="N",
        help="serve at most N clients at once; more are closed at once and logged "
        "(default: only the descriptor limit)",
    )  # fmt: skip
    nbd.add_argument(
        "devices", nargs="+", type=_vdev_name, metavar="DEVICE",
        help="device number or xvd name; also the export name",
    )  # fmt: skip
    _front_options(nbd)
    std.add_readiness_arguments(nbd, env_file=False)
    nbd.set_defaults(func=run_blkfront_nbd)
    info = fsub.add_parser(
        "info",
        help="print a device's state, owners and disk (read-only: never connects it)",
        description="Print what XenStore says about a virtual block device of this domain "
        "(states, owners, the disk offered, what a connected frontend negotiated) as JSON, "
        "without connecting or changing it.",
    )
    info.add_argument("device", metavar="DEVICE", type=_vdev_name, help="device number or xvd name")
    _front_options(info)
    info.set_defaults(func=run_blkfront_info)


__all__ = ["register"]
