"""Helpers for the application tests: run the real ``aioxen`` command in subprocesses."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

AIOXEN = [sys.executable, "-m", "aioxen"]
AIOXEN_SHELL = f"{sys.executable} -m aioxen"
"""How a shell script spells the command (the venv's interpreter, whatever PATH says)."""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that selects an aioxen world, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XEN_ROOT", "XENSTORED_PATH", "AIOXEN_PLATFORM", "AIOXEN_DOMID")
    }
    env.update(extra)
    return env


def random_file(path: Path, size: int, seed: int) -> str:
    """Write ``size`` pseudo-random bytes; return their SHA-256."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(block + counter.to_bytes(8, "little")).digest() * 64
        counter += 1
    data = bytes(out[:size])
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_exports(text: str) -> dict[str, str]:
    """``NAME=value; export NAME;`` lines -> ``{NAME: value}`` (values are shell-quoted
    only when they need it; the test roots never do)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        assignment = line.split(";", 1)[0]
        key, sep, value = assignment.partition("=")
        if sep:
            out[key] = value
    return out


def run(
    args: list[str], *, env: dict[str, str], timeout: float = 60, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, env=env, timeout=timeout, check=False, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]
