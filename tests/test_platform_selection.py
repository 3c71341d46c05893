"""``aioxen.platform()`` selection, ``default_platform`` and ``Platform.store`` wiring."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.xenstored import Xenstored, start_xenstored

import aioxen
from aioxen.platforms import EVTCHN_DEVICE, choose_platform_name, default_platform
from aioxen.platforms.inheap import InHeapWorld
from aioxen.platforms.unix import UnixPlatform


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("AIOXEN_PLATFORM", "AIOXEN_DOMID", "XEN_ROOT", "XENSTORED_PATH"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def xenstored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xenstored]:
    server = start_xenstored(tmp_path_factory.mktemp("sel") / "root")
    yield server
    assert server.stop() == 0


def test_no_platform_is_a_clear_error(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(aioxen.PlatformError, match="XEN_ROOT"):
        choose_platform_name()


def test_choice_from_a_given_environment_with_a_fallback(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The choice reads the mapping it is given; ``fallback`` replaces the "no platform"
    error only (``aioxen cat -l`` uses it to decide on a private world)."""
    assert choose_platform_name({"AIOXEN_PLATFORM": "inheap"}, fallback="unix") == "inheap"
    with pytest.raises(aioxen.PlatformError, match="kvm"):
        choose_platform_name({"AIOXEN_PLATFORM": "kvm"}, fallback="unix")
    if os.path.exists(EVTCHN_DEVICE):  # inside a Xen domain the device decides
        assert choose_platform_name({}, fallback="unix") == "xen"
        return
    assert choose_platform_name({}, fallback="unix") == "unix"
    assert choose_platform_name({"XEN_ROOT": str(tmp_path)}) == "unix"
    with pytest.raises(aioxen.PlatformError, match="XEN_ROOT"):
        choose_platform_name({})
    clean_env.setenv("XEN_ROOT", str(tmp_path))  # os.environ is not read when given one
    with pytest.raises(aioxen.PlatformError, match="XEN_ROOT"):
        choose_platform_name({})


def test_cat_embeds_a_world_exactly_when_unix_has_no_root(tmp_path: Path) -> None:
    """``aioxen cat -l`` uses the platforms' own choice, not a copy of it."""
    from aioxen.apps.cat import needs_embedded_world

    # nothing set: unix with no root -- unless this machine is a Xen domain
    assert needs_embedded_world({}) is not os.path.exists(EVTCHN_DEVICE)
    assert needs_embedded_world({"AIOXEN_PLATFORM": "unix"}) is True
    assert needs_embedded_world({"XEN_ROOT": str(tmp_path)}) is False
    assert needs_embedded_world({"AIOXEN_PLATFORM": "unix", "XEN_ROOT": "/x"}) is False
    assert needs_embedded_world({"AIOXEN_PLATFORM": "inheap"}) is False
    assert needs_embedded_world({"AIOXEN_PLATFORM": "kvm"}) is False


def test_unknown_platform_name_is_rejected(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AIOXEN_PLATFORM", "kvm")
    with pytest.raises(aioxen.PlatformError, match="kvm"):
        choose_platform_name()
    with pytest.raises(aioxen.PlatformError, match="kvm"):
        aioxen.platform("kvm")


def test_xen_root_selects_unix_with_domid_from_env(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("XEN_ROOT", str(tmp_path / "root"))
    clean_env.setenv("AIOXEN_DOMID", "7")
    plat = aioxen.platform()
    assert isinstance(plat, UnixPlatform)
    assert plat.domid == 7
    assert plat.root == str(tmp_path / "root")


def test_environment_platform_wins(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("XEN_ROOT", str(tmp_path))
    clean_env.setenv("AIOXEN_PLATFORM", "inheap")
    assert aioxen.platform().name == "inheap"


async def test_default_platform_is_one_per_loop(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("AIOXEN_PLATFORM", "inheap")
    first = await default_platform()
    assert await default_platform() is first
    other_loop_platform = await asyncio.to_thread(asyncio.run, default_platform())
    assert other_loop_platform is not first


async def test_inheap_store_is_shared_by_the_world_and_enforces_permissions() -> None:
    world = InHeapWorld()
    async with (
        aioxen.platform("inheap", domid=0, world=world) as dom0,
        aioxen.platform("inheap", domid=2, world=world) as dom2,
        aioxen.platform("inheap", domid=3, world=world) as dom3,
    ):
        await dom2.store.write("data/secret", b"two")
        assert await dom2.store.read("/local/domain/2/data/secret") == b"two"
        assert await dom0.store.read("/local/domain/2/data/secret") == b"two"
        with pytest.raises(PermissionError, match="/local/domain/2/data/secret"):
            await dom3.store.read("/local/domain/2/data/secret")
        assert await dom3.store.read("domid") == b"3"


async def test_unix_store_identifies_as_the_platform_domid(
    xenstored: Xenstored, tmp_path: Path
) -> None:
    root, sock = str(xenstored.root), xenstored.socket
    async with (
        aioxen.platform("unix", domid=0, root=root, xenstored_path=sock) as dom0,
        aioxen.platform("unix", domid=4, root=root, xenstored_path=sock) as dom4,
        aioxen.platform("unix", domid=5, root=root, xenstored_path=sock) as dom5,
    ):
        await dom4.store.write("data/x", "four")
        assert await dom0.store.read("/local/domain/4/data/x") == b"four"
        with pytest.raises(PermissionError):
            await dom5.store.read("/local/domain/4/data/x")
        assert await dom5.store.read("domid") == b"5"
        await dom4.store.rm("data/x")
    # closing the platforms closed their connections: a fresh platform still works
    async with aioxen.platform("unix", domid=4, root=root, xenstored_path=sock) as again:
        with pytest.raises(FileNotFoundError):
            await again.store.read("data/x")


def test_platform_modules_import_as_written() -> None:
    """``aioxen.platform`` is the promised function; the implementations live in the
    ``aioxen.platforms`` package, importable by their dotted paths (issue 15 item 9)."""
    import importlib

    import aioxen

    assert callable(aioxen.platform)
    for name in ("base", "unix", "inheap", "xen"):
        module = importlib.import_module(f"aioxen.platforms.{name}")
        assert module.__name__ == f"aioxen.platforms.{name}"
    import aioxen.platforms.inheap as inheap

    assert callable(inheap.default_world)
