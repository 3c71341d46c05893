"""Fixtures for the XenStore tests: in-process engines and a real ``aioxen xenstored``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from support.xenstored import ClientFactory, Xenstored, start_xenstored

from aioxen.xenstore import XenStoreClient
from aioxen.xenstore.engine import Engine, Quotas


@pytest.fixture(scope="module")
def xenstored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xenstored]:
    """One real xenstored process per test module (tests use distinct paths)."""
    server = start_xenstored(tmp_path_factory.mktemp("xs") / "root")
    yield server
    assert server.alive(), "xenstored died during the tests"
    assert server.stop() == 0


@pytest.fixture
async def unix_clients(xenstored: Xenstored) -> AsyncIterator[ClientFactory]:
    """``make(domid)`` -> a socket client of the module's xenstored, closed after the test."""
    made: list[XenStoreClient] = []

    def make(domid: int = 0) -> XenStoreClient:
        c = XenStoreClient.for_unix_socket(xenstored.socket, domid, timeout=10)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


@pytest.fixture
def engine() -> Engine:
    return Engine(Quotas())


@pytest.fixture
async def inproc(engine: Engine) -> AsyncIterator[ClientFactory]:
    """``make(domid)`` -> an in-process client of ``engine``."""
    made: list[XenStoreClient] = []

    def make(domid: int = 0) -> XenStoreClient:
        c = XenStoreClient.in_process(engine, domid, timeout=10)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()
