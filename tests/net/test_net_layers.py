"""net/ has the shape of blk/ (and of aioquic's quic/ vs asyncio/): a data path per end,
netfront's asyncio transport, the xenbus drivers, and the definitions both ends share in
netif.py.  Neither end imports the other end's modules; no module grows past ~800 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import aioxen.net

NET = Path(aioxen.net.__file__).parent
FRONT_SIDE = {"aioxen.net.front", "aioxen.net.front_queue", "aioxen.net.transport"}
BACK_SIDE = {"aioxen.net.back", "aioxen.net.vif"}


def _imports(module: str) -> set[str]:
    path = NET / (module.rsplit(".", 1)[1] + ".py")
    tree = ast.parse(path.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_no_end_imports_the_other_end() -> None:
    for mod in FRONT_SIDE:
        assert not _imports(mod) & BACK_SIDE, mod
    for mod in BACK_SIDE:
        assert not _imports(mod) & FRONT_SIDE, mod


def test_data_paths_know_no_xenbus_or_transport() -> None:
    for mod in ("aioxen.net.front_queue", "aioxen.net.vif", "aioxen.net.netif"):
        bad = {m for m in _imports(mod) if m.startswith(("aioxen.xenbus", "aioxen.flowcontrol"))}
        assert not bad, (mod, bad)


def test_modules_stay_small() -> None:
    for path in NET.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 820, path.name


def test_public_names_and_paths_still_work() -> None:
    from aioxen.net.back import Netback, Vif, serve_vif
    from aioxen.net.front import NetfrontTransport, NetStats, create_frontend

    assert aioxen.net.Netback is Netback and aioxen.net.Vif is Vif
    assert aioxen.net.serve_vif is serve_vif and aioxen.net.NetStats is NetStats
    assert aioxen.net.NetfrontTransport is NetfrontTransport
    assert aioxen.net.create_frontend is create_frontend
