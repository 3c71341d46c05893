"""A second, real Unix user for tests of what another local user can do.

CI runs as root, so a test can create a uniquely named system user (``useradd``), run real
processes as it (``subprocess`` with ``user=``/``group=``), and remove it afterwards
(``userdel``).  Without root there is no second user to be: the tests say so and skip
(which never happens in CI).
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("refused", e.errno)
else:
    print("connected")
"""


@dataclass(frozen=True)
class OtherUser:
    name: str
    uid: int
    gid: int

    def run(
        self, argv: Sequence[str], *, timeout: float = 60, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as this user (no supplementary groups) and wait for it."""
        proc = subprocess.run(
            list(argv),
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            **kw,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} as {self.name} failed: {proc.stderr}")
        return proc

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start ``argv`` as this user."""
        return subprocess.Popen(
            list(argv), user=self.uid, group=self.gid, extra_groups=[], cwd="/", text=True, **kw
        )

    def connects(self, path: str, timeout: float = 60) -> str:
        """Try, as this user, to connect a stream socket to the Unix socket ``path``:
        ``"connected"`` or ``"refused ERRNO"``."""
        return self.python(_CONNECT, path, timeout=timeout).stdout.strip()

    @functools.cached_property
    def python_exe(self) -> str:
        """A Python this user may execute (the test's own may live under ``/root``)."""
        for exe in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
            try:
                if self.run([exe, "-I", "-c", "pass"], check=False).returncode == 0:
                    return exe
            except OSError:
                continue
        raise AssertionError(
            f"no Python executable for user {self.name}: install Debian's python3 (CI does)"
        )

    def python(self, code: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``python -c code args...`` (stdlib only) as this user."""
        return self.run([self.python_exe, "-I", "-c", code, *args], **kw)


def can_create_users() -> bool:
    return os.geteuid() == 0 and shutil.which("useradd") is not None


def require_user_creation() -> None:
    """Skip a developer's non-root run, but fail in CI (``$CI`` set, run as root there):
    the hostile-user tests must never be skipped where the suite is judged."""
    import pytest

    if can_create_users():
        return
    if os.environ.get("CI"):
        pytest.fail("CI must run as root with useradd: the second-user tests cannot run")
    pytest.skip("needs root and useradd to create a second Unix user")


@contextmanager
def other_user() -> Iterator[OtherUser]:
    """A fresh system user (and its group) that exists inside the ``with``."""
    import grp
    import pwd

    name = f"aioxt{secrets.token_hex(5)}"
    argv = ["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/bin/false"]
    for attempt in range(20):  # /etc/passwd may be locked by a concurrent useradd/userdel
        proc = subprocess.run([*argv, name], capture_output=True, text=True)
        if proc.returncode == 0:
            break
        if "lock" not in proc.stderr or attempt == 19:
            raise AssertionError(f"useradd {name} failed: {proc.stderr}")
        time.sleep(0.5)
    try:
        pw = pwd.getpwnam(name)
        yield OtherUser(name, pw.pw_uid, pw.pw_gid)
    finally:
        for _ in range(20):
            if subprocess.run(["userdel", name], capture_output=True).returncode in (0, 6):
                break  # 6: no such user
            time.sleep(0.5)
        try:
            grp.getgrnam(name)
        except KeyError:
            pass
        else:
            subprocess.run(["groupdel", name], check=False, capture_output=True)


__all__ = ["OtherUser", "can_create_users", "other_user"]
