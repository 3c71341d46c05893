"""Hostile and pre-existing roots (issue 13, finding 1), with a real second Unix user.

Another local user pre-creates ``$XEN_ROOT`` (0777) and plants symbolic links where the
platform keeps its files, or a listener where xenstored's socket goes; root then starts
``aioxen xenstored --root``, a vchan server and a XenStore client as the docs show.  Every
one of them must refuse with a message naming the path, owner and mode, and nothing outside
the root (nor inside it) may change.  Roots of our own that are too open, links as roots,
links planted inside a good root, FIFOs and foreign socket directories are refused too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.unix_user import OtherUser

from aioxen.platforms._rootdir import RootPermissionError, check_socket, replace_file
from aioxen.platforms.unix import UnixPlatform
from aioxen.platforms.xen import XenPlatform

pytestmark = pytest.mark.crossprocess

TIMEOUT = 60  # hang guard only


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def shared() -> Iterator[Path]:
    """A fresh directory like ``/tmp``: root's, world-writable, sticky."""
    d = Path(tempfile.mkdtemp(prefix="aioxen-shared-"))
    d.chmod(0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Root's own files outside any aioxen root, which links will point at."""
    d = tmp_path / "outside"
    d.mkdir(mode=0o700)
    (d / "victim-table").write_bytes(b"root's precious file\n" * 100)
    (d / "victim-record").write_bytes(b"another file of root's\n")
    return d


def snapshot(top: Path) -> dict[str, Any]:
    """Every entry below ``top`` (not following links): type, mode, owner, size, mtime,
    content hash, link target -- and ``top`` itself."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            entry: tuple[Any, ...] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns)
            if stat.S_ISREG(st.st_mode):
                entry += (hashlib.sha256(Path(p).read_bytes()).hexdigest(),)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(p),)
            out[os.path.relpath(p, top)] = entry
    return out


def env_without_world(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XEN_ROOT", "XENSTORED_PATH", "AIOXEN_PLATFORM", "AIOXEN_DOMID")
    }
    env.update(extra)
    return env


def run_refused(argv: list[str], env: dict[str, str]) -> str:
    """Run ``argv`` (as root, stdin /dev/null); it must exit non-zero by itself.  A
    process that starts serving instead is stopped and the test fails.  Returns stderr."""
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{argv} was not refused: it kept running; stdout {out!r} stderr {err!r}")
    assert proc.returncode not in (0, None), (argv, out, err)
    assert "XEN_ROOT=" not in out, out
    return err


def aioxen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "aioxen", *args]


VCHAN_SERVER = """
import asyncio
from aioxen import vchan

async def main():
    async def echo(reader, writer):
        writer.write(await reader.read(100))
        writer.close()
    server = await vchan.start_server(echo, 1, "web")
    async with server:
        print("SERVING", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def owner_text(user: OtherUser) -> str:
    return f"uid {user.uid} ({user.name})"


def plant_hostile_root(user: OtherUser, root: Path, outside: Path) -> None:
    """As ``user``: the root 0777 with grants/0/table -> an existing file of root's and
    evtchn/0/next-port -> a file of root's that does not exist yet (issue 13's setup)."""
    user.python(
        "import os, sys\n"
        "root, table, port = sys.argv[1:]\n"
        "os.umask(0)\n"
        "for d in ('', 'grants', 'grants/0', 'evtchn', 'evtchn/0', 'xenstored'):\n"
        "    os.mkdir(os.path.join(root, d), 0o777)\n"
        "os.symlink(table, os.path.join(root, 'grants/0/table'))\n"
        "os.symlink(port, os.path.join(root, 'evtchn/0/next-port'))\n",
        str(root),
        str(outside / "victim-table"),
        str(outside / "created-next-port"),
    )


# -- finding 1: the hostile pre-created root --------------------------------------------


def test_hostile_preexisting_root_is_refused_and_nothing_changes(
    mallory: OtherUser, shared: Path, outside: Path
) -> None:
    root = shared / "xen"
    plant_hostile_root(mallory, root, outside)
    before_outside, before_root = snapshot(outside), snapshot(root)
    assert before_root["."][1] == mallory.uid

    def check_message(err: str) -> None:
        assert str(root) in err, err
        assert owner_text(mallory) in err, err
        assert "mode 0777" in err, err
        assert "mktemp -d" in err, err  # the fix offered

    # aioxen xenstored --root, exactly as the docs show it.
    err = run_refused(aioxen_cmd("xenstored", "--root", str(root)), env_without_world())
    assert err.startswith("aioxen xenstored: refusing "), err
    assert "Traceback" not in err, err
    check_message(err)

    # A vchan server on the unix platform (XEN_ROOT from the environment).
    env = env_without_world(XEN_ROOT=str(root), AIOXEN_PLATFORM="unix", AIOXEN_DOMID="0")
    err = run_refused([sys.executable, "-c", VCHAN_SERVER], env)
    assert "RootPermissionError" in err, err
    check_message(err)

    # aioxen cat -l (its vchan server) with that $XEN_ROOT.
    err = run_refused(aioxen_cmd("cat", "-l", "1", "web"), env)
    assert err.startswith("aioxen cat: ") and "Traceback" not in err, err
    check_message(err)

    # The platform itself, in-process.
    with pytest.raises(RootPermissionError, match="belongs to another user") as ei:
        UnixPlatform(0, root=root)
    assert isinstance(ei.value, PermissionError)
    check_message(str(ei.value))

    assert not (outside / "created-next-port").exists()
    assert snapshot(outside) == before_outside  # nothing outside the root changed ...
    assert snapshot(root) == before_root  # ... nor inside it (refused, not "repaired")


def test_foreign_root_even_if_private_is_refused(mallory: OtherUser, shared: Path) -> None:
    root = shared / "theirs"
    mallory.python("import os, sys; os.mkdir(sys.argv[1], 0o700)", str(root))
    with pytest.raises(RootPermissionError, match="belongs to another user") as ei:
        UnixPlatform(0, root=root)
    assert owner_text(mallory) in str(ei.value) and "mode 0700" in str(ei.value)


def test_root_below_a_directory_another_user_controls_is_refused(
    mallory: OtherUser, shared: Path
) -> None:
    """Our own private root inside another user's directory: they could rename it away and
    put theirs in its place, so the untrusted ancestor is named."""
    theirs = shared / "project"
    mallory.python("import os, sys; os.mkdir(sys.argv[1], 0o755)", str(theirs))
    root = theirs / "root"
    root.mkdir(mode=0o700)  # we are root: we may create it there
    with pytest.raises(RootPermissionError, match="not trusted") as ei:
        UnixPlatform(0, root=root)
    assert str(theirs) in str(ei.value) and owner_text(mallory) in str(ei.value)
    err = run_refused(aioxen_cmd("xenstored", "--root", str(root)), env_without_world())
    assert str(theirs) in err and "not trusted" in err, err
    assert sorted(os.listdir(root)) == []


# -- the socket hijack: another user's xenstored directory ------------------------------

LISTENER = """
import os, select, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen(8)
print("READY", flush=True)
conns = received = 0
open_conns = []
while True:
    r, _, _ = select.select([s, sys.stdin, *open_conns], [], [])
    if sys.stdin in r:
        break
    if s in r:
        c, _ = s.accept()
        conns += 1
        open_conns.append(c)
    for c in [c for c in open_conns if c in r]:
        data = c.recv(65536)
        received += len(data)
        if not data:
            open_conns.remove(c)
print(f"connections={conns} bytes={received}", flush=True)
"""


class Listener:
    """Another user's process listening on ``path``; :meth:`stop` reports what reached it."""

    def __init__(self, user: OtherUser, path: Path) -> None:
        self.proc = user.popen(
            [user.python_exe, "-I", "-c", LISTENER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "READY\n"

    def stop(self) -> str:
        out, _ = self.proc.communicate(input="", timeout=TIMEOUT)
        return out.strip()


def test_socket_in_another_users_directory_is_refused_by_clients(
    mallory: OtherUser, shared: Path, tmp_path: Path
) -> None:
    """The end of finding 1: the other user listens at ``ROOT/xenstored/socket``; root's
    ``aioxen xenstore write /secret/password ...`` and platform clients must not connect."""
    root = shared / "xen"
    mallory.python(
        "import os, sys; os.umask(0); os.mkdir(sys.argv[1], 0o777); "
        "os.mkdir(os.path.join(sys.argv[1], 'xenstored'), 0o777)",
        str(root),
    )
    sock = root / "xenstored" / "socket"
    listener = Listener(mallory, sock)
    try:
        for extra in ({}, {"XEN_ROOT": str(root)}):
            env = env_without_world(XENSTORED_PATH=str(sock), **extra)
            err = run_refused(aioxen_cmd("xenstore", "write", "/secret/password", "hunter2"), env)
            assert err.startswith("aioxen xenstore write: refusing "), err
            assert str(root / "xenstored") in err and owner_text(mallory) in err, err
            assert "Traceback" not in err, err
        # A unix platform of our own (private root) pointed at that socket.
        plat = UnixPlatform(0, root=tmp_path / "mine", xenstored_path=sock)
        with pytest.raises(RootPermissionError, match="another user"):
            _ = plat.store
        # The xen platform (dom0 with a xenstored socket) checks it the same way.
        xen = XenPlatform(0, device_dir=str(tmp_path))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("XENSTORED_PATH", str(sock))
            with pytest.raises(RootPermissionError, match="another user"):
                xen._create_store()
    finally:
        report = listener.stop()
    assert report == "connections=0 bytes=0", report


async def test_foreign_xenstored_dir_in_own_root_is_refused_by_server_and_client(
    mallory: OtherUser, tmp_path: Path
) -> None:
    """A private root of ours whose ``xenstored`` directory belongs to another user."""
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    rundir = root / "xenstored"
    rundir.mkdir(mode=0o700)
    os.chown(rundir, mallory.uid, mallory.gid)
    before = snapshot(root)

    err = run_refused(aioxen_cmd("xenstored", "--root", str(root)), env_without_world())
    assert str(rundir) in err and owner_text(mallory) in err, err
    err = run_refused(
        aioxen_cmd("xenstored", "--root", str(tmp_path / "other"), "--socket", str(rundir / "s")),
        env_without_world(),
    )
    assert str(rundir) in err and owner_text(mallory) in err, err

    async with UnixPlatform(0, root=root) as plat:
        with pytest.raises(RootPermissionError, match="another user"):
            await plat.store.read("/x")
    env = env_without_world(XEN_ROOT=str(root), XENSTORED_PATH=str(rundir / "socket"))
    err = run_refused(aioxen_cmd("xenstore", "read", "/x"), env)
    assert str(rundir) in err and owner_text(mallory) in err, err
    assert snapshot(root) == before


def test_xenstored_refuses_a_shared_socket_directory(shared: Path, tmp_path: Path) -> None:
    """``--socket`` in a world-writable directory (like /tmp itself) is refused."""
    err = run_refused(
        aioxen_cmd("xenstored", "--root", str(tmp_path / "r"), "--socket", str(shared / "s")),
        env_without_world(),
    )
    assert str(shared) in err and "mode 1777" in err, err
    assert os.listdir(shared) == []


# -- roots of our own that are not private ----------------------------------------------


@pytest.mark.parametrize("bits", [0o755, 0o777, 0o750, 0o701, 0o1777], ids=oct)
def test_own_root_with_group_or_other_access_is_refused(tmp_path: Path, bits: int) -> None:
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(bits)
    with pytest.raises(RootPermissionError, match=f"mode {bits:04o}") as ei:
        UnixPlatform(1, root=root)
    msg = str(ei.value)
    assert str(root) in msg and f"chmod 700 {root}" in msg and "uid " in msg
    err = run_refused(aioxen_cmd("xenstored", "--root", str(root)), env_without_world())
    assert f"mode {bits:04o}" in err and f"chmod 700 {root}" in err, err
    assert stat.S_IMODE(os.stat(root).st_mode) == bits  # refused, not silently changed
    assert os.listdir(root) == []


def test_symlink_as_root_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(RootPermissionError, match="symbolic link") as ei:
        UnixPlatform(1, root=link)
    assert str(link) in str(ei.value) and str(real) in str(ei.value)
    err = run_refused(aioxen_cmd("xenstored", "--root", str(link)), env_without_world())
    assert str(link) in err and "symbolic link" in err, err
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(RootPermissionError, match="symbolic link"):
        UnixPlatform(1, root=dangling)
    assert os.listdir(real) == [] and not (tmp_path / "nowhere").exists()


def test_symlinked_subdirectory_is_refused(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    (root / "xenstored").symlink_to(outside)
    before = snapshot(outside)
    err = run_refused(aioxen_cmd("xenstored", "--root", str(root)), env_without_world())
    assert str(root / "xenstored") in err and "symbolic link" in err, err
    assert snapshot(outside) == before


def test_missing_root_is_created_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        plat = UnixPlatform(1, root=tmp_path / "a" / "b" / "root")
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b", Path(plat.root)):
        assert stat.S_IMODE(os.lstat(p).st_mode) == 0o700, p


# -- links and odd files planted inside a good root -------------------------------------


def private_dirs(root: Path, *rel: str) -> None:
    root.mkdir(mode=0o700, exist_ok=True)
    for r in rel:
        p = root
        for part in r.split("/"):
            p = p / part
            p.mkdir(mode=0o700, exist_ok=True)


async def test_links_planted_inside_a_good_root_are_never_followed(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "root"
    private_dirs(root, "grants/1", "evtchn/1", "grants/4", "evtchn/5")
    (root / "grants" / "1" / "table").symlink_to(outside / "victim-table")
    (root / "evtchn" / "1" / "next-port").symlink_to(outside / "created-next-port")  # dangling
    (outside / "peer-grants").mkdir(mode=0o700)
    (root / "grants" / "3").symlink_to(outside / "peer-grants")
    os.mkfifo(root / "grants" / "4" / "table", 0o600)
    outside_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outside_listener.bind(str(outside / "sock"))
    outside_listener.listen(1)
    outside_listener.setblocking(False)
    (root / "evtchn" / "5" / "7.1").symlink_to(outside / "sock")
    before = snapshot(outside)
    try:
        async with UnixPlatform(1, root=root) as plat:
            with pytest.raises(RootPermissionError, match="symbolic link") as ei:
                plat.grants.share(2, 1)
            assert str(root / "grants" / "1" / "table") in str(ei.value)
            with pytest.raises(RootPermissionError, match="symbolic link") as ei:
                await plat.events.listen(2)
            assert str(root / "evtchn" / "1" / "next-port") in str(ei.value)
            with pytest.raises(RootPermissionError, match="symbolic link"):
                plat.grants.map(3, [8])
            with pytest.raises(RootPermissionError, match="not a regular file"):
                plat.grants.map(4, [8])  # opened O_NONBLOCK: a FIFO cannot hang us
            with pytest.raises(RootPermissionError, match="not a socket"):
                await plat.events.connect(5, 7)
        with pytest.raises(BlockingIOError):
            outside_listener.accept()  # nothing connected through the link
    finally:
        outside_listener.close()
    assert not (outside / "created-next-port").exists()
    assert snapshot(outside) == before
    assert (outside / "victim-table").read_bytes() == b"root's precious file\n" * 100


async def test_link_at_a_death_record_is_never_followed(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    async with UnixPlatform(1, root=root) as a, UnixPlatform(2, root=root) as b:
        ch = await a.events.listen(2)
        peer = await b.events.connect(1, ch.port)
        share = a.grants.share(2, 1)
        record = root / "evtchn" / "1" / f"{ch.port}.clear"
        record.symlink_to(outside / "victim-record")
        before = snapshot(outside)
        with pytest.raises(RootPermissionError, match="symbolic link"):
            share.set_unmap_notify(0, ch)
        share.close()
        peer.close()
        ch.close()
        assert snapshot(outside) == before


def test_replace_never_writes_through_a_leftover_temporary_link(
    tmp_path: Path, outside: Path
) -> None:
    """A link at the temporary name of an atomic replace is removed, not written through."""
    root = tmp_path / "root"
    private_dirs(root)
    target = root / "record"
    target.write_bytes(b"old\n")
    (root / f"record.{os.getpid()}.tmp").symlink_to(outside / "victim-record")
    before = snapshot(outside)
    replace_file(str(target), b"new\n")
    assert target.read_bytes() == b"new\n" and sorted(os.listdir(root)) == ["record"]
    assert snapshot(outside) == before


def test_clients_accept_trusted_system_socket_directories(tmp_path: Path) -> None:
    """Xen's layout -- root's /var/run/xenstored (0755) -- or a sticky shared directory is
    fine for a client as long as the socket itself is root's or ours."""
    system = tmp_path / "run"
    system.mkdir(mode=0o755)
    check_socket(str(system / "socket"), private=False)  # missing: connect reports it
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(system / "socket"))
        check_socket(str(system / "socket"), private=False)
        with pytest.raises(RootPermissionError, match="mode 0755"):
            check_socket(str(system / "socket"), private=True)
    finally:
        s.close()


def test_xenstored_refuses_a_state_file_others_could_plant(
    shared: Path, tmp_path: Path, outside: Path
) -> None:
    """The state file is loaded as the whole tree at start: not from a shared directory,
    not through a link."""
    err = run_refused(
        aioxen_cmd(
            "xenstored", "--root", str(tmp_path / "r1"), "--state-file", str(shared / "s.json")
        ),
        env_without_world(),
    )
    assert str(shared) in err and "mode 1777" in err, err
    private = tmp_path / "state"
    private.mkdir(mode=0o700)
    (private / "s.json").symlink_to(outside / "victim-record")
    before = snapshot(outside)
    err = run_refused(
        aioxen_cmd(
            "xenstored", "--root", str(tmp_path / "r2"), "--state-file", str(private / "s.json")
        ),
        env_without_world(),
    )
    assert str(private / "s.json") in err and "not a regular file" in err, err
    assert snapshot(outside) == before


def test_root_reached_through_a_link_into_another_users_directory_is_refused(
    mallory: OtherUser, shared: Path, tmp_path: Path
) -> None:
    """Links above the root are followed (``/var/run`` -> ``/run`` is fine), but where they
    lead is checked too, before anything is created there."""
    theirs = shared / "theirs"
    mallory.python("import os, sys; os.mkdir(sys.argv[1], 0o755)", str(theirs))
    link = tmp_path / "via"
    link.symlink_to(theirs)
    with pytest.raises(RootPermissionError, match="not trusted") as ei:
        UnixPlatform(1, root=link / "new" / "root")
    assert str(theirs) in str(ei.value) and owner_text(mallory) in str(ei.value)
    assert os.listdir(theirs) == []
