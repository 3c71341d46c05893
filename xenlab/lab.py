#!/usr/bin/env python3
"""The Xen lab: real Xen under QEMU (TCG), running a pytest selection inside dom0.

Theory of operation
-------------------
*Image* (:func:`build_image`).  Three files, cached under ``lab-cache/image-<key>/`` where
``key`` hashes the versions of the Debian packages they come from plus the lab's own build
inputs (``xenlab/init`` and this file's module list), so a repeated run boots at once:

* ``xen.elf`` — ``/boot/xen-4.17-amd64.gz`` unzipped (QEMU's multiboot loader wants the ELF);
* ``vmlinuz`` — the Debian kernel ``linux-image-amd64`` depends on (its ``XEN_PV`` dom0);
* ``initrd.gz`` — a newc cpio written here (no root, no cpio tool needed): busybox, the
  virtio/9p and Xen modules of that kernel with a dependency-ordered load list, and
  ``xenlab/init``.  Nothing else: the Xen tools, Python and the working tree all come from
  the *host's* root, shared read-only with 9p, so dom0 runs exactly the host's xenstored,
  ``vchan-socket-proxy`` and ``.venv`` — the same Debian packages the image key names.

*Run* (:func:`boot`).  One boot per run: ``results/`` (a fresh directory, shared writable
with 9p) gets ``guest.env`` naming the tree, its Python, the pytest selection and
``xenlab/guest-run.sh``.  ``/init`` mounts everything, chroots into the host root and runs
that script, which starts xenstored + ``xen-init-dom0`` and runs pytest with
``--junitxml`` into ``results/``.  The guest powers itself off (``-no-reboot`` makes QEMU
exit); a watchdog in ``/init`` and a host-side timeout make sure nothing hangs.

TCG with ``-cpu qemu64`` is deliberate: ``-cpu max`` crashes the PV dom0 and KVM trips over
Xen's CET instructions (see ``docs/xenlab.md``).

Command line: ``python xenlab/lab.py [--build-only] [PYTEST_ARGS...]`` (default selection
``tests/xenlab/guest``); prints the guest's pytest summary and exits with its status.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

TREE = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XENLAB_CACHE", TREE / "lab-cache"))
XEN_GZ = Path("/boot/xen-4.17-amd64.gz")
XEN_BIN = Path("/usr/lib/xen-4.17/bin")
# The hypothesis plugin alone costs ~10 s of start-up under TCG; guest tests do not use it.
# A hung test is cut off after 200 s (the domU module's set-up, the slowest, takes 40-110 s),
# so one hang cannot use up the guest's whole pytest time limit.
GUEST_SELECTION = ["-p", "no:hypothesispytest", "--timeout", "200", "tests/xenlab/guest"]
# Linux's own netfront/blkfront in a PV domU against aioxen's backends (test_domu.py) run
# in the same boot; XENLAB_DOMU=0 leaves them out (a quicker run while working on dom0 tests).
DOMU_TESTS = "tests/xenlab/guest/test_domu.py"
if os.environ.get("XENLAB_DOMU") == "0":
    GUEST_SELECTION.append(f"--ignore={DOMU_TESTS}")
KEEP_RUNS = 10  # result directories kept under lab-cache/runs
KEEP_IMAGES = 3  # boot images kept under lab-cache (the most recently used)

# Kernel modules for dom0, in the order named; dependencies are inserted before each.
MODULES = [
    # 9p over virtio for the host shares
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    # Xen user-space devices (xenfs needs privcmd's symbols)
    "xen-privcmd",
    "xen-evtchn",
    "xen-gntdev",
    "xen-gntalloc",
    "xenfs",
    # TAP devices for ``aioxen netback --tap``
    "tun",
]
# Kernel modules for the PV domU: Linux's own frontends, and ext4 (which mounts ext2).
# dom0 loads neither these nor xen-netback/xen-blkback: aioxen's backends serve the domU.
# crc32c_generic: ext4 asks the crypto API for "crc32c" by name at mount time.
DOMU_MODULES = ["xen-blkfront", "xen-netfront", "ext4", "crc32c_generic"]
# Kernel modules for the *peer* domU, which runs aioxen itself (test_crossdomain.py): the
# user-space Xen devices aioxen's ``xen`` platform opens (``/dev/xen/xenbus`` is built in).
PEER_MODULES = ["xen-evtchn", "xen-gntdev", "xen-gntalloc"]
IMAGE_FORMAT = 4  # bump when the image layout changes
# Seconds the guest may run before powering itself off (its pytest gets 60 s less; the host
# kills QEMU 60 s after it, within test_lab.py's 2400 s per-test timeout).  The tier takes
# ~10 min alone with the cross-domain files, longer while the host's tests share the CPUs
# (the test session boots the lab in the background); this is a hang guard, not a budget.
DEFAULT_WATCHDOG = 1800
INIT_DEADLINE = 120.0  # seconds for dom0 to reach /init (~5 s normally) before a reboot
INIT_MARKER = b"xenlab: init up"
INIT = TREE / "xenlab" / "init"  # dom0's /init
DOMU_INIT = TREE / "xenlab" / "domu-init"  # the PV domU's /init


def lab_debs() -> list[str]:
    """The Debian packages the lab needs: ``LAB_DEBS`` of the Makefile (one source)."""
    text = (TREE / "Makefile").read_text()
    m = re.search(r"^LAB_DEBS\s*:?=\s*(.+)$", text, re.MULTILINE)
    if not m:
        raise RuntimeError("Makefile has no LAB_DEBS line")
    return m.group(1).split()


def ensure_debs() -> None:
    """Install missing lab packages (``scripts/ensure-debs``: apt-get as root or sudo)."""
    subprocess.run([str(TREE / "scripts" / "ensure-debs"), *lab_debs()], check=True)


def _dpkg_version(pkg: str) -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def kernel_version() -> str:
    """The kernel release ``linux-image-amd64`` depends on, e.g. ``6.1.0-56-amd64``."""
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Depends}", "linux-image-amd64"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"linux-image-(\d[^\s,(]*)", out)
    if not m:
        raise RuntimeError(f"cannot tell the kernel from linux-image-amd64's Depends: {out!r}")
    return m.group(1)


# --- initramfs --------------------------------------------------------------------------


class Cpio:
    """A minimal writer of the ``newc`` cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
        mtime: int = 0,
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, 1, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0
        ]  # fmt: skip
        self._ino += 1
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._parts.append(header + encoded + b"\0" * (-(110 + len(encoded)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        self._entry(name, 0o100000 | mode, data, mtime=mtime)

    def tree_file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        """``file``, after the directories leading to it (the kernel creates no parents)."""
        parts = name.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self._dirs.add(d)
                self.dir(d)
        self.file(name, data, mode, mtime)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _module_order(kver: str, names: list[str]) -> list[Path]:
    """Module files for ``names`` with every dependency before its user (modules.dep)."""
    moddir = Path("/lib/modules") / kver
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in deps[mod]:
            visit(dep)
        order.append(mod)

    for name in names:
        key = name.replace("-", "_")
        if key not in by_name:
            raise RuntimeError(f"kernel {kver} has no module {name}")
        visit(by_name[key])
    return [moddir / m for m in order]


def unpack_bzimage(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside an x86 bzImage (xz or gzip payload), or None if the payload
    uses another compression.  The boot protocol header names the payload: ``setup_sects``
    at 0x1f1, ``payload_offset``/``payload_length`` at 0x248 (from the protected-mode
    code, which starts after the setup sectors)."""
    if bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        return None
    return elf if elf.startswith(b"\x7fELF") else None


def _build_initrd(kver: str, modules: list[str], init: Path) -> bytes:
    """busybox, ``modules`` (dependencies first, listed in ``lib/modules/load-order``) and
    ``init`` as ``/init``: the whole initramfs of dom0 or of the domU."""
    c = Cpio()
    for d in ["bin", "dev", "proc", "sys", "tmp", "run", "host", "results", "lib", "lib/modules"]:
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    load = []
    for path in _module_order(kver, modules):
        if path.suffix != ".ko":
            raise RuntimeError(f"{path}: compressed modules are not supported by busybox insmod")
        name = path.stem
        c.file(f"lib/modules/{name}.ko", path.read_bytes())
        load.append(name)
    c.file("lib/modules/load-order", ("\n".join(load) + "\n").encode())
    c.file("init", init.read_bytes(), 0o755)
    return gzip.compress(c.finish(), compresslevel=6)


# --- the peer domU: the host's Python and the project in an initramfs --------------------

# Stdlib parts the peer never imports (and the biggest): left out of its initramfs.
STDLIB_SKIP = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "tkinter", "turtledemo",
    "lib2to3", "ensurepip", "pydoc_data", "distutils", "__phello__", "sqlite3", "curses",
}  # fmt: skip
# Files of those trees left out too: extension modules that drag in big libraries or
# serve tests of CPython itself (_tkinter alone brings 6 MB of Tcl/Tk/X11), and the
# pygments lexers pytest does not load (8 MB; it imports only these four).
SKIP_FILES = re.compile(
    r"/lib-dynload/(_tkinter|_sqlite3|_curses|_curses_panel|_test\w*|_ctypes_test|xxlimited\w*"
    r"|nis|readline|audioop|_dbm|_gdbm)\."
    r"|/pygments/lexers/(__pycache__/)?(?!(__init__|_mapping|diff|python)\.)\w+\."
)
# Of the venv: what aioxen needs at run time (the native helper's cffi backend, uvloop),
# and pytest with the plugins the suite uses (loaded with -p: no entry-point scan).
# Each name is a package directory, a ``.py`` module or an extension module.
SITE_KEEP = (
    "uvloop", "_cffi_backend", "_pytest", "pytest", "pytest_asyncio",
    "pytest_timeout", "pluggy", "iniconfig", "packaging", "typing_extensions", "pygments",
    "py",
)  # fmt: skip
# Files of the tree the peer domU needs besides aioxen: its half of the cross-domain tests
# (peer.py) and the pytest session it runs (tests/xenlab/peer/ and what those import).
PEER_TREE_FILES = (
    "pyproject.toml", "tests/conftest.py", "tests/xenlab/conftest.py",
    "tests/xenlab/guest/peer.py", "tests/xenlab/guest/peer_*.py", "tests/xenlab/peer/*.py",
    "tests/platform/platform_harness.py", "tests/platform/test_platform_conformance.py",
)  # fmt: skip
_PYINFO = (
    "import json, os, sys, sysconfig;"
    "print(json.dumps({'exe': os.path.realpath(sys.executable),"
    " 'stdlib': sysconfig.get_path('stdlib'), 'platstdlib': sysconfig.get_path('platstdlib'),"
    " 'purelib': sysconfig.get_path('purelib'), 'tag': sys.implementation.cache_tag,"
    " 'version': sys.version}))"
)


def python_info(python: str) -> dict[str, str]:
    """Where ``python`` (the venv's) keeps its interpreter, stdlib and site-packages."""
    import json

    out = subprocess.run([python, "-c", _PYINFO], capture_output=True, text=True, check=True)
    info: dict[str, str] = json.loads(out.stdout)
    return info


def _ldd(path: Path) -> list[Path]:
    """The shared libraries (and the ELF interpreter) ``path`` loads, as ldd names them."""
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    libs = []
    for line in out.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _stripped(path: Path) -> bytes:
    """``path``'s bytes, without debug symbols when ``strip`` is there (libpython: 23 -> 4 MB)."""
    strip = shutil.which("strip")
    if strip and _is_elf(path):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / path.name
            r = subprocess.run([strip, "--strip-debug", "-o", str(out), str(path)],
                               capture_output=True)  # fmt: skip
            if r.returncode == 0:
                return out.read_bytes()
    return path.read_bytes()


def _add_python_tree(c: Cpio, root: Path, tag: str, skip: set[str], elves: list[Path]) -> None:
    """``*.py``, their ``__pycache__/*.<tag>.pyc`` and extension modules under ``root``, at
    their own paths, mtimes kept (so the cached bytecode stays valid)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for f in sorted(filenames):
            p = Path(dirpath) / f
            keep_pyc = p.parent.name == "__pycache__" and f.endswith(f".{tag}.pyc")
            if not (f.endswith(".py") or keep_pyc or f.endswith(".so")):
                continue
            if not p.is_file() or SKIP_FILES.search(str(p)):
                continue
            data = _stripped(p) if f.endswith(".so") else p.read_bytes()
            if f.endswith(".so"):
                elves.append(p)
            c.tree_file(str(p).lstrip("/"), data, 0o755 if f.endswith(".so") else 0o644,
                        int(p.stat().st_mtime))  # fmt: skip


def python_runtime_key(info: dict[str, str]) -> str:
    inputs = (IMAGE_FORMAT, sorted(info.items()), STDLIB_SKIP, SITE_KEEP, SKIP_FILES.pattern)
    h = hashlib.sha256(repr(inputs).encode())
    for name in SITE_KEEP:
        for p in Path(info["purelib"]).glob(f"{name}*"):
            h.update(f"{p.name}:{p.stat().st_mtime_ns}\n".encode())
    h.update(str(Path(info["exe"]).stat().st_mtime_ns).encode())
    return h.hexdigest()[:16]


def build_python_runtime(python: str, cache: Path = CACHE) -> Path:
    """A cpio archive of the interpreter, its stdlib (less :data:`STDLIB_SKIP`), uvloop and
    cffi's backend from the venv, and every library they load -- all at the host's own
    paths, so the interpreter finds its prefix as on the host.  Cached by
    :func:`python_runtime_key`."""
    info = python_info(python)
    out = cache / f"pyrt-{python_runtime_key(info)}.cpio"
    if out.exists():
        os.utime(out)
        return out
    c = Cpio()
    elves: list[Path] = [Path(info["exe"])]
    c.tree_file(info["exe"].lstrip("/"), _stripped(Path(info["exe"])), 0o755)
    roots = {Path(info["stdlib"]), Path(info["platstdlib"])}
    for root in sorted(roots):
        _add_python_tree(c, root, info["tag"], STDLIB_SKIP, elves)
    site = Path(info["purelib"])
    for name in SITE_KEEP:
        for p in sorted(site.glob(f"{name}*")):
            if p.name.startswith(f"{name}-") and p.name.endswith(".dist-info"):
                for meta in sorted(m for m in p.iterdir() if m.is_file()):  # importlib.metadata
                    c.tree_file(str(meta).lstrip("/"), meta.read_bytes(), 0o644)
                continue
            if p.name != name and p.name != f"{name}.py" and not p.name.startswith(f"{name}."):
                continue
            if p.is_dir():
                _add_python_tree(c, p, info["tag"], set(), elves)
            elif p.suffix == ".py":
                c.tree_file(str(p).lstrip("/"), p.read_bytes(), 0o644, int(p.stat().st_mtime))
                pyc = p.parent / "__pycache__" / f"{p.stem}.{info['tag']}.pyc"
                if pyc.exists():
                    c.tree_file(str(pyc).lstrip("/"), pyc.read_bytes(), 0o644)
            elif p.suffix == ".so":
                elves.append(p)
                c.tree_file(str(p).lstrip("/"), _stripped(p), 0o755, int(p.stat().st_mtime))
    seen: set[Path] = set()
    for elf in elves:
        for lib in _ldd(elf):
            if lib in seen or not lib.exists():
                continue
            seen.add(lib)
            c.tree_file(str(lib).lstrip("/"), _stripped(lib.resolve()), 0o755)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    tmp.write_bytes(c.finish())
    tmp.rename(out)
    for old in sorted(cache.glob("pyrt-*.cpio"), key=lambda p: p.stat().st_mtime)[:-2]:
        old.unlink(missing_ok=True)
    return out


def build_tree_archive(tag: str) -> bytes:
    """A cpio archive of the working tree's ``aioxen`` package (with the compiled native
    helper) and :data:`PEER_TREE_FILES`, at the tree's own path; bytecode compiled here
    (unchecked-hash ``.pyc``: nothing to compile in the peer, whose CPU is slow TCG)."""
    import py_compile

    c = Cpio()
    files = sorted(p for p in (TREE / "aioxen").rglob("*") if p.suffix in (".py", ".so"))
    for pattern in PEER_TREE_FILES:
        files += sorted(TREE.glob(pattern))
    with tempfile.TemporaryDirectory() as tmp:
        for i, p in enumerate(files):
            if "__pycache__" in p.parts or not p.is_file():
                continue
            c.tree_file(str(p).lstrip("/"), p.read_bytes(), 0o644, int(p.stat().st_mtime))
            if p.suffix == ".py":
                pyc = Path(tmp) / f"{i}.pyc"
                py_compile.compile(
                    str(p), cfile=str(pyc), dfile=str(p), doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
                )  # fmt: skip
                cached = p.parent / "__pycache__" / f"{p.stem}.{tag}.pyc"
                c.tree_file(str(cached).lstrip("/"), pyc.read_bytes(), 0o644)
    return c.finish()


def build_extra_archive(paths: list[Path]) -> bytes:
    """A cpio archive of ``$XENLAB_PEER_EXTRA``: host files and directories (recursively)
    at their own paths in the peer domU, with every shared library ``ldd`` names for the
    ELF files among them (e.g. programs built outside the tree, to run in the domU)."""
    c = Cpio()
    elves: list[Path] = []
    files: list[Path] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"XENLAB_PEER_EXTRA names {path}, which does not exist")
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    seen: set[Path] = set()
    for p in files:
        if _is_elf(p):
            elves.append(p)
        seen.add(p)
        c.tree_file(str(p).lstrip("/"), _stripped(p.resolve()), p.stat().st_mode & 0o7777)
    libs = {lib for elf in elves for lib in _ldd(elf)}
    # glibc dlopens libgcc_s for pthread_cancel (libxenstore's xs_close), unseen by ldd
    libs |= {lib.with_name("libgcc_s.so.1") for lib in libs if lib.name == "libc.so.6"}
    for lib in sorted(libs - seen):
        if lib.exists():
            c.tree_file(str(lib).lstrip("/"), _stripped(lib.resolve()), 0o755)
    return c.finish()


@dataclasses.dataclass(frozen=True)
class Image:
    xen: Path
    kernel: Path
    initrd: Path
    key: str

    @property
    def domu_initrd(self) -> Path:
        """The PV domU's initramfs (the domU boots the same kernel as dom0)."""
        return self.initrd.with_name("domu-initrd.gz")

    @property
    def peer_initrd_base(self) -> Path:
        """The peer domU's initramfs without Python: busybox, :data:`PEER_MODULES`, and
        ``domu-init``; :func:`boot` appends the Python runtime and the tree to it."""
        return self.initrd.with_name("peer-initrd-base.gz")

    @property
    def domu_kernel(self) -> Path:
        """The domU's kernel: ``vmlinux`` (the ELF inside ``vmlinuz``, unpacked here) if
        it could be unpacked, else ``vmlinuz``.  libxl unpacks an xz bzImage itself, but
        under TCG that takes 6-20 s of each ``xl create``; the plain ELF loads in ~1 s."""
        elf = self.kernel.with_name("vmlinux")
        return elf if elf.exists() else self.kernel


def image_key() -> tuple[str, str]:
    """(cache key, kernel release): package versions + the lab's build inputs."""
    kver = kernel_version()
    h = hashlib.sha256()
    for pkg in [*lab_debs(), f"linux-image-{kver}"]:
        h.update(f"{pkg}={_dpkg_version(pkg)}\n".encode())
    for init in (INIT, DOMU_INIT):
        h.update(init.read_bytes())
    h.update(repr((IMAGE_FORMAT, MODULES, DOMU_MODULES, PEER_MODULES)).encode())
    return h.hexdigest()[:16], kver


def build_image(cache: Path = CACHE) -> Image:
    """The cached boot files, built first if this key has none (concurrency-safe)."""
    key, kver = image_key()
    final = cache / f"image-{key}"
    image = Image(final / "xen.elf", final / "vmlinuz", final / "initrd.gz", key)
    if (final / "ok").exists():
        os.utime(final)  # most recently used: kept by _prune_images
        return image
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".image-{key}-", dir=cache))
    try:
        with gzip.open(XEN_GZ) as src, open(tmp / "xen.elf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        shutil.copyfile(f"/boot/vmlinuz-{kver}", tmp / "vmlinuz")
        elf = unpack_bzimage((tmp / "vmlinuz").read_bytes())
        if elf is not None:
            (tmp / "vmlinux").write_bytes(elf)
        (tmp / "initrd.gz").write_bytes(_build_initrd(kver, MODULES, INIT))
        (tmp / "domu-initrd.gz").write_bytes(_build_initrd(kver, DOMU_MODULES, DOMU_INIT))
        (tmp / "peer-initrd-base.gz").write_bytes(_build_initrd(kver, PEER_MODULES, DOMU_INIT))
        (tmp / "ok").write_text(f"{kver}\n")
        try:
            tmp.rename(final)
        except OSError:  # another run finished first
            if not (final / "ok").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune_images(cache)
    return image


def _prune_images(cache: Path, keep: int = KEEP_IMAGES) -> None:
    """Remove all but the ``keep`` most recently used images (each is ~80 MB)."""
    images = sorted(cache.glob("image-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[keep:]:
        shutil.rmtree(old, ignore_errors=True)


# --- boot -------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one boot produced."""

    results: Path
    console: str
    qemu_returncode: int | None  # None: killed by the host-side timeout
    seconds: float
    pytest_rc: int | None
    boots: int = 1  # QEMU starts it took (an early hang is retried)

    @property
    def junit(self) -> Path:
        return self.results / "junit.xml"

    def pytest_log(self) -> str:
        p = self.results / "pytest.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def diagnosis(self) -> str:
        """A short account of what happened, for failure messages."""
        lines = [ln for ln in self.console.splitlines() if "xenlab:" in ln]
        tail = self.console.splitlines()[-25:]
        return (
            f"qemu exit {self.qemu_returncode} after {self.seconds:.0f}s and {self.boots} "
            f"boot(s), pytest rc {self.pytest_rc}; results in {self.results}\n"
            + "\n".join(lines)
            + "\n--- console tail ---\n"
            + "\n".join(tail)
        )


def qemu_command(image: Image, results: Path, watchdog: int) -> list[str]:
    for p in (image.xen, image.kernel, image.initrd, results):
        if "," in str(p) or " " in str(p):
            raise ValueError(f"QEMU cannot take a path with ',' or ' ': {p}")
    dom0 = f"{image.kernel} console=hvc0 loglevel=4 xenlab.watchdog={watchdog}"
    return [
        "qemu-system-x86_64",
        "-accel", "tcg,thread=multi",
        "-cpu", "qemu64",
        "-m", "2048",
        "-smp", "2",
        "-display", "none",
        "-monitor", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(image.xen),
        "-append", "console=com1 com1=115200 dom0_mem=1024M,max:1024M loglvl=warning",
        "-initrd", f"{dom0},{image.initrd}",
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
    ]  # fmt: skip


_LIVE_QEMU: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_live_qemu() -> None:
    """Kill a QEMU run still going when the interpreter exits: a boot in a background
    thread (the test session starts the lab early) whose session ended first."""
    for proc in list(_LIVE_QEMU):
        if proc.poll() is None:
            proc.kill()


def _run_qemu(
    cmd: list[str], console_path: Path, init_deadline: float, deadline: float, echo: bool
) -> tuple[int | None, bool]:
    """Run QEMU to completion, teeing the console; ``(returncode, reached_init)``.

    Killed (returncode None) if dom0's ``/init`` has not announced itself within
    ``init_deadline`` seconds, or if the whole run exceeds ``deadline`` seconds.
    """
    start = time.monotonic()
    seen = b""
    with open(console_path, "wb") as console:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        _LIVE_QEMU.add(proc)
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        try:
            while True:
                exited = proc.poll() is not None
                chunk = proc.stdout.read()
                if chunk:
                    console.write(chunk)
                    console.flush()
                    if len(seen) < 1 << 20:
                        seen += chunk
                    if echo:
                        sys.stdout.write(chunk.decode(errors="replace"))
                        sys.stdout.flush()
                reached_init = INIT_MARKER in seen
                if exited:
                    return proc.returncode, reached_init
                elapsed = time.monotonic() - start
                if elapsed > deadline or (not reached_init and elapsed > init_deadline):
                    return None, reached_init
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _LIVE_QEMU.discard(proc)


def _build_oxenstored_shim(results: Path) -> Path | None:
    """Compile ``xenlab/oxenstored-shim.c`` into ``results`` (a fraction of a second here,
    ~20 s with cc under TCG); None, with the compiler's message, if that fails."""
    shim = results / "oxenstored-shim.so"
    source = TREE / "xenlab" / "oxenstored-shim.c"
    try:
        cc = subprocess.run(
            ["cc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(source)],
            capture_output=True,
            text=True,
        )
        error = cc.stderr.strip() if cc.returncode else ""
    except OSError as e:
        error = str(e)
    if error:
        print(f"xenlab: could not build {source.name}: {error}")
        return None
    return shim


@dataclasses.dataclass(frozen=True)
class PeerInitrd:
    initrd: Path
    python: str  # the interpreter's path (the same in the peer as on the host)
    pythonpath: str  # the tree and the venv's site-packages
    seconds: float  # to build it (the runtime part is cached)


def build_peer_initrd(image: Image, python: str, results: Path, cache: Path = CACHE) -> PeerInitrd:
    """``results/peer-initrd.cpio``: three cpio archives one after the other, the kernel
    unpacks each in turn: :attr:`Image.peer_initrd_base`, the Python runtime
    (:func:`build_python_runtime`, cached) and this tree's ``aioxen`` (built per run).
    Not compressed: Xen's PV domain builder (libxenguest) inflates a gzip'd ramdisk
    itself, in dom0, which took 2 minutes for these 62 MB under TCG (and it inflates only
    the first gzip member: three concatenated ``.gz`` files gave the domU just the first
    archive); loading the plain cpio is a copy."""
    t0 = time.monotonic()
    info = python_info(python)
    runtime = build_python_runtime(python, cache)
    out = results / "peer-initrd.cpio"
    with open(out, "wb") as f:
        f.write(gzip.decompress(image.peer_initrd_base.read_bytes()))
        f.write(runtime.read_bytes())
        f.write(build_tree_archive(info["tag"]))
        extra = os.environ.get("XENLAB_PEER_EXTRA", "")
        if extra:
            f.write(build_extra_archive([Path(x) for x in extra.split(":") if x]))
    pythonpath = f"{TREE}:{TREE / 'tests' / 'xenlab' / 'guest'}:{info['purelib']}"
    return PeerInitrd(out, info["exe"], pythonpath, time.monotonic() - t0)


def boot(
    pytest_args: list[str] | None = None,
    *,
    image: Image | None = None,
    cache: Path = CACHE,
    watchdog: int = DEFAULT_WATCHDOG,
    init_deadline: float = INIT_DEADLINE,
    attempts: int = 2,
    python: str | None = None,
    echo: bool = False,
) -> Run:
    """Boot, run ``pytest_args`` (default: the guest tier) in dom0, return the Run.

    A boot whose dom0 never reaches ``/init`` (an occasional early hang under TCG) is
    killed after ``init_deadline`` seconds and retried, up to ``attempts`` boots in all;
    each attempt's console is kept (``console.log``, ``console-attempt1.log``, ...).
    """
    image = image or build_image(cache)
    runs = cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for old in sorted(runs.iterdir())[:-KEEP_RUNS]:
        shutil.rmtree(old, ignore_errors=True)
    results = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=runs))
    results.chmod(0o777)
    shim = _build_oxenstored_shim(results)
    python = python or str(TREE / ".venv" / "bin" / "python")
    if not Path(python).exists():
        python = sys.executable
    peer = build_peer_initrd(image, python, results, cache)
    env = {
        "XENLAB_GUEST_SCRIPT": str(TREE / "xenlab" / "guest-run.sh"),
        "XENLAB_TREE": str(TREE),
        "XENLAB_PYTHON": python,
        "XENLAB_PYTEST_ARGS": shlex.join(pytest_args or GUEST_SELECTION),
        "XENLAB_PYTEST_TIMEOUT": str(max(watchdog - 60, 60)),
        # What tests/xenlab/guest/test_domu.py boots as a PV domU with ``xl create``.
        "XENLAB_DOMU_KERNEL": str(image.domu_kernel),
        "XENLAB_DOMU_INITRD": str(image.domu_initrd),
        # The peer domU running aioxen (test_crossdomain.py): its initramfs, and how to run
        # the host's Python in it (the same paths as here).
        "XENLAB_PEER_INITRD": f"/tmp/xenlab-results/{peer.initrd.name}",
        "XENLAB_PEER_PYTHON": peer.python,
        "XENLAB_PEER_PYTHONPATH": peer.pythonpath,
        # oxenstored beside the C xenstored (test_xenstore.py); "" if it did not compile.
        "XENLAB_OXENSTORED_SHIM": f"/tmp/xenlab-results/{shim.name}" if shim else "",
    }
    (results / "guest.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    cmd = qemu_command(image, results, watchdog)
    (results / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
    start = time.monotonic()
    console_path = results / "console.log"
    returncode: int | None = None
    for attempt in range(1, attempts + 1):
        returncode, reached_init = _run_qemu(cmd, console_path, init_deadline, watchdog + 60, echo)
        if reached_init or attempt == attempts:
            break
        console_path.rename(results / f"console-attempt{attempt}.log")
        print(f"xenlab: dom0 did not reach /init in {init_deadline:.0f}s; booting again")
    seconds = time.monotonic() - start
    rc_file = results / "pytest.rc"
    pytest_rc = int(rc_file.read_text().strip()) if rc_file.exists() else None
    text = console_path.read_text(errors="replace")
    return Run(results, text, returncode, seconds, pytest_rc, attempt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-only", action="store_true", help="build the image and exit")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get LAB_DEBS")
    parser.add_argument("--watchdog", type=int, default=DEFAULT_WATCHDOG)
    parser.add_argument("--quiet", action="store_true", help="do not echo the console")
    parser.add_argument("pytest_args", nargs="*", help="pytest selection run inside dom0")
    args, extra = parser.parse_known_args(argv)
    args.pytest_args += extra
    if not args.no_install:
        ensure_debs()
    t0 = time.monotonic()
    image = build_image()
    print(f"xenlab: image {image.key} ready in {time.monotonic() - t0:.1f}s", flush=True)
    if args.build_only:
        return 0
    run = boot(args.pytest_args or None, image=image, watchdog=args.watchdog, echo=not args.quiet)
    print(f"xenlab: boot + guest run took {run.seconds:.1f}s; results in {run.results}")
    if run.pytest_rc is None:
        print(run.diagnosis())
        return 2
    return run.pytest_rc


if __name__ == "__main__":
    sys.exit(main())
