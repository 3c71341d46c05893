"""One owner per block device, with real processes on the unix platform (issue 13, finding 2):

* a second ``aioxen blkback`` for the same vbd with another image fails (rc 1, naming the
  holder) and touches nothing: the frontend still reads the first image, and the first
  backend outlives the second's exit;
* a second ``aioxen blkfront nbd`` for the same device is refused the same way;
* ``aioxen blkfront info`` on a live device only reads: both ends stay ``Connected`` and
  the NBD export keeps working;
* a SIGKILLed blkback's leftovers are recognised as stale and the next one takes over.

The commands run on the same event loop as the test (asyncio or uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from blk_helpers import run
from support.xenstored import XenstoredProcess
from test_blk_nbd_e2e import FRONT, RUNNER, aioxen, loop_name

from aioxen.ownership import Owner
from aioxen.xenbus.claim import OWNER_KEY

pytestmark = pytest.mark.crossprocess
SIZE = 1 << 20
DEVID = 51712
BDIR = f"/local/domain/0/backend/vbd/{FRONT}/{DEVID}"
FDIR = f"/local/domain/{FRONT}/device/vbd/{DEVID}"


@pytest.fixture
def xenstored(tmp_path: Path) -> Iterator[XenstoredProcess]:
    xs = XenstoredProcess(tmp_path / "root")
    yield xs
    assert xs.alive(), "xenstored died"
    xs.stop()


async def once(xs: XenstoredProcess, domid: int, *args: str) -> tuple[int, str, str]:
    """Run one ``aioxen`` command to completion: (rc, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, RUNNER, loop_name(), *args, env=xs.env(domid),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def xs_read(xs: XenstoredProcess, path: str) -> str:
    rc, out, err = await once(xs, 0, "xenstore", "read", path)
    assert rc == 0, err
    return out.strip()


def images(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(random.Random(1).randbytes(SIZE))
    b.write_bytes(random.Random(2).randbytes(SIZE))
    return a, b


async def read_export(where: str, tmp_path: Path, name: str) -> bytes:
    out = tmp_path / name
    await run("nbdcopy", f"nbd://{where}/xvda", str(out))
    return out.read_bytes()


def refused(rc: int, err: str, cmd: str, holder_pid: int, path: str) -> None:
    assert rc == 1, err
    assert err.startswith(f"aioxen {cmd}: "), err
    assert f"pid {holder_pid}" in err and path in err, err
    assert "Traceback" not in err, err


async def test_second_blkback_is_refused_and_first_keeps_serving(
    xenstored: XenstoredProcess, tmp_path: Path
) -> None:
    a, b = images(tmp_path)
    back = aioxen(xenstored, 0, "blkback", "--image", str(a), "--frontend", str(FRONT))
    async with back as be:
        keys = ("params", "state", "frontend")
        before = {k: await xs_read(xenstored, f"{BDIR}/{k}") for k in keys}
        rc, out, err = await once(
            xenstored, 0, "blkback", "--image", str(b), "--frontend", str(FRONT)
        )
        refused(rc, err, "blkback", be.proc.pid, BDIR)
        assert "READY" not in out
        after = {k: await xs_read(xenstored, f"{BDIR}/{k}") for k in keys}
        assert after == before and before["params"] == str(a)  # nothing touched
        owner = Owner.decode((await xs_read(xenstored, f"{BDIR}/{OWNER_KEY}")).encode())
        assert owner.pid == be.proc.pid
        # the first still serves, and serves its own image
        front = aioxen(xenstored, FRONT, "blkfront", "nbd", "--listen", "127.0.0.1:0", "xvda")
        async with front as fe:
            where = fe.ready.split("listening on ", 1)[1].split()[0]
            assert await read_export(where, tmp_path, "out.img") == a.read_bytes()
            # --no-create (under a toolstack) is refused too
            rc, _, err = await once(xenstored, 0, "blkback", "--image", str(b), "--frontend",
                                    str(FRONT), "--no-create")  # fmt: skip
            refused(rc, err, "blkback", be.proc.pid, BDIR)
            assert await read_export(where, tmp_path, "out2.img") == a.read_bytes()
        assert be.proc.returncode is None


async def test_second_blkfront_is_refused(xenstored: XenstoredProcess, tmp_path: Path) -> None:
    a, _ = images(tmp_path)
    back = aioxen(xenstored, 0, "blkback", "--image", str(a), "--frontend", str(FRONT))
    front = aioxen(xenstored, FRONT, "blkfront", "nbd", "--listen", "127.0.0.1:0", "xvda")
    async with back, front as fe:
        rc, _, err = await once(
            xenstored, FRONT, "blkfront", "nbd", "--listen", "127.0.0.1:0", "xvda"
        )
        refused(rc, err, "blkfront nbd", fe.proc.pid, FDIR)
        assert await xs_read(xenstored, f"{FDIR}/state") == "4"
        where = fe.ready.split("listening on ", 1)[1].split()[0]
        assert await read_export(where, tmp_path, "out.img") == a.read_bytes()


async def test_info_on_a_live_device_only_reads(
    xenstored: XenstoredProcess, tmp_path: Path
) -> None:
    a, _ = images(tmp_path)
    back = aioxen(xenstored, 0, "blkback", "--image", str(a), "--frontend", str(FRONT))
    front = aioxen(xenstored, FRONT, "blkfront", "nbd", "--listen", "127.0.0.1:0", "xvda")
    async with back as be, front as fe:
        where = fe.ready.split("listening on ", 1)[1].split()[0]
        for _ in range(2):
            rc, out, err = await once(xenstored, FRONT, "blkfront", "info", "xvda")
            assert rc == 0, err
            info = json.loads(out)
            assert info["frontend_state"] == info["backend_state"] == "Connected", info
            assert info["frontend_owner"]["pid"] == fe.proc.pid
            assert info["frontend_owner"]["alive"] is True
            assert info["backend_owner"]["pid"] == be.proc.pid
            assert info["size"] == SIZE and info["sector_size"] == 512
            assert info["queues"] == 1 and info["persistent"] is True
        assert await xs_read(xenstored, f"{FDIR}/state") == "4"
        assert await xs_read(xenstored, f"{BDIR}/state") == "4"
        assert await read_export(where, tmp_path, "out.img") == a.read_bytes()
        await run("qemu-io", "-f", "raw", f"nbd://{where}/xvda", "-c", "write -P 7 0 4096")
        assert a.read_bytes()[:4096] == bytes([7]) * 4096


async def test_info_of_a_missing_device_fails_cleanly(xenstored: XenstoredProcess) -> None:
    rc, out, err = await once(xenstored, FRONT, "blkfront", "info", "xvdb")
    assert rc == 1 and out == "" and "Traceback" not in err, err
    assert err.startswith("aioxen blkfront info: no vbd xvdb"), err


async def test_killed_blkback_is_reclaimed(xenstored: XenstoredProcess, tmp_path: Path) -> None:
    a, b = images(tmp_path)
    back = aioxen(xenstored, 0, "blkback", "--image", str(a), "--frontend", str(FRONT))
    be = await back.__aenter__()
    be.proc.kill()
    await be.proc.wait()
    with contextlib.suppress(AssertionError):
        await back.__aexit__(None, None, None)
    stale = Owner.decode((await xs_read(xenstored, f"{BDIR}/{OWNER_KEY}")).encode())
    assert stale is not None and stale.pid == be.proc.pid and not stale.alive()
    # the next blkback recognises the dead holder and takes the device over
    back2 = aioxen(xenstored, 0, "blkback", "--image", str(b), "--frontend", str(FRONT))
    front = aioxen(xenstored, FRONT, "blkfront", "nbd", "--listen", "127.0.0.1:0", "xvda")
    async with back2 as be2, front as fe:
        holder = Owner.decode((await xs_read(xenstored, f"{BDIR}/{OWNER_KEY}")).encode())
        assert holder is not None and holder.pid == be2.proc.pid
        where = fe.ready.split("listening on ", 1)[1].split()[0]
        assert await read_export(where, tmp_path, "out.img") == b.read_bytes()
    # the orderly exit removed the device it owned
    rc, _, _ = await once(xenstored, 0, "xenstore", "read", f"{BDIR}/state")
    assert rc != 0


async def test_backend_stopped_under_the_export_is_an_error(
    xenstored: XenstoredProcess, tmp_path: Path
) -> None:
    """blkback stopped in order (SIGTERM) under a live NBD export: reads through the export
    fail (EIO) from then on -- never zeros or a short copy that looks complete."""
    a, _ = images(tmp_path)
    front = aioxen(xenstored, FRONT, "blkfront", "nbd", "--listen", "127.0.0.1:0", "xvda")
    back = aioxen(xenstored, 0, "blkback", "--image", str(a), "--frontend", str(FRONT))
    be = await back.__aenter__()
    try:
        async with front as fe:
            where = fe.ready.split("listening on ", 1)[1].split()[0]
            assert await read_export(where, tmp_path, "ok.img") == a.read_bytes()
            rc, err = await be.stop()
            assert rc == 143, err
            proc = await asyncio.create_subprocess_exec(
                "nbdcopy", f"nbd://{where}/xvda", str(tmp_path / "cut.img"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode != 0, out  # the copy fails loudly
            assert b"Input/output error" in out or b"EIO" in out or b"error" in out.lower()
    finally:
        with contextlib.suppress(AssertionError):
            await back.__aexit__(None, None, None)
