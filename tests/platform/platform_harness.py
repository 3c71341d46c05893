"""Platform harnesses for the conformance suite (see ``conftest.py`` for the fixture).

A harness creates opened platforms (``await harness.platform(domid)``) that share one
"world" (one ``InHeapWorld``, one ``$XEN_ROOT``) and reports leaks before and after closing
them.  Register another platform (e.g. ``xen`` in the Xen lab) with :func:`register_harness`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from aioxen.platforms.base import Platform


class Harness(Protocol):
    """What a conformance harness provides."""

    name: str
    #: The domids a test plays (domains A, B and C); all equal when the harness has only one.
    domids: tuple[int, int, int]
    #: Whether A, B and C are distinct domains (tests marked needs_distinct_domains).
    distinct_domains: bool
    #: Whether channels report a vanished peer (tests marked needs_peer_loss_reports).
    reports_peer_loss: bool

    async def platform(self, domid: int) -> Platform:
        """A new opened platform playing ``domid`` in this harness's world."""
        ...

    def leaks(self) -> list[str]:
        """What the test left open on its platforms (before they are closed)."""
        ...

    async def close(self) -> None:
        """Close every platform created."""
        ...

    def world_leaks(self) -> list[str]:
        """What is still bound/shared/mapped in the world after :meth:`close`."""
        ...


#: The test needs A, B and C to be different domains (permissions between domains).
needs_distinct_domains = pytest.mark.needs_distinct_domains
#: The test checks that a channel reports its peer's close/death (``peer_lost``, reset).
needs_peer_loss_reports = pytest.mark.needs_peer_loss_reports


def applies(test: object, harness: Harness) -> bool:
    """Whether a conformance test's requirements (its marks) hold for ``harness``."""
    marks = {m.name for m in getattr(test, "pytestmark", [])}
    if "needs_distinct_domains" in marks and not harness.distinct_domains:
        return False
    return "needs_peer_loss_reports" not in marks or harness.reports_peer_loss


class LeakChecked(Protocol):
    """What :func:`leak_checked` needs: a harness, or any world of platforms."""

    name: str

    def leaks(self) -> list[str]: ...

    async def close(self) -> None: ...

    def world_leaks(self) -> list[str]: ...


W = TypeVar("W", bound=LeakChecked)


@contextlib.asynccontextmanager
async def leak_checked(world: W) -> AsyncIterator[W]:
    """Yield ``world``; afterwards fail the test if it left anything open, or if closing
    its platforms left anything bound/shared/mapped."""
    yield world
    test_leaks = world.leaks()
    await world.close()
    world_leaks = world.world_leaks()
    problems = []
    if test_leaks:
        problems.append("test left open:\n  " + "\n  ".join(test_leaks))
    if world_leaks:
        problems.append("still bound/shared/mapped after close:\n  " + "\n  ".join(world_leaks))
    if problems:
        pytest.fail(f"{world.name} platform leaks\n" + "\n".join(problems), pytrace=False)


class _Base:
    name = "?"
    domids = (1, 2, 3)
    distinct_domains = True
    reports_peer_loss = True

    def __init__(self) -> None:
        self.platforms: list[Platform] = []

    def leaks(self) -> list[str]:
        out: list[str] = []
        for p in self.platforms:
            out += [f"{p!r}: {leak}" for leak in p.leaks()]  # type: ignore[attr-defined]
        return out

    async def close(self) -> None:
        for p in self.platforms:
            await p.close()


class InHeapHarness(_Base):
    name = "inheap"

    def __init__(self, tmp_path: Path) -> None:
        super().__init__()
        from aioxen.platforms.inheap import InHeapWorld

        self.world = InHeapWorld()

    async def platform(self, domid: int) -> Platform:
        from aioxen.platforms.inheap import InHeapPlatform

        p = InHeapPlatform(domid=domid, world=self.world)
        await p.open()
        self.platforms.append(p)
        return p

    def world_leaks(self) -> list[str]:
        return self.world.leaks()


class UnixHarness(_Base):
    name = "unix"

    def __init__(self, tmp_path: Path) -> None:
        super().__init__()
        self.root = tmp_path / "xenroot"

    async def platform(self, domid: int) -> Platform:
        from aioxen.platforms.unix import UnixPlatform

        p = UnixPlatform(domid=domid, root=str(self.root))
        await p.open()
        self.platforms.append(p)
        return p

    def world_leaks(self) -> list[str]:
        from aioxen.platforms.unix import root_leaks

        return root_leaks(str(self.root))


class XenHarness(_Base):
    """dom0 on real Xen (the Xen lab): every domain of a test is dom0 itself."""

    name = "xen"
    domids = (0, 0, 0)
    distinct_domains = False
    reports_peer_loss = False

    def __init__(self, tmp_path: Path) -> None:
        super().__init__()

    async def platform(self, domid: int) -> Platform:
        from aioxen.platforms.xen import XenPlatform

        p = XenPlatform(domid=domid)
        await p.open()
        self.platforms.append(p)
        return p

    def world_leaks(self) -> list[str]:
        # The kernel drops every binding, grant and mapping of a platform when its device
        # fds close; what a platform still tracks after close() is in its own leaks().
        return self.leaks()


HARNESSES: dict[str, Callable[[Path], Harness]] = {
    "inheap": InHeapHarness,
    "unix": UnixHarness,
}


def register_harness(name: str, factory: Callable[[Path], Harness]) -> None:
    """Plug another platform (e.g. ``xen`` in the Xen lab) into the conformance suite."""
    HARNESSES[name] = factory


def harness_names() -> list[str]:
    wanted = os.environ.get("AIOXEN_TEST_PLATFORMS")
    if wanted:
        return [n.strip() for n in wanted.split(",") if n.strip()]
    return ["inheap", "unix"]
