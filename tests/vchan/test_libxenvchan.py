"""Wire compatibility with the real libxenvchan (libxen-dev's ``libxenvchan.a``).

``c/xenvchan_peer.c`` links the unmodified library against a file/socket emulation of
the Xen libraries it calls; :mod:`shim_platform` is the same emulation as an aioxen
Platform.  The C side runs in its own process.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from shim_platform import ShimPlatform

from aioxen.vchan import wire
from aioxen.vchan.endpoint import PendingServer, attach_client
from aioxen.vchan.transport import VchanTransport

HERE = Path(__file__).resolve().parent
PATH = "data/vchan/0/interop"


@pytest.fixture(scope="module")
def peer_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("xvp") / "xenvchan_peer"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-Werror",
            "-o",
            str(out),
            str(HERE / "c" / "xenvchan_peer.c"),
            "-l:libxenvchan.a",
        ],
        check=True,
    )
    return out


def pattern(n: int) -> bytes:
    return bytes(((i * 131 + (i >> 9)) & 0xFF) for i in range(n))


class Peer:
    """One running ``xenvchan_peer`` sharing ``dir`` and a socketpair with us."""

    def __init__(self, binary: Path, directory: Path, *args: str) -> None:
        self.dir = directory
        self.sock, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._binary = binary
        self._args = args

    def start(self) -> Peer:
        theirs = self._theirs
        env = {**os.environ, "SHIM_DIR": str(self.dir), "SHIM_EVFD": str(theirs.fileno())}
        self.proc = subprocess.Popen(
            [str(self._binary), *self._args],
            env=env,
            pass_fds=[theirs.fileno()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        theirs.close()
        return self

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def finish(self) -> tuple[str, str]:
        out, err = self.proc.communicate(timeout=20)
        return out, err

    def xs_read(self, path: str) -> int:
        return int((self.dir / "xs" / path.replace("/", "_")).read_text())

    def xs_write(self, path: str, value: int) -> None:
        (self.dir / "xs").mkdir(exist_ok=True)
        (self.dir / "xs" / path.replace("/", "_")).write_text(str(value))


@pytest.fixture
def shim_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "shim"
    d.mkdir()
    yield d
    # Our shares use refs from 1000 (the C side's from 8; libxenvchan frees its ring pages
    # with a plain munmap, which the file emulation cannot see).
    ours = sorted(p.name for p in d.iterdir() if p.name[:1] == "g" and int(p.name[1:]) >= 1000)
    assert ours == [], f"{len(ours)} aioxen grant files not unshared: {ours[:10]}"


def test_header_layout_matches_libxenvchan_h(peer_binary: Path, tmp_path: Path) -> None:
    rng = random.Random(5)
    pairs = [(0, 0), (1024, 2048), (2048, 1024), (2048, 2048), (1025, 1), (4096, 4096)]
    pairs += [(65536, 65536), (100, 65536), (65536, 100), (1 << 20, 1 << 20), (1 << 20, 10)]
    pairs += [(rng.randrange(0, 1 << 20), rng.randrange(0, 1 << 20)) for _ in range(10)]
    pairs += [(rng.randrange(0, 4096), rng.randrange(0, 4096)) for _ in range(40)]
    proc = subprocess.run(
        [str(peer_binary), "layout"],
        input="".join(f"{a} {b}\n" for a, b in pairs),
        env={**os.environ, "SHIM_DIR": str(tmp_path), "SHIM_EVFD": "99"},
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stdout.splitlines()
    fields = dict(line.split() for line in lines if not line.startswith("orders"))
    assert int(fields["sizeof"]) == wire.HEADER_SIZE
    for name, ours in [
        ("left.cons", wire.LEFT_CONS),
        ("left.prod", wire.LEFT_PROD),
        ("right.cons", wire.RIGHT_CONS),
        ("right.prod", wire.RIGHT_PROD),
        ("left_order", wire.LEFT_ORDER),
        ("right_order", wire.RIGHT_ORDER),
        ("cli_live", wire.CLI_LIVE),
        ("srv_live", wire.SRV_LIVE),
        ("cli_notify", wire.CLI_NOTIFY),
        ("srv_notify", wire.SRV_NOTIFY),
        ("grants", wire.GRANTS),
        ("VCHAN_NOTIFY_WRITE", wire.NOTIFY_WRITE),
        ("VCHAN_NOTIFY_READ", wire.NOTIFY_READ),
    ]:
        assert int(fields[name]) == ours, name
    results = [line.split() for line in lines if line.startswith("orders")]
    assert len(results) == len(pairs)
    for r in results:
        left, right, lo, ro = (int(x) for x in r[1:5])
        assert wire.select_orders(left, right) == (lo, ro), (left, right)
        # the rest of what libxenvchan writes into a fresh page matches init_server_page
        page = bytearray(4096)
        nl, nr = wire.ring_pages(lo), wire.ring_pages(ro)
        wire.init_server_page(page, lo, ro, list(range(nl)), list(range(nr)))
        assert r[5:] == [
            "live",
            str(page[wire.CLI_LIVE]),
            str(page[wire.SRV_LIVE]),
            "notify",
            str(page[wire.CLI_NOTIFY]),
            str(page[wire.SRV_NOTIFY]),
            "idx",
            "0",
            "0",
            "0",
            "0",
        ]
    # and the advertisement it writes: ring-ref and event-channel, perms n<self> r<peer>
    assert "XS perms data/vchan/2/layout/ring-ref n1 r2" in proc.stderr
    assert "XS perms data/vchan/2/layout/event-channel n1 r2" in proc.stderr


def _streams(conn: object) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = VchanTransport(loop, conn, protocol)  # type: ignore[arg-type]
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _echo_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, total: int, seed: int
) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(total)

    async def send() -> None:
        i = 0
        while i < total:
            n = rng.randint(1, 70000)
            writer.write(data[i : i + n])
            i += n
            await writer.drain()
        writer.write_eof()  # the EOF bit: libxenvchan must keep working

    task = asyncio.ensure_future(send())
    got = await reader.readexactly(total)
    await task
    assert got == data


@pytest.mark.parametrize(
    ("lmin", "rmin"), [(0, 0), (2048, 1024), (4096, 65536), (1 << 20, 1 << 20)]
)
async def test_aioxen_client_libxenvchan_server(
    peer_binary: Path, shim_dir: Path, lmin: int, rmin: int
) -> None:
    peer = Peer(peer_binary, shim_dir, "server", "0", PATH, str(lmin), str(rmin)).start()
    plat = ShimPlatform(shim_dir, peer.sock)
    assert peer.readline() == "READY"
    ring_ref = peer.xs_read(f"{PATH}/ring-ref")
    evtchn = peer.xs_read(f"{PATH}/event-channel")
    conn = await attach_client(plat, 1, "interop", ring_ref, evtchn)
    assert (conn.core.write_size, conn.core.read_size) == tuple(
        1 << o for o in wire.select_orders(lmin, rmin)
    )
    reader, writer = _streams(conn)
    await _echo_exchange(reader, writer, 3_000_000, lmin)
    writer.close()
    await writer.wait_closed()
    out, err = peer.finish()
    assert "ECHOED 3000000" in out
    assert f"XS rm {PATH}" in err  # libxenvchan >= 4.17 removes its advertisement
    await plat.close()


@pytest.mark.parametrize(
    ("lmin", "rmin"), [(0, 0), (1024, 2048), (65536, 4096), (1 << 20, 1 << 20)]
)
async def test_libxenvchan_client_aioxen_server(
    peer_binary: Path, shim_dir: Path, lmin: int, rmin: int
) -> None:
    peer = Peer(peer_binary, shim_dir, "client", "0", PATH)
    plat = ShimPlatform(shim_dir, peer.sock)
    pending = await PendingServer.create(
        plat,
        1,
        "interop",
        read_size=max(lmin, 1),
        write_size=max(rmin, 1),
        initial_index=2**32 - 5000,
    )
    peer.xs_write(f"{PATH}/ring-ref", pending.ring_ref)
    peer.xs_write(f"{PATH}/event-channel", pending.event_channel)
    peer.start()
    conn = await pending.wait_connected(timeout=10)
    reader, writer = _streams(conn)
    assert peer.readline() == "READY"
    await _echo_exchange(reader, writer, 3_000_000, rmin)
    writer.close()
    await writer.wait_closed()
    out, _ = peer.finish()
    assert "ECHOED 3000000" in out
    await plat.close()


@pytest.mark.parametrize("role", ["server", "client"])
@pytest.mark.parametrize("size", [0, 65536])
async def test_libxenvchan_writes_then_closes_nothing_lost(
    peer_binary: Path, shim_dir: Path, role: str, size: int
) -> None:
    """The C side writes N bytes and closes at once (srv_live/cli_live -> 0 while data is
    still in the ring): we must deliver every byte, then EOF."""
    total = 2_500_000
    if role == "server":
        peer = Peer(
            peer_binary, shim_dir, "server-blast", "0", PATH, str(size), str(size), str(total)
        ).start()
        plat = ShimPlatform(shim_dir, peer.sock)
        assert peer.readline() == "READY"
        # the server writes before we connect: data already in the ring at attach time
        conn = await attach_client(
            plat,
            1,
            "interop",
            peer.xs_read(f"{PATH}/ring-ref"),
            peer.xs_read(f"{PATH}/event-channel"),
        )
    else:
        peer = Peer(peer_binary, shim_dir, "client-blast", "0", PATH, str(total))
        plat = ShimPlatform(shim_dir, peer.sock)
        pending = await PendingServer.create(
            plat, 1, "interop", read_size=max(size, 1), write_size=max(size, 1)
        )
        peer.xs_write(f"{PATH}/ring-ref", pending.ring_ref)
        peer.xs_write(f"{PATH}/event-channel", pending.event_channel)
        peer.start()
        conn = await pending.wait_connected(timeout=10)
    reader, writer = _streams(conn)
    # read slowly at first so that the close lands while the ring is full
    first = await reader.readexactly(1000)
    await asyncio.sleep(0.2)
    rest = await reader.read()
    assert first + rest == pattern(total)
    writer.close()
    await writer.wait_closed()
    out, _ = peer.finish()
    assert f"SENT {total}" in out
    await plat.close()
