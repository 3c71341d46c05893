"""Platform harnesses for the conformance suite (see ``conftest.py`` for the fixture).

A harness creates opened platforms (``await harness.platform(domid)``) that share one
"world" (one ``InHeapWorld``, one ``$XEN_ROOT``) and reports leaks before and after closing
them.  Register another platform (e.g. ``xen`` in the Xen lab) with :func:`register_harness`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from aioxen.platform.base import Platform


class Harness(Protocol):
    """What a conformance harness provides."""

    name: str

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


class _Base:
    name = "?"

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
        from aioxen.platform.inheap import InHeapWorld

        self.world = InHeapWorld()

    async def platform(self, domid: int) -> Platform:
        from aioxen.platform.inheap import InHeapPlatform

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
        from aioxen.platform.unix import UnixPlatform

        p = UnixPlatform(domid=domid, root=str(self.root))
        await p.open()
        self.platforms.append(p)
        return p

    def world_leaks(self) -> list[str]:
        from aioxen.platform.unix import root_leaks

        return root_leaks(str(self.root))


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
    return list(HARNESSES)
