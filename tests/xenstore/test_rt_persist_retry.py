"""Red-team pass: ``aioxen xenstored --persist`` when a save fails for a while.

Saving the state needs a new descriptor and disk space, and both can run out because of
others: another user filling a shared ``/tmp``, domains holding connections up to the
descriptor limit.  A failed save used to end the periodic sync for good, silently: every
write after that was lost if the daemon was then killed.  Now the failure is logged once and
the save retried each interval.  The test takes the descriptor limit of the running daemon
away (``prlimit``) and gives it back.
"""

from __future__ import annotations

import asyncio
import json
import queue
import resource
import subprocess
import sys
import threading
from pathlib import Path

from aioxen.xenstore import XenStoreClient

GUARD = 60  # hang guard only


def _lines(stream: object, out: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        out.put(line)


async def _wait_line(lines: queue.Queue[str], text: str) -> str:
    async with asyncio.timeout(GUARD):
        while True:
            try:
                line = lines.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.05)
                continue
            if text in line:
                return line


async def _wait_saved(state: Path, key: str, value: str) -> None:
    async with asyncio.timeout(GUARD):
        while True:
            try:
                nodes = json.loads(state.read_bytes())["nodes"]
            except (OSError, ValueError):
                nodes = []
            if [key, value] in [n[:2] for n in nodes]:
                return
            await asyncio.sleep(0.05)


async def test_a_failed_save_is_retried(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = subprocess.Popen(
        [sys.executable, "-m", "aioxen", "xenstored", "--root", str(root), "--persist"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    errors: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, errors), daemon=True).start()
    state = root / "xenstored" / "store.json"
    try:
        proc.stdout.readline()
        path = proc.stdout.readline().split("=", 1)[1].split(";", 1)[0]
        xs = XenStoreClient.for_unix_socket(path, 0, timeout=GUARD)
        try:
            await xs.write("/rt/before", "1")
            await _wait_saved(state, "/rt/before", "1")
            limits = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (3, limits[1]))  # no new fd
            try:
                await xs.write("/rt/during", "2")  # served on an open connection
                line = await _wait_line(errors, "cannot save the state")
                assert str(state) in line and "Too many open files" in line, line
            finally:
                resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, limits)
            await xs.write("/rt/after", "3")
            # old code: the sync task had died; nothing more was saved before a clean stop
            await _wait_saved(state, "/rt/after", "3")
            await _wait_line(errors, "state saved to")
            assert await xs.read("/rt/during") == b"2"
        finally:
            await xs.close()
        proc.terminate()
        assert proc.wait(timeout=GUARD) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
