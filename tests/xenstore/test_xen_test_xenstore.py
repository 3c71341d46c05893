"""Xen's own XenStore test program against ``aioxen xenstored``.

Debian's ``xen-utils-4.17`` ships ``/usr/lib/xen-4.17/bin/test-xenstore`` (Xen's
``tools/tests/xenstore``), a C program over libxenstore.  It connects to the socket named
by ``XENSTORED_PATH`` -- here a private server's socket, never the shared default
``/var/run/xenstored/socket`` -- and works below ``xenstore-test/<pid>`` (relative to
dom0's home).  It exits 0 when every test passed, 3 when one failed (printing
``<name>: failed (ret = <errno>, stage <stage>)``), 2 when it could not connect.

Run here: its list of tests, every test alone, all together, ``-i 20``, random order
(``-r SECONDS``: tests picked at random until the time is up), and two instances in
parallel on one server.  ``make test`` installs xen-utils-4.17, so this never skips.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.xenstored import Xenstored, start_xenstored

from aioxen.xenstore import XenStoreClient

TEST_XENSTORE = Path("/usr/lib/xen-4.17/bin/test-xenstore")
# `test-xenstore -l` of Xen 4.17 (checked by test_the_list_of_tests).
TESTS = [
    "read 1",
    "read 2000",
    "write 1",
    "write 2000",
    "dir",
    "rm node",
    "rm dir",
    "ta empty",
    "ta empty x",
    "ta rmw",
    "ta rmw x",
    "ta err",
]
WORKDIR = "/local/domain/0/xenstore-test"
TIMING = re.compile(r"\d+ ns|avg: \d+ ns \(\d+ ns \.\. \d+ ns\)")


@pytest.fixture(scope="module")
def xs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xenstored]:
    if not TEST_XENSTORE.is_file():
        pytest.fail(f"{TEST_XENSTORE} missing: install xen-utils-4.17 (`make deps`)")
    server = start_xenstored(tmp_path_factory.mktemp("xentest") / "root")
    yield server
    assert server.alive(), "xenstored died under test-xenstore"
    assert server.stop() == 0


def env_for(xs: Xenstored) -> dict[str, str]:
    env = xs.env()
    assert env["XENSTORED_PATH"] == xs.socket and xs.socket.startswith(str(xs.root))
    return env


def start(xs: Xenstored, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(TEST_XENSTORE), *args],
        env=env_for(xs),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, str]:
    """Wait for a run that must pass; ``{test name: its timing text}``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, (proc.args, proc.returncode, out, err)
    assert "failed" not in out and err == "", (out, err)
    results: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("Exhaustive transaction retries"):
            continue  # a report, not a failure (retries under heavy contention)
        name, _, timing = line.partition(":")
        assert TIMING.fullmatch(timing.strip()), line
        results[name.rstrip()] = timing.strip()
    return results


def run(xs: Xenstored, *args: str) -> dict[str, str]:
    return finish(start(xs, *args))


def leftovers(xs: Xenstored) -> bool:
    async def check() -> bool:
        client = XenStoreClient.for_unix_socket(xs.socket, 0, timeout=10)
        try:
            return await client.exists(WORKDIR)
        finally:
            await client.close()

    return asyncio.run(check())


def test_the_list_of_tests(xs: Xenstored) -> None:
    proc = subprocess.run(
        [str(TEST_XENSTORE), "-l"], capture_output=True, text=True, timeout=30, check=True
    )
    names = [line.partition(":")[0].rstrip() for line in proc.stdout.splitlines()]
    assert names == TESTS


@pytest.mark.parametrize("name", TESTS)
def test_each_test_alone(xs: Xenstored, name: str) -> None:
    assert list(run(xs, "-t", name)) == [name]
    assert not leftovers(xs)  # it cleans up after itself when all passed


def test_all_together(xs: Xenstored) -> None:
    assert list(run(xs)) == TESTS
    assert not leftovers(xs)


def test_twenty_iterations_each(xs: Xenstored) -> None:
    results = run(xs, "-i", "20")
    assert list(results) == TESTS
    assert all(timing.startswith("avg:") for timing in results.values()), results


def test_random_order(xs: Xenstored) -> None:
    """``-r 3``: tests picked at random (seeded by the stop time) for 3 seconds, 5
    iterations each time; it prints nothing per test unless one fails."""
    assert run(xs, "-r", "3", "-i", "5") == {}
    assert not leftovers(xs)


def test_two_instances_in_parallel(xs: Xenstored) -> None:
    """Two programs at once share ``xenstore-test`` (each below its own pid): their
    transactions conflict and retry, and both must still pass.  The random runs last
    3 seconds each, so those two surely overlap."""
    procs = [start(xs, "-i", "300") for _ in range(2)]
    for proc in procs:
        assert list(finish(proc)) == TESTS
    randoms = [start(xs, "-r", "3") for _ in range(2)]
    for proc in randoms:
        assert finish(proc) == {}
    assert not leftovers(xs)


def test_it_really_talks_to_our_server(xs: Xenstored) -> None:
    """A watch on its work directory sees its writes (so XENSTORED_PATH was honoured),
    and a run against a socket nobody serves fails: this harness can see failure."""

    async def watched_run() -> list[str]:
        client = XenStoreClient.for_unix_socket(xs.socket, 0, timeout=10)
        try:
            async with client.watch(WORKDIR) as w:
                assert await w.next(timeout=10) == WORKDIR  # the initial event
                await asyncio.to_thread(run, xs, "-t", "write 1")
                # Events precede the reply to any later request on the same connection.
                await client.read("/local/domain/0/domid")
                return w.pending()
        finally:
            await client.close()

    seen = asyncio.run(watched_run())
    assert any(p.startswith(WORKDIR + "/") and p.endswith("/a") for p in seen), seen
    env = {**env_for(xs), "XENSTORED_PATH": str(xs.root / "nobody-here")}
    proc = subprocess.run(
        [str(TEST_XENSTORE), "-t", "write 1"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0 and "could not connect" in proc.stderr
