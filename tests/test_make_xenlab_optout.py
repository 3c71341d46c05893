"""``make test XENLAB=0`` leaves the Xen lab out (no lab packages, tests/xenlab deselected,
a printed line saying so); plain ``make test`` -- what CI runs -- keeps it.  Checked with
``make -n`` (prints the recipe, runs nothing) so the test costs no install and no boot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAB_PACKAGES = ("qemu-system-x86", "xen-hypervisor-4.17-amd64", "linux-image-amd64")


def _dry_run(*args: str) -> list[str]:
    make = shutil.which("make")
    assert make is not None, "make is needed to run the test-suite's Makefile"
    env = {k: v for k, v in os.environ.items() if k not in ("XENLAB", "MAKEFLAGS", "MFLAGS")}
    r = subprocess.run(
        [make, "-n", "--no-print-directory", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines()


def _line(lines: list[str], pattern: str) -> str:
    (line,) = [ln for ln in lines if re.search(pattern, ln)]
    return line


def test_default_make_test_installs_and_runs_the_lab() -> None:
    lines = _dry_run("test")
    debs = _line(lines, r"ensure-debs")
    assert all(pkg in debs.split() for pkg in LAB_PACKAGES), debs
    pytest_line = _line(lines, r"-m pytest")
    assert "xenlab" not in pytest_line, pytest_line
    assert not any("SKIPPED" in ln for ln in lines), lines


def test_xenlab_0_opts_out_and_says_so() -> None:
    lines = _dry_run("test", "XENLAB=0")
    debs = _line(lines, r"ensure-debs")
    assert not any(pkg in debs.split() for pkg in LAB_PACKAGES), debs
    assert "xenstore-utils" in debs.split()
    pytest_line = _line(lines, r"-m pytest")
    assert "--ignore=tests/xenlab" in pytest_line, pytest_line
    # the note is printed before the run and again after it (the last thing on screen)
    assert pytest_line.count("Xen lab (tests/xenlab) was SKIPPED") == 1, pytest_line
    assert any(ln.startswith("echo") and "SKIPPED" in ln for ln in lines), lines


def test_make_xenlab_ignores_the_opt_out() -> None:
    lines = _dry_run("xenlab", "XENLAB=0")
    debs = _line(lines, r"ensure-debs")
    assert all(pkg in debs.split() for pkg in LAB_PACKAGES), debs
    assert "tests/xenlab" in _line(lines, r"-m pytest")


def test_ci_runs_plain_make_test() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test \|\|", ci, flags=re.M), ci
    assert "XENLAB" not in ci
