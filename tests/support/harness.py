"""The ``harness`` fixture: a test runs once on every registered platform harness (inheap,
unix; see tests/platform/platform_harness.py), and fails if it, or the harness after its
close, leaves anything open.  A test directory's conftest imports it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from platform_harness import (  # type: ignore[import-not-found]
    HARNESSES,
    harness_names,
    leak_checked,
)


@pytest.fixture(params=harness_names())
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    async with leak_checked(HARNESSES[request.param](tmp_path)) as h:
        yield h
