"""dom0-side helpers shared by the cross-domain test modules (``test_crossdomain*.py``).

The ``peer`` fixture (one peer domU per module) is in ``conftest.py``; these are the small
functions each module used to carry a copy of.
"""

from __future__ import annotations

import asyncio
import hashlib
import re


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the running loop's kind, for the domU's half of a test."""
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def field(out: str, key: str) -> str:
    """The value of ``KEY=VALUE`` in a domU action's output (asserts that it is there)."""
    m = re.search(rf"\b{key}=(\S+)", out)
    assert m, f"no {key}= in the domU's output:\n{out}"
    return m.group(1)
