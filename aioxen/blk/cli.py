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
(:mod:`aioxen.xenbus.claim`): a second ``blkback`` for the same vbd, or a second
``blkfront`` for the same device, fails with ``aioxen blkback: ... is held by pid N``
(rc 1) and leaves the running one alone; a killed holder's claim is reclaimed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from typing import Any

from aioxen.cli import StopSignals
from aioxen.errors import ProtocolError


def _logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)


def _fail(cmd: str, exc: BaseException) -> int:
    """A runtime failure: one line on stderr, rc 1 (no traceback)."""
    print(f"aioxen {cmd}: {exc}", file=sys.stderr)
    return 1


_FAILURES = (OSError, ValueError, ProtocolError)


async def run_blkback(args: argparse.Namespace) -> int:
    try:
        return await _blkback(args)
    except _FAILURES as exc:
        return _fail("blkback", exc)


async def _blkback(args: argparse.Namespace) -> int:
    import aioxen
    from aioxen.blk.back import BackendConfig
    from aioxen.blk.source import FileSource
    from aioxen.blk.vbd import TYPE, parse_vdev
    from aioxen.xenbus.claim import Claim
    from aioxen.xenbus.driver import backend_dir
    from aioxen.xenbus.toolstack import add_device, remove_device

    _logging(args.verbose)
    devid = parse_vdev(args.devid)
    config = BackendConfig(
        max_indirect_segments=args.max_indirect_segments,
        max_ring_page_order=args.max_ring_page_order,
        persistent=not args.no_persistent,
        max_queues=args.max_queues,
        queue_depth=args.queue_depth,
        discard=not args.no_discard,
    )
    source = FileSource(
        args.image,
        readonly=args.readonly,
        sector_size=args.sector_size,
        workers=args.workers,
    )
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
    print(
        f"READY blkback domain {plat.domid} serving {source.path} "
        f"({source.size} bytes{', read-only' if source.readonly else ''}) "
        f"as vbd {devid} of domain {args.frontend}",
        flush=True,
    )
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        await bk.close(timeout=10)
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_blkfront_nbd(args: argparse.Namespace) -> int:
    try:
        return await _blkfront_nbd(args)
    except _FAILURES as exc:
        return _fail("blkfront", exc)


async def _blkfront_nbd(args: argparse.Namespace) -> int:
    import aioxen
    from aioxen.blk.device import BlockDevice
    from aioxen.blk.nbd import start_server
    from aioxen.blk.vbd import open_blkfront

    _logging(args.verbose)
    stop = StopSignals()  # SIGINT/SIGTERM: orderly stop
    plat = aioxen.platform()
    config = _front_config(args)
    async with plat, contextlib.AsyncExitStack() as stack:
        exports: dict[str, BlockDevice] = {}
        for name in args.devices:
            dev = await stack.enter_async_context(
                open_blkfront(name, platform=plat, config=config, backend_domid=args.backend,
                              timeout=args.timeout)
            )  # fmt: skip
            exports[name] = dev
        server = await start_server(exports, args.listen)
        sockets = getattr(server, "sockets", None)
        sock = sockets[0].getsockname() if sockets else args.listen
        where = f"{sock[0]}:{sock[1]}" if isinstance(sock, tuple) else str(sock)
        print(
            f"READY blkfront nbd listening on {where} exporting "
            + ", ".join(f"{n} ({d.size} bytes)" for n, d in exports.items()),
            flush=True,
        )
        try:
            await stop.wait()
        finally:
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
    try:
        async with aioxen.platform() as plat:
            info = await vbd_info(plat, args.device)
    except _FAILURES as exc:
        return _fail("blkfront info", exc)
    print(json.dumps(info, indent=2))
    return 0


def _front_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        type=int,
        default=None,
        metavar="DOMID",
        help="expected backend domain (default: whatever the toolstack wrote)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for each device to connect (default 30)",
    )
    p.add_argument("--queues", type=int, default=1, help="queues per device (default 1)")
    p.add_argument(
        "--ring-page-order",
        type=int,
        default=2,
        help="ring size as a power of two pages (default 2, capped by the backend)",
    )
    p.add_argument(
        "--max-indirect-segments",
        type=int,
        default=256,
        help="segments per indirect request (default 256)",
    )
    p.add_argument(
        "--pool-pages",
        type=int,
        default=2048,
        help="granted data pages per device (default 2048 = 8 MiB)",
    )
    p.add_argument("--no-persistent", action="store_true", help="do not offer persistent grants")
    p.add_argument("-v", "--verbose", action="count", default=0)  # fmt: skip


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "blkback",
        help="serve a raw image file as a virtual block device",
        description="Serve a raw image file to a frontend domain as virtual block device "
        "DEVID (blkif protocol), until interrupted.",
    )
    p.add_argument("--image", required=True, metavar="FILE", help="raw image file to serve")
    p.add_argument("--frontend", required=True, type=int, metavar="DOMID",
                   help="the frontend domain")  # fmt: skip
    p.add_argument(
        "--devid", default="xvda", help="virtual device: number or xvd name (default xvda = 51712)"
    )
    p.add_argument("--readonly", action="store_true", help="serve read-only")
    p.add_argument("--sector-size", type=int, default=512, choices=[512, 4096])
    p.add_argument(
        "--no-create",
        action="store_true",
        help="do not create the XenStore device entries (a toolstack did)",
    )
    p.add_argument(
        "--max-indirect-segments",
        type=int,
        default=256,
        help="advertised feature-max-indirect-segments (0: no indirect)",
    )
    p.add_argument("--max-ring-page-order", type=int, default=4)
    p.add_argument("--max-queues", type=int, default=4)
    p.add_argument(
        "--queue-depth",
        type=int,
        default=64,
        help="requests served concurrently per queue (default 64)",
    )
    p.add_argument("--workers", type=int, default=4, help="I/O threads (default 4)")
    p.add_argument("--no-persistent", action="store_true", help="do not offer persistent grants")
    p.add_argument("--no-discard", action="store_true", help="do not offer discard")
    p.add_argument("-v", "--verbose", action="count", default=0)  # fmt: skip
    p.set_defaults(func=run_blkback)

    f = subparsers.add_parser(
        "blkfront",
        help="use virtual block devices (export them over NBD)",
        description="Connect this domain's virtual block devices.",
    )
    fsub = f.add_subparsers(dest="blkfront_command", metavar="COMMAND", required=True)
    nbd = fsub.add_parser(
        "nbd",
        help="export devices over NBD",
        description="Export virtual block devices as NBD exports (fixed newstyle; "
        "NBD_OPT_GO/INFO, READ/WRITE/FLUSH/TRIM/WRITE_ZEROES, structured replies).",
    )
    nbd.add_argument(
        "--listen",
        default="127.0.0.1:10809",
        help="HOST:PORT or unix:PATH (default 127.0.0.1:10809; port 0 picks one)",
    )
    nbd.add_argument("devices", nargs="+", metavar="DEVICE",
                     help="device number or xvd name; also the export name")  # fmt: skip
    _front_options(nbd)
    nbd.set_defaults(func=run_blkfront_nbd)
    info = fsub.add_parser(
        "info",
        help="print a device's state, owners and disk (read-only: never connects it)",
    )
    info.add_argument("device", metavar="DEVICE")
    _front_options(info)
    info.set_defaults(func=run_blkfront_info)


__all__ = ["register"]
