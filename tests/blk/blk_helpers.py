"""Helpers for block-device tests: a ring-level blkfront/blkback pair (no xenbus), and
``run`` for the NBD client tools (nbdinfo, nbdcopy, qemu-img, qemu-io)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aioxen.blk.back import BackendConfig, RingServer, limits_for
from aioxen.blk.blkif import request_format, response_format
from aioxen.blk.front import BackendInfo, BlkFront, FrontendConfig
from aioxen.blk.source import BlockSource
from aioxen.platforms.base import Platform
from aioxen.rings.aio import AsyncBackRing


def backend_info(source: BlockSource, config: BackendConfig) -> BackendInfo:
    """What a blkback with ``config`` serving ``source`` advertises."""
    lim = limits_for(source, config)
    return BackendInfo(
        sectors=lim.sectors,
        sector_size=source.sector_size,
        physical_sector_size=source.physical_sector_size,
        info=4 if source.readonly else 0,
        flush=config.flush,
        barrier=config.barrier,
        discard=lim.discard,
        discard_secure=lim.discard_secure,
        persistent=config.persistent,
        max_indirect_segments=config.max_indirect_segments,
        max_ring_page_order=config.max_ring_page_order,
        max_queues=config.max_queues,
    )


@dataclass
class Pair:
    dev: BlkFront
    servers: list[RingServer] = field(default_factory=list)
    rings: list[AsyncBackRing[Any, Any]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def ring_pair(
    back: Platform,
    front: Platform,
    source: BlockSource,
    bconfig: BackendConfig | None = None,
    fconfig: FrontendConfig | None = None,
    *,
    ring_start: int = 0,
) -> AsyncIterator[Pair]:
    """A BlkFront in ``front`` wired straight to RingServers in ``back`` (no xenbus):
    the data path alone, as the handshake would leave it."""
    bconfig = bconfig or BackendConfig()
    info = backend_info(source, bconfig)
    dev = await BlkFront.create(front, back.domid, info, fconfig, ring_start=ring_start)
    pair = Pair(dev)
    neg = dev.negotiated
    try:
        for keys in dev.queue_keys():
            refs = [int(v) for k, v in sorted(keys.items()) if k.startswith("ring-ref")]
            if len(refs) > 1:
                refs = [int(keys[f"ring-ref{i}"]) for i in range(len(refs))]
            ring: AsyncBackRing[Any, Any] = await AsyncBackRing.attach(
                back, front.domid, refs, int(keys["event-channel"]),
                request_format(neg.abi), response_format(neg.abi),
            )  # fmt: skip
            srv = RingServer(
                back, front.domid, ring, source, limits_for(source, bconfig),
                persistent=neg.persistent, queue_depth=bconfig.queue_depth,
            )  # fmt: skip
            pair.rings.append(ring)
            pair.servers.append(srv)
            pair.tasks.append(asyncio.ensure_future(srv.run()))
        yield pair
    finally:
        for ring in pair.rings:
            ring.close()
        for t in pair.tasks:
            with contextlib.suppress(Exception):
                await t
        await dev.close()


async def run(*cmd: str, timeout: float = 120) -> str:
    """Run a command to completion (``timeout``: a hang guard); its stdout+stderr, which
    the assertion shows if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{text}"
    return text
