"""The platform conformance suite (``tests/platform/test_platform_conformance.py``) inside
the peer domU: aioxen's ``xen`` platform as an unprivileged guest.

This module runs in the peer domU only (``tests/xenlab/guest/test_crossdomain.py`` starts
``pytest tests/xenlab/peer`` there and reports each test into dom0's run, which the host
reports in turn).  Every "domain" of a test is the domU itself
(``$XENLAB_PEER_DOMID``), as dom0 plays every domain in ``guest/test_conformance.py``: the
domU binds interdomain channels to itself and maps its own grants, through the same
``/dev/xen`` devices a guest program has.  The same tests as in dom0 cannot apply (their
marks need several domains or reported peer loss).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import test_platform_conformance as suite
from platform_harness import Harness, XenHarness, applies, leak_checked

DOMID = int(os.environ.get("XENLAB_PEER_DOMID", "1"))
NOT_APPLICABLE = {
    "test_connect_to_port_offered_to_another_domain",
    "test_map_by_wrong_grantee_is_denied",
    "test_map_from_domain_that_never_shared",
    "test_peer_close_wakes_waiter_with_connection_reset",
    "test_last_notify_before_close_is_not_lost",
    "test_handler_gets_batches_and_peer_loss",
    "test_platform_close_releases_everything",
}


class DomuHarness(XenHarness):
    """The peer domU: every domain of a test is the domU itself."""

    domids = (DOMID, DOMID, DOMID)


_HARNESS = DomuHarness(Path("/nonexistent"))  # only its capabilities are read
_ALL = {name: fn for name, fn in vars(suite).items() if name.startswith("test_")}
globals().update({name: fn for name, fn in _ALL.items() if applies(fn, _HARNESS)})


def test_not_applicable_set_is_what_the_marks_say() -> None:
    skipped = {name for name, fn in _ALL.items() if not applies(fn, _HARNESS)}
    assert skipped == NOT_APPLICABLE
    assert len(_ALL) - len(skipped) >= 30


def test_runs_in_the_peer_domu() -> None:
    """Not dom0: xenfs is not even mounted, and the domid is the peer's."""
    assert DOMID != 0 and os.environ.get("AIOXEN_XENLAB_PEER") == "1"
    assert os.path.exists("/dev/xen/gntalloc") and not os.path.exists("/proc/xen/capabilities")


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with leak_checked(DomuHarness(tmp_path)) as h:
        yield h
