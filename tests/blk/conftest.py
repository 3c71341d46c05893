"""Block-device tests run on every registered platform harness (inheap, unix)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from platform_harness import HARNESSES, harness_names  # type: ignore[import-not-found]
from support.harness import harness  # noqa: F401  (the fixture)


@pytest.fixture(params=harness_names())
async def store_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """A platform harness whose platforms have a XenStore (unix: a real xenstored)."""
    from support.xenstored import XenstoredProcess

    h = HARNESSES[request.param](tmp_path)
    server = XenstoredProcess(h.root) if request.param == "unix" else None
    try:
        yield h
        test_leaks = h.leaks()
        await h.close()
        world_leaks = h.world_leaks()
        assert not test_leaks, f"{h.name}: test left open: {test_leaks}"
        assert not world_leaks, f"{h.name}: still open after close: {world_leaks}"
    finally:
        if server is not None:
            assert server.alive(), "xenstored died during the test"
            server.stop()
