"""``aioxen xenstored`` as a process: start-up lines, clean shutdown with persistence, the
``aioxen xenstore`` CLI (against ours; it speaks only the standard protocol for domid 0)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support.xenstored import Xenstored, start_xenstored

from aioxen.xenstore import Perm, XenStoreClient


def cli(xs: Xenstored, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aioxen", "xenstore", *argv],
        env=xs.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
    )


async def test_root_and_socket_are_private(xenstored: Xenstored) -> None:
    assert stat.S_IMODE(os.stat(xenstored.root).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(xenstored.socket).st_mode)


async def test_second_server_on_same_root_refuses(xenstored: Xenstored) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aioxen", "xenstored", "--root", str(xenstored.root),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert out == b""
    assert b"already listening" in err
    assert xenstored.alive()


async def test_persistence_survives_clean_restart(tmp_path: Path) -> None:
    root = tmp_path / "root"
    server = start_xenstored(root, "--persist")
    try:
        xs = XenStoreClient.for_unix_socket(server.socket, 0, timeout=10)
        await xs.write("/keep/a", b"\x00binary\xff")
        await xs.set_perms("/keep/a", ["n3", "r4"])
        dom = XenStoreClient.for_unix_socket(server.socket, 3, timeout=10)
        await dom.write("data/x", "y")
        open_tx = dom.transaction()
        await open_tx.start()
        await open_tx.write("data/uncommitted", "z")
        # Committed right before the signal: must not be lost.
        await xs.write("/keep/last", "written just before SIGTERM")
        assert server.stop() == 0
        await xs.close()
        await dom.close()
    finally:
        if server.alive():
            server.stop()
    state = root / "xenstored" / "store.json"
    assert json.loads(state.read_text())["format"] == "aioxen-xenstore-1"
    assert not (root / "xenstored" / "socket").exists()

    server = start_xenstored(root, "--persist")
    try:
        xs = XenStoreClient.for_unix_socket(server.socket, 0, timeout=10)
        assert await xs.read("/keep/a") == b"\x00binary\xff"
        assert await xs.get_perms("/keep/a") == [Perm(3, "n"), Perm(4, "r")]
        assert await xs.read("/keep/last") == b"written just before SIGTERM"
        assert await xs.read("/local/domain/3/data/x") == b"y"
        assert not await xs.exists("/local/domain/3/data/uncommitted")
        assert await xs.is_domain_introduced(3)
        await xs.close()
    finally:
        assert server.stop() == 0


async def test_without_persist_nothing_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "root"
    server = start_xenstored(root)
    xs = XenStoreClient.for_unix_socket(server.socket, 0, timeout=10)
    await xs.write("/gone", "x")
    await xs.close()
    assert server.stop() == 0
    server = start_xenstored(root)
    xs = XenStoreClient.for_unix_socket(server.socket, 0, timeout=10)
    assert not await xs.exists("/gone")
    await xs.close()
    assert server.stop() == 0


def test_cli_read_write_ls_rm_perms(xenstored: Xenstored) -> None:
    cli(xenstored, "write", "/cli/a", "1", "/cli/b/c", "two words")
    assert cli(xenstored, "read", "/cli/a", "/cli/b/c").stdout == "1\ntwo words\n"
    assert cli(xenstored, "ls", "/cli").stdout == 'a = "1"\nb = ""\n c = "two words"\n'
    cli(xenstored, "perms", "/cli/a", "n5", "r6")
    assert cli(xenstored, "perms", "/cli/a").stdout == "n5 r6\n"
    assert cli(xenstored, "ls", "-p", "/cli/a").stdout == ""
    assert "(n5,r6)" in cli(xenstored, "ls", "-p", "/cli").stdout
    assert cli(xenstored, "--domid", "6", "read", "/cli/a").stdout == "1\n"
    denied = cli(xenstored, "--domid", "7", "read", "/cli/a", check=False)
    assert denied.returncode == 1
    assert "EACCES" in denied.stderr and "/cli/a" in denied.stderr
    cli(xenstored, "rm", "/cli/b")
    assert cli(xenstored, "ls", "/cli").stdout == 'a = "1"\n'
    missing = cli(xenstored, "read", "/cli/nope", check=False)
    assert missing.returncode == 1 and "ENOENT" in missing.stderr
    # Interop: the C tools read what the CLI wrote.
    r = subprocess.run(
        ["xenstore-read", "/cli/a"], env=xenstored.env(), capture_output=True, text=True
    )
    assert r.stdout == "1\n"


async def test_cli_watch(xenstored: Xenstored) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aioxen", "xenstore", "watch", "-n", "2", "/cliwatch",
        env=xenstored.env(), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert first == b"/cliwatch\n"
    xs = XenStoreClient.for_unix_socket(xenstored.socket, 0, timeout=10)
    await xs.write("/cliwatch/k", "v")
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert out == b"/cliwatch/k\n"
    assert proc.returncode == 0
    await xs.close()


def test_help_lists_the_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aioxen", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "xenstored" in out and "xenstore" in out
    sub = subprocess.run(
        [sys.executable, "-m", "aioxen", "xenstore", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for op in ("read", "write", "ls", "rm", "watch", "perms"):
        assert op in sub


@pytest.mark.parametrize(("bad", "why"), [("nodez=3", "unknown quota"), ("nodes=x", "invalid")])
def test_bad_quota_option(tmp_path: Path, bad: str, why: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "aioxen", "xenstored", "--root", str(tmp_path), "--quota", bad],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and why in r.stderr
