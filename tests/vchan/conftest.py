"""Fixtures for the vchan tests: a leak-checked ``world`` on ``inheap`` and ``unix``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
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
    yield w
    test_leaks = w.leaks()
    await w.close()
    world_leaks = w.world_leaks()
    problems = []
    if test_leaks:
        problems.append("test left open:\n  " + "\n  ".join(test_leaks))
    if world_leaks:
        problems.append("still bound/shared/mapped after close:\n  " + "\n  ".join(world_leaks))
    if problems:
        pytest.fail(f"{w.name} leaks\n" + "\n".join(problems), pytrace=False)
