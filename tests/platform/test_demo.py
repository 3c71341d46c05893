"""``python -m aioxen.demo`` (what ``make demo`` runs) works and cleans up."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.crossprocess


def test_demo_runs_and_cleans_up() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("XEN_ROOT", "AIOXEN_DOMID")}
    out = subprocess.run(
        [sys.executable, "-m", "aioxen.demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    root = re.search(r"XEN_ROOT=(\S+)", out.stdout)
    assert root is not None
    assert not os.path.exists(root.group(1))
    assert "mapped refs 11,10,9,8 in reverse order" in out.stdout
    assert "(0 lost)" in out.stdout
    assert "ConnectionResetError, as expected" in out.stdout
    assert re.search(r"2000 round trips: [\d,]+ bytes", out.stdout)
