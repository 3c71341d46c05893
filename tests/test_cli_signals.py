"""The commands' one stop-on-signal helper, :class:`aioxen.cli.StopSignals`.

Real signals sent to this process (the handlers run on the test's loop, asyncio or uvloop);
the commands' own SIGTERM/SIGINT behaviour is covered end to end by their tests (cat 143,
xenstored/bridge/console/netback/blkback orderly stop).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import pytest

from aioxen.cli import STOP_SIGNALS, StopSignals

ROOT = Path(__file__).resolve().parent.parent / "aioxen"


async def test_a_stop_signal_wakes_the_waiter_and_calls_back() -> None:
    seen: list[int] = []
    with StopSignals(on_signal=seen.append) as stop:
        assert not stop.is_set() and stop.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(30):
            await stop.wait()
        os.kill(os.getpid(), signal.SIGINT)
        async with asyncio.timeout(30):
            while len(seen) < 2:
                await asyncio.sleep(0.01)
    assert stop.is_set()
    assert stop.received == signal.SIGTERM  # the first one
    assert seen == [signal.SIGTERM, signal.SIGINT]


async def test_close_gives_the_signals_their_default_action_back() -> None:
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    stop = StopSignals()
    assert all(signal.getsignal(sig) != before[sig] for sig in STOP_SIGNALS)
    stop.close()
    stop.close()  # idempotent
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


async def test_only_the_given_signals() -> None:
    sigint = signal.getsignal(signal.SIGINT)  # asyncio.Runner's own, or the default
    with StopSignals((signal.SIGTERM,)):
        assert signal.getsignal(signal.SIGINT) == sigint
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL


def test_every_command_stops_through_the_one_helper() -> None:
    """No command installs signal handlers of its own (five copies were there before)."""
    own = [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if p.name != "cli.py" or p.parent != ROOT
        if "bench" not in p.relative_to(ROOT).parts  # benchmark peers are not commands
        if re.search(r"add_signal_handler|signal\.signal\(", p.read_text())
    ]
    assert own == []


def test_a_late_stop_signal_in_a_command_exits_143_not_by_the_signal() -> None:
    """A command whose loop handlers are already gone (it is finishing on its own) and then
    gets SIGTERM exits 143 instead of dying by the default action (-15): the race a
    supervisor hits when it stops a command that is ending anyway."""
    import subprocess
    import sys

    code = (
        "import asyncio, os, signal, time\n"
        "import aioxen.cli as cli\n"
        "cli._IN_MAIN = True\n"
        "async def f():\n"
        "    cli.StopSignals().close()\n"
        "asyncio.run(f())\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 143, proc
    assert b"Traceback" not in proc.stderr


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_stop_signal_after_the_loop_closed_with_stop_signals_left_open_exits_143(
    loop: str,
) -> None:
    """A command that leaves its StopSignals open (console, net and blk did) and is
    SIGTERMed after its loop closed -- the closing loop had reset SIGTERM to the default
    action -- exits 143, not by the signal (-15, seen in CI: test_any_stdio's console)."""
    import os
    import subprocess
    import sys

    code = (
        "import argparse, os, signal, time\n"
        "import aioxen.cli as cli\n"
        "cli._IN_MAIN = True\n"
        "async def command(args):\n"
        "    cli.StopSignals()  # never closed\n"
        "    return 0\n"
        "cli.run_async(command, argparse.Namespace())\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
    )
    env = {**os.environ, "AIOXEN_LOOP": loop}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=env)
    assert proc.returncode == 143, proc
