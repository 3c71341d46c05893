"""``python -m aioxen.qrexec.demo`` runs as documented: dom0 and two VMs as processes, a
VM->VM call of a Python service through the policy, a denied call (126), world removed."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_runs() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("XEN_ROOT", "XENSTORED_PATH")}
    r = subprocess.run(
        [sys.executable, "-m", "aioxen.qrexec.demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout
    assert (
        "work -> vault demo.Greet+friend (protocol v4): \"hello friend, work; you said 'hi'\""
        in out
    )
    assert "denied by the policy, exit 126" in out
    assert re.search(r"200 calls, \d+ us per call", out), out
    assert out.rstrip().endswith("removed the world"), out
    assert "Traceback" not in r.stderr, r.stderr
