"""Running the ``aioxen`` command in a subprocess and checking the CLI standard's error form."""

from __future__ import annotations

import subprocess
import sys

AIOXEN = [sys.executable, "-m", "aioxen"]


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``aioxen ARGS`` with ``env``, stdin from /dev/null, output captured as text."""
    return subprocess.run(
        [*AIOXEN, *args], env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def standard_error(proc: subprocess.CompletedProcess[str], rc: int, prog: str, *words: str) -> None:
    """rc, ``prog: ...`` first on stderr, every word in that line, no traceback."""
    err = proc.stderr
    assert proc.returncode == rc, (proc.returncode, err)
    assert err.startswith(f"{prog}: "), err
    assert "Traceback" not in err, err
    first = err.splitlines()[0]
    for word in words:
        assert word in first, (word, first)
