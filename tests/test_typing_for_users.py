"""Typing for users: a program outside the repository, checked with the venv's
``mypy --strict``, sees aioxen's types (through the editable install ``make`` sets up), and
the native module's stub (``aioxen/_native.pyi``) matches the C declarations and ships in
the wheel with ``py.typed``."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from aioxen import _native_build, native

REPO = Path(__file__).resolve().parents[1]
STUB = REPO / "aioxen" / "_native.pyi"
MYPY = Path(sys.executable).parent / "mypy"

GOOD = """\
import asyncio

import aioxen
from aioxen import vchan
from aioxen.native import lib


async def main() -> None:
    plat = aioxen.platform("inheap")
    domid: int = plat.domid
    async with vchan.connect(domid, "echo", platform=plat) as (reader, writer):
        writer.write(b"hello")
        await writer.drain()
        data: bytes = await reader.read(100)
        print(data)
    print(lib.ax_load_u8(bytearray(1), 0) + 1)


asyncio.run(main())
"""

# Each variant carries one deliberate type error that mypy can only see if aioxen's
# annotations (not ``Any`` from a missing import) reach it.
BAD = {
    "platform_domid": GOOD.replace("domid: int = plat.domid", "domid: str = plat.domid"),
    "connect_port": GOOD.replace('vchan.connect(domid, "echo"', "vchan.connect(domid, 7"),
    "native_stub": GOOD.replace("lib.ax_load_u8(bytearray(1), 0)", "lib.ax_load_u8(bytearray(1))"),
}


def _user_mypy(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess[str]:
    """Run the venv's ``mypy --strict`` on ``source`` from a directory outside the repo,
    with nothing in the environment pointing at the source tree."""
    assert not tmp_path.resolve().is_relative_to(REPO), tmp_path
    work = tmp_path / "user-project"
    work.mkdir()
    (work / f"{name}.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    return subprocess.run(
        [str(MYPY), "--strict", "--no-incremental", f"{name}.py"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_user_program_outside_repo_type_checks(tmp_path: Path) -> None:
    r = _user_mypy(tmp_path, "good", GOOD)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success: no issues found" in r.stdout


@pytest.mark.parametrize("variant", sorted(BAD))
def test_user_program_type_error_is_reported(tmp_path: Path, variant: str) -> None:
    r = _user_mypy(tmp_path, variant, BAD[variant])
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "import-not-found" not in out and "import-untyped" not in out, out
    expected = {
        "platform_domid": 'variable has type "str"',
        "connect_port": 'Argument 2 to "connect" has incompatible type "int"',
        "native_stub": 'Too few arguments for "ax_load_u8"',
    }[variant]
    assert expected in out, out


def _cdef_functions() -> dict[str, int]:
    """``name -> parameter count`` of every function in the cffi CDEF."""
    text = re.sub(r"/\*.*?\*/", "", _native_build.CDEF, flags=re.S)
    found: dict[str, int] = {}
    for m in re.finditer(r"\b(ax_\w+)\s*\(([^)]*)\)\s*;", text):
        params = [p for p in m.group(2).split(",") if p.strip() not in ("", "void")]
        found[m.group(1)] = len(params)
    return found


def _stub_functions() -> dict[str, int]:
    """``name -> parameter count`` (without ``self``) of the stub's ``_Lib`` methods."""
    tree = ast.parse(STUB.read_text())
    lib_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Lib")
    return {
        f.name: len(f.args.posonlyargs) + len(f.args.args) - 1
        for f in lib_cls.body
        if isinstance(f, ast.FunctionDef)
    }


def test_native_stub_matches_the_c_declarations() -> None:
    cdef = _cdef_functions()
    assert len(cdef) > 30, cdef
    assert _stub_functions() == cdef
    # and the compiled module really has each of them
    missing = [name for name in cdef if not hasattr(native.lib, name)]
    assert missing == []


def test_no_mypy_override_hides_the_native_module() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert '"aioxen._native"' not in text


def test_wheel_ships_py_typed_and_the_stub(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(
        REPO / "aioxen",
        src / "aioxen",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_native.c", "*.o"),
    )
    out = tmp_path / "dist"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob("aioxen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"aioxen/py.typed", "aioxen/_native.pyi", "aioxen/_native_impl.c"} <= names
    assert any(n.startswith("aioxen/_native") and n.endswith(".so") for n in names), names
