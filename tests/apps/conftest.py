"""Fixtures for the application tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.xenstored import XenstoredProcess


@pytest.fixture(scope="module")
def xenstored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XenstoredProcess]:
    """One real ``aioxen xenstored`` (and unix-platform root) per test module."""
    server = XenstoredProcess(tmp_path_factory.mktemp("apps") / "root")
    yield server
    assert server.alive(), "xenstored died during the tests"
    assert server.stop() == 0
