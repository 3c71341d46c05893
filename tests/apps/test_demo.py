"""``python -m aioxen.demo`` (what ``make demo`` runs): works from a bare environment,
prints its numbers, cleans up, exits 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from apps_harness import clean_env

pytestmark = pytest.mark.crossprocess

NUMBER = r"[\d.]+"


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_demo_runs_and_cleans_up(loop: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "aioxen.demo", "--loop", loop],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr == ""
    text = out.stdout
    assert f"{loop} event loop" in text
    root = re.search(r"XEN_ROOT=(\S+)", text)
    assert root is not None
    assert re.search(rf"^removed {re.escape(root.group(1))}$", text, re.M)
    assert not os.path.exists(root.group(1))
    assert re.search(r"vchan\.connect\(0, 'echo'\) connected in [\d.]+ ms", text)
    assert re.search(
        rf"latency: +2000 round trips of 64 bytes: mean {NUMBER} .s, median {NUMBER} .s, "
        rf"p99 {NUMBER} .s",
        text,
    )
    assert re.search(
        rf"throughput: 64\.0 MiB each way in {NUMBER} s = {NUMBER} MiB/s each way, full duplex "
        r"\(SHA-256 verified\)",
        text,
    )
    assert re.search(r"mapped refs (\d+),(\d+),(\d+),(\d+) \(reverse order\)", text)
    assert re.search(rf"500 answered, 0 notifications lost, round trip {NUMBER} .s mean", text)
    assert len(text.splitlines()) <= 12
