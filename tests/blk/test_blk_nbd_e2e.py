"""End to end on the unix platform with real processes and real NBD clients:

``aioxen xenstored`` + ``aioxen blkback --image FILE`` (domain 0) + ``aioxen blkfront nbd``
(domain 7), then libnbd's ``nbdcopy``/``nbdinfo`` and qemu's ``qemu-img``/``qemu-io`` use
the export: a multi-MiB random image is copied out and in and compared by checksum, and
random unaligned reads/writes are checked against a reference file.  The commands run on
the same event loop as the test (asyncio or uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvloop
from blk_helpers import run
from support.xenstored import XenstoredProcess

RUNNER = str(Path(__file__).with_name("blk_cli_runner.py"))
SIZE = 16 << 20
FRONT = 7

pytestmark = pytest.mark.crossprocess


def loop_name() -> str:
    return "uvloop" if isinstance(asyncio.get_running_loop(), uvloop.Loop) else "asyncio"


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.ready = ""

    async def wait_ready(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    err = await self.proc.stderr.read() if self.proc.stderr else b""
                    raise AssertionError(f"{self.name} exited: {err.decode()[-3000:]}")
                if line.startswith("READY"):
                    self.ready = line.strip()
                    return self.ready

    async def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(30):
            _, err = await self.proc.communicate()
        assert self.proc.returncode is not None
        return self.proc.returncode, err.decode(errors="replace")


@contextlib.asynccontextmanager
async def aioxen(xs: XenstoredProcess, domid: int, *args: str) -> AsyncIterator[Proc]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, RUNNER, loop_name(), *args,
        env=xs.env(domid), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    p = Proc(proc, f"aioxen {args[0]}")
    try:
        await p.wait_ready()
        yield p
    finally:
        if proc.returncode is None:
            rc, err = await p.stop()
            assert rc == 143, f"{p.name} exited with {rc}, not 143 (SIGTERM): {err[-3000:]}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def xenstored(tmp_path: Path) -> Iterator[XenstoredProcess]:
    xs = XenstoredProcess(tmp_path / "root")
    yield xs
    assert xs.alive(), "xenstored died"
    xs.stop()


@contextlib.asynccontextmanager
async def exported(xs: XenstoredProcess, image: Path, *back_args: str) -> AsyncIterator[str]:
    back = aioxen(xs, 0, "blkback", "--image", str(image), "--frontend", str(FRONT), *back_args)
    front = aioxen(xs, FRONT, "blkfront", "nbd", "--listen", "127.0.0.1:0", "xvda")
    async with back, front as fe:
        where = fe.ready.split("listening on ", 1)[1].split()[0]
        yield f"nbd://{where}/xvda"


async def test_nbd_copy_out_and_in(xenstored: XenstoredProcess, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(SIZE))
    original = sha(image)
    incoming = tmp_path / "in.img"
    incoming.write_bytes(random.Random(2).randbytes(SIZE))
    async with exported(xenstored, image) as uri:
        info = json.loads(await run("nbdinfo", "--json", uri))
        assert info["exports"][0]["export-size"] == SIZE
        out = tmp_path / "out.img"
        await run("nbdcopy", uri, str(out))
        assert sha(out) == original
        await run("nbdcopy", str(incoming), uri)  # nbdcopy flushes at the end
        assert sha(image) == sha(incoming)
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(tmp_path / "q.img"))
        assert sha(tmp_path / "q.img") == sha(incoming)
        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(incoming))
    assert sha(image) == sha(incoming)


async def test_qemu_io_random_io_against_reference(
    xenstored: XenstoredProcess, tmp_path: Path
) -> None:
    rng = random.Random(5)
    ref = bytearray(rng.randbytes(SIZE))
    image = tmp_path / "disk.img"
    image.write_bytes(ref)
    cmds: list[str] = []
    for _ in range(120):
        off = rng.randrange(0, SIZE - (1 << 20))
        length = rng.choice([rng.randrange(1, 8192), rng.randrange(1, 1 << 20)])
        kind = rng.random()
        if kind < 0.45:
            pat = rng.randrange(256)
            cmds.append(f"aio_write -P {pat} {off} {length}")
            ref[off : off + length] = bytes([pat]) * length
            cmds.append("aio_flush")
        elif kind < 0.55:
            cmds.append(f"write -z {off} {length}")
            ref[off : off + length] = bytes(length)
        elif kind < 0.65:
            cmds.append(f"discard {off // 4096 * 4096} 4096")  # trim: contents undefined
            ref[off // 4096 * 4096 : off // 4096 * 4096 + 4096] = bytes(4096)
            cmds.append(f"write -z {off // 4096 * 4096} 4096")  # make them defined again
        else:
            pat = ref[off]
            n = 1
            while n < length and ref[off + n] == pat:
                n += 1
            cmds.append(f"read -P {pat} {off} {n}")
    async with exported(xenstored, image, "--queue-depth", "8") as uri:
        args = ["qemu-io", "-f", "raw", uri]
        for c in cmds:
            args += ["-c", c]
        out = await run(*args)
        assert "Pattern verification failed" not in out and "error" not in out.lower(), out
        await run("qemu-io", "-f", "raw", uri, "-c", "flush")
    assert image.read_bytes() == bytes(ref)


async def test_frontend_killed_and_replaced(xenstored: XenstoredProcess, tmp_path: Path) -> None:
    """A blkfront process dies (SIGKILL) mid-use: the backend notices, resets, serves a new
    frontend; everything acknowledged before the kill is in the image."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    data = random.Random(9).randbytes(4 << 20)
    src = tmp_path / "part.img"
    src.write_bytes(data)
    async with aioxen(xenstored, 0, "blkback", "--image", str(image), "--frontend", str(FRONT)):
        front = aioxen(xenstored, FRONT, "blkfront", "nbd", "--listen", "127.0.0.1:0", "xvda")
        fe = await front.__aenter__()
        where = fe.ready.split("listening on ", 1)[1].split()[0]
        await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                  f"nbd://{where}/xvda")  # fmt: skip
        fe.proc.kill()
        await fe.proc.wait()
        with contextlib.suppress(AssertionError):
            await front.__aexit__(None, None, None)
        assert image.read_bytes()[: len(data)] == data  # acknowledged = in the file
        # a new frontend process connects to the same backend and sees the data
        async with aioxen(xenstored, FRONT, "blkfront", "nbd", "--listen", "127.0.0.1:0",
                          "xvda") as fe2:  # fmt: skip
            where = fe2.ready.split("listening on ", 1)[1].split()[0]
            out = tmp_path / "out.img"
            await run("nbdcopy", f"nbd://{where}/xvda", str(out))
            assert out.read_bytes()[: len(data)] == data
