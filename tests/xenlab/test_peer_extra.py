"""``XENLAB_PEER_EXTRA`` (:func:`xenlab.lab.build_extra_archive`), on the host, no boot:
the named files and directories land in the peer domU's initramfs at their own paths,
with the shared libraries their ELF files load; unset, the initramfs is what it was."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

TREE = Path(__file__).resolve().parents[2]


def _lab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("xenlab_lab_extra", TREE / "xenlab" / "lab.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["xenlab_lab_extra"] = module
    spec.loader.exec_module(module)
    return module


def cpio_entries(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, contents) of a newc archive."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", pos
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_extra_files_directories_and_their_libraries(tmp_path: Path) -> None:
    lab = _lab()
    tool = tmp_path / "bin" / "mytool"
    tool.parent.mkdir()
    shutil.copy(shutil.which("true") or "/bin/true", tool)
    (tmp_path / "bin" / "sub").mkdir()
    script = tmp_path / "bin" / "sub" / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o750)
    single = tmp_path / "single.txt"
    single.write_text("one file\n")
    entries = cpio_entries(lab.build_extra_archive([tmp_path / "bin", single]))
    rel = str(tmp_path).lstrip("/")
    assert entries[f"{rel}/bin/sub/run.sh"] == (0o100750, script.read_bytes())
    assert entries[f"{rel}/single.txt"][1] == b"one file\n"
    assert entries[f"{rel}/bin/mytool"][0] == 0o100755
    assert entries[f"{rel}/bin/mytool"][1][:4] == b"\x7fELF"
    libs = [str(p).lstrip("/") for p in lab._ldd(tool)]
    assert libs and all(lib in entries for lib in libs), (libs, sorted(entries))
    libc = next(lib for lib in libs if lib.endswith("/libc.so.6"))
    gcc_s = libc.replace("libc.so.6", "libgcc_s.so.1")  # loaded by glibc, unseen by ldd
    assert (gcc_s in entries) == Path("/", gcc_s).exists()


def test_a_missing_extra_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        _lab().build_extra_archive([tmp_path / "nothing-here"])


def test_unset_adds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """build_peer_initrd with and without the variable: the same bytes, then more."""
    lab = _lab()
    monkeypatch.setattr(lab, "build_python_runtime", lambda python, cache: tmp_path / "rt")
    (tmp_path / "rt").write_bytes(b"RUNTIME")
    base = tmp_path / "peer-initrd-base.gz"
    base.write_bytes(gzip.compress(b"BASE"))
    image = lab.Image(tmp_path / "xen", tmp_path / "k", tmp_path / "initrd.gz", "key")
    monkeypatch.setattr(lab, "build_tree_archive", lambda tag: b"TREE")
    monkeypatch.delenv("XENLAB_PEER_EXTRA", raising=False)
    plain = lab.build_peer_initrd(image, sys.executable, tmp_path, tmp_path).initrd.read_bytes()
    assert plain == b"BASERUNTIMETREE"
    extra = tmp_path / "x.txt"
    extra.write_text("x")
    monkeypatch.setenv("XENLAB_PEER_EXTRA", f"{extra}:")
    more = lab.build_peer_initrd(image, sys.executable, tmp_path, tmp_path).initrd.read_bytes()
    assert more.startswith(plain) and str(extra).lstrip("/").encode() in more
