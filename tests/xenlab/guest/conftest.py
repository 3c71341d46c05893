"""Fixtures for tests that run inside the Xen lab's dom0 on the ``xen`` platform."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from aioxen.platforms.xen import XenPlatform

if TYPE_CHECKING:
    from peerdomu import Peer

IN_GUEST = bool(os.environ.get("AIOXEN_XENLAB_GUEST"))

# Helper modules beside the guest tests (``domu``) import by plain name.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


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


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    """The peer domU (:mod:`peerdomu`) of a cross-domain test module: module scope, so
    each ``test_crossdomain*.py`` module boots its own and destroys it at its end."""
    from peerdomu import start_peer

    p = start_peer()
    try:
        yield p
    finally:
        p.console.close()
        p.destroy()
