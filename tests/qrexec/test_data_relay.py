"""relay_process: a real subprocess as the service, over a socketpair and aioxen vchan
(inheap, unix): pipes, EOFs, exit statuses the Qubes way (128+N for signal N), input a
process no longer reads, and a caller that goes away (the process is reaped, no hang)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from typing import Any

import pytest

from aioxen.qrexec import wire as w
from aioxen.qrexec.data import CallerEnd, ServiceEnd, relay_process

pytestmark = pytest.mark.timeout(180)
PairFactory = Callable[..., Any]
HANG_GUARD = 60
MiB = 1 << 20


async def run(
    channel_pair: PairFactory,
    argv: list[str],
    stdin: bytes = b"",
    version: int = 4,
) -> tuple[int, tuple[bytes, bytes, int]]:
    (cr, cw), (sr, sw) = await channel_pair()
    caller, service = await asyncio.gather(
        CallerEnd.open(cr, cw), ServiceEnd.open(sr, sw, max_version=version)
    )
    async with asyncio.timeout(HANG_GUARD):
        relayed, result = await asyncio.gather(
            relay_process(service, argv), caller.communicate(stdin)
        )
    await caller.aclose()
    return relayed, result


@pytest.mark.parametrize("version", [2, 4])
async def test_cat_bulk(channel_pair: PairFactory, version: int) -> None:
    data = random.Random(version).randbytes(MiB)
    code, (out, err, status) = await run(channel_pair, ["cat"], data, version)
    assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest()
    assert (err, status, code) == (b"", 0, 0)


@pytest.mark.parametrize("n", [0, 3, w.EXIT_PROBLEM, w.EXIT_REFUSED, w.EXIT_NOT_FOUND, 255])
async def test_exit_status(channel_pair: PairFactory, n: int) -> None:
    code, result = await run(channel_pair, ["sh", "-c", f"exit {n}"])
    assert code == n and result == (b"", b"", n)


@pytest.mark.parametrize("sig, status", [("KILL", 137), ("TERM", 143)])
async def test_killed_by_signal(channel_pair: PairFactory, sig: str, status: int) -> None:
    code, (out, _, got) = await run(channel_pair, ["sh", "-c", f"echo before; kill -{sig} $$"])
    assert (out, got, code) == (b"before\n", status, status)


async def test_stdout_and_stderr(channel_pair: PairFactory) -> None:
    _, result = await run(channel_pair, ["sh", "-c", "echo out; echo err >&2; exit 1"])
    assert result == (b"out\n", b"err\n", 1)


async def test_process_ignores_stdin(channel_pair: PairFactory) -> None:
    """The process exits without reading: the caller's 4 MiB are discarded, no error."""
    _, result = await run(channel_pair, ["sh", "-c", "echo hi"], bytes(4 * MiB))
    assert result == (b"hi\n", b"", 0)


async def test_process_closes_stdin_early(channel_pair: PairFactory) -> None:
    _, result = await run(channel_pair, ["head", "-c", "10"], bytes(range(256)) * 16384)
    assert result == (bytes(range(10)), b"", 0)


async def test_output_held_by_a_grandchild(channel_pair: PairFactory) -> None:
    """Like Qubes, the call ends when stdout and stderr end, not when the process exits."""
    _, result = await run(channel_pair, ["sh", "-c", "(sleep 0.2; echo late) & echo early"])
    assert result == (b"early\nlate\n", b"", 0)


async def test_started_process(channel_pair: PairFactory) -> None:
    (cr, cw), (sr, sw) = await channel_pair()
    caller, service = await asyncio.gather(CallerEnd.open(cr, cw), ServiceEnd.open(sr, sw))
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        "tr", "a-z", "A-Z", stdin=pipe, stdout=pipe, stderr=pipe
    )
    async with asyncio.timeout(HANG_GUARD):
        code, result = await asyncio.gather(
            relay_process(service, proc), caller.communicate(b"shout")
        )
    assert (code, result) == (0, (b"SHOUT", b"", 0))
    await caller.aclose()


@pytest.mark.parametrize(
    "argv",
    [
        ["yes"],  # writes until its pipe is closed
        ["sleep", "1000"],  # ignores its pipes: killed after the grace period
        ["cat"],  # waits for input
    ],
)
async def test_caller_gone(channel_pair: PairFactory, argv: list[str]) -> None:
    (cr, cw), (sr, sw) = await channel_pair()
    caller, service = await asyncio.gather(CallerEnd.open(cr, cw), ServiceEnd.open(sr, sw))
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe, stderr=pipe)
    relay = asyncio.ensure_future(relay_process(service, proc, kill_grace=0.5))
    if argv == ["yes"]:
        await caller.stdout.readexactly(100_000)
    caller.abort()
    async with asyncio.timeout(HANG_GUARD):
        with pytest.raises(ConnectionResetError):
            await relay
    assert proc.returncode is not None  # reaped
