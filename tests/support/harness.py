"""The ``harness`` fixture: a test runs once on every registered platform harness (inheap,
unix; see tests/platform/platform_harness.py), and fails if it, or the harness after its
close, leaves anything open.  A test directory's conftest imports it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from platform_harness import HARNESSES, harness_names  # type: ignore[import-not-found]


@pytest.fixture(params=harness_names())
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    h = HARNESSES[request.param](tmp_path)
    yield h
    test_leaks = h.leaks()
    await h.close()
    world_leaks = h.world_leaks()
    assert not test_leaks, f"{h.name}: test left open: {test_leaks}"
    assert not world_leaks, f"{h.name}: still open after close: {world_leaks}"
