"""Fixtures for tests that run inside the Xen lab's dom0 on the ``xen`` platform."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from aioxen.platform.xen import XenPlatform

IN_GUEST = bool(os.environ.get("AIOXEN_XENLAB_GUEST"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xenlab)


@pytest.fixture
async def plat() -> AsyncIterator[XenPlatform]:
    """An opened ``xen`` platform of dom0 (its domid learned from /proc/xen)."""
    assert IN_GUEST and os.path.exists("/dev/xen/evtchn"), "guest tests run inside the Xen lab"
    p = XenPlatform()
    async with p:
        yield p


@pytest.fixture
async def plat2() -> AsyncIterator[XenPlatform]:
    """A second, independent platform object (its own device fds) in the same dom0."""
    p = XenPlatform()
    async with p:
        yield p
