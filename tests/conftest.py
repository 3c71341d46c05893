"""Shared test configuration: every async test runs on asyncio's default loop and on uvloop."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

# Test modules are imported with --import-mode=importlib, so equal basenames in different
# directories do not clash.  Helper modules beside the tests are imported by plain name
# (``from support.xenstored import ...``, ``from vchan_harness import ...``): put tests/ and
# every test directory on sys.path.
_TESTS = Path(__file__).resolve().parent
for _dir in [_TESTS, *sorted(p for p in _TESTS.iterdir() if p.is_dir())]:
    if _dir.name != "__pycache__" and str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def pytest_configure(config: Any) -> None:
    # A shell without job control starts background jobs (``make test &`` in a script, a
    # CI runner's ``cmd &``) with SIGINT ignored, and the processes the tests start would
    # inherit that and shrug off the Ctrl-C the signal tests send them.  Give this process
    # Python's usual handler back: the children then start with SIGINT at its default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "crossprocess: spawns real processes")
    config.addinivalue_line(
        "markers", "needs_distinct_domains: conformance test needs several domains"
    )
    config.addinivalue_line(
        "markers", "needs_peer_loss_reports: conformance test needs peer-loss reports"
    )


@pytest.fixture(scope="module")
def mallory() -> Iterator[Any]:
    """A second, real Unix user (``support.unix_user.OtherUser``, created for the module
    using it, removed after it): the other local user of the hostile-root and red-team
    tests."""
    from support.unix_user import other_user, require_user_creation

    require_user_creation()
    with other_user() as user:
        yield user
