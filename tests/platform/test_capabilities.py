"""Platform capabilities: each platform declares what protocol code may assume, and
protocol code reads those attributes instead of testing which platform it has."""

from __future__ import annotations

import pathlib
import re

import aioxen
from aioxen.blk.front import DEFAULT_POOL_PAGES, FrontendConfig
from aioxen.platforms.base import Platform
from aioxen.platforms.inheap import InHeapPlatform, InHeapWorld
from aioxen.platforms.unix import UnixPlatform
from aioxen.platforms.xen import GNTALLOC_DEFAULT_LIMIT, XenPlatform
from aioxen.vchan import DEFAULT_BUSY_POLL
from aioxen.vchan.transport import check_busy_poll

PACKAGE = pathlib.Path(aioxen.__file__).parent


def test_each_platform_declares_its_capabilities() -> None:
    assert Platform.peer_runs_concurrently is True and Platform.grant_share_limit is None
    # inheap: every domain of a world shares one thread
    assert InHeapPlatform.peer_runs_concurrently is False
    assert InHeapPlatform.single_process is True
    assert not UnixPlatform.single_process and not XenPlatform.single_process
    assert InHeapPlatform.grant_share_limit is None
    assert UnixPlatform.peer_runs_concurrently is True
    assert UnixPlatform.grant_share_limit is None
    assert XenPlatform.peer_runs_concurrently is True
    assert XenPlatform.grant_share_limit == GNTALLOC_DEFAULT_LIMIT == 1024


async def test_capabilities_drive_the_defaults() -> None:
    """vchan's busy_poll default and blkfront's grant pool follow the capabilities (the
    same values as when they tested the platform's name)."""
    async with InHeapPlatform(1, world=InHeapWorld()) as inheap:
        assert check_busy_poll(None, inheap.peer_runs_concurrently) == 0.0
        assert FrontendConfig().resolved_pool_pages(inheap) == DEFAULT_POOL_PAGES
    xen = XenPlatform(domid=1)  # nothing opened until used
    assert check_busy_poll(None, xen.peer_runs_concurrently) == DEFAULT_BUSY_POLL
    assert FrontendConfig().resolved_pool_pages(xen) == 640
    assert FrontendConfig(pool_pages=100).resolved_pool_pages(xen) == 100


def test_no_code_outside_the_platforms_tests_platform_names() -> None:
    """Callers never branch on which platform they have (platform *choice* lives in
    aioxen.platforms; commands that pick a platform name it, e.g. ``AIOXEN_PLATFORM``)."""
    branch = re.compile(
        r"""(\.name|platform_name|plat_name)\s*[!=]=|[!=]=\s*["'](inheap|unix|xen)["']"""
    )
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "platforms":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            # (an address scheme unix:PATH is no platform; the platforms' own choice
            # function returns a name by design)
            if branch.search(line) and not re.search("scheme|choose_platform_name", line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
