"""Fixtures for the vchan tests: a leak-checked ``world`` on ``inheap`` and ``unix``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from platform_harness import leak_checked
from vchan_harness import InHeapWorld, UnixWorld, World, Xenstored


@pytest.fixture(scope="module")
def xenstored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xenstored]:
    """One real ``aioxen xenstored`` (and unix-platform root) per test module."""
    server = Xenstored(tmp_path_factory.mktemp("vchan") / "root")
    yield server
    assert server.alive(), "xenstored died during the tests"
    assert server.stop() == 0


@pytest.fixture(params=["inheap", "unix"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    """Platforms sharing one hypervisor and XenStore; leaks fail the test."""
    if request.param == "inheap":
        w: World = InHeapWorld()
    else:
        w = UnixWorld(request.getfixturevalue("xenstored"))
    async with leak_checked(w):
        yield w
