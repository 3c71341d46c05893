"""The Xen lab tier: ``test_lab.py`` runs on the host and boots Xen once per session;
``guest/`` holds the tests that run *inside* dom0 and is only collected there (the guest
sets ``AIOXEN_XENLAB_GUEST=1``) or when the host lists them (``AIOXEN_XENLAB_COLLECT=1``);
``peer/`` holds the pytest session that runs inside the peer domU (``AIOXEN_XENLAB_PEER=1``,
set by ``guest/test_crossdomain.py``, which also lists it)."""

from __future__ import annotations

import os
from typing import Any

import pytest

collect_ignore = []
if not (os.environ.get("AIOXEN_XENLAB_GUEST") or os.environ.get("AIOXEN_XENLAB_COLLECT")):
    collect_ignore.append("guest")
# peer/ runs inside the peer domU (test_crossdomain.py starts it there) and nowhere else.
if not os.environ.get("AIOXEN_XENLAB_PEER"):
    collect_ignore.append("peer")

_REPORT = pytest.StashKey[dict[str, Any]]()


@pytest.fixture(scope="session")
def lab_report(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Where the lab run leaves what the terminal summary reports."""
    return request.config.stash.setdefault(_REPORT, {})


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the lab's boot as soon as the selection is known to hold ``test_lab.py``:
    the boot and the guest tier take minutes, mostly in QEMU, and the host's other tests
    can run meanwhile instead of before it."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        module = getattr(item, "module", None)
        start = getattr(module, "start_in_background", None)
        if start is not None and item.path.name == "test_lab.py":
            start()
            return


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    run = config.stash.get(_REPORT, {}).get("run")
    if run is not None:
        terminalreporter.write_line(
            f"xenlab: Xen boot + dom0 test run took {run.seconds:.1f}s "
            f"(guest pytest rc {run.pytest_rc}); console and junit in {run.results}"
        )
