"""Describe the machine a benchmark ran on (stored with every JSON result)."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(loops: list[str]) -> dict[str, Any]:
    from aioxen import __version__

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "loops": loops,
        "aioxen": __version__,
    }
    try:
        import uvloop

        info["uvloop"] = getattr(uvloop, "__version__", None)
    except ImportError:  # pragma: no cover - optional dependency
        info["uvloop"] = None
    return info
