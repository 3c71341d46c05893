"""The platform conformance suite (``tests/platform/test_platform_conformance.py``) on real
Xen: the same test functions, run inside dom0 on the ``xen`` platform.

Every "domain" of a test is dom0 itself (:class:`~platform_harness.XenHarness`), which Xen
and Linux allow: dom0 binds interdomain channels to itself and maps its own grants.  The
tests whose marks this harness cannot meet (:func:`platform_harness.applies`) are the ones
that need several domains (permissions between domains: covered on ``unix``/``inheap``,
and Xen enforces them itself) or a reported peer loss (Xen reports none; the unmap-notify
tests here cover how protocols learn of a dead peer instead).  They are listed in
:data:`NOT_APPLICABLE` so the set is explicit and checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import test_platform_conformance as suite
from platform_harness import Harness, XenHarness, applies, leak_checked

NOT_APPLICABLE = {
    "test_connect_to_port_offered_to_another_domain",
    "test_map_by_wrong_grantee_is_denied",
    "test_map_from_domain_that_never_shared",
    "test_peer_close_wakes_waiter_with_connection_reset",
    "test_last_notify_before_close_is_not_lost",
    "test_handler_gets_batches_and_peer_loss",
    "test_platform_close_releases_everything",
}

_HARNESS = XenHarness(Path("/nonexistent"))  # only its capabilities are read
_ALL = {name: fn for name, fn in vars(suite).items() if name.startswith("test_")}
globals().update({name: fn for name, fn in _ALL.items() if applies(fn, _HARNESS)})


def test_not_applicable_set_is_what_the_marks_say() -> None:
    skipped = {name for name, fn in _ALL.items() if not applies(fn, _HARNESS)}
    assert skipped == NOT_APPLICABLE
    assert len(_ALL) - len(skipped) >= 30


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with leak_checked(XenHarness(tmp_path)) as h:
        yield h
