"""Issue 14, findings 2 and 3: one flooding domain can neither grow ``aioxen xenstored``
without bound nor keep a well-behaved client waiting.

Real ``aioxen xenstored`` processes and raw sockets.  Memory is checked with the server's
own accounting (``aioxen-stats``: the most unsent output a domain ever held) and with the
process's peak RSS against a generous margin.  Fairness is checked structurally, not by a
latency number: the flooding connection watches a node that the good client writes right
after its READ is answered, so the position of that watch event in the flood's reply
stream says how many flood requests the server handled before the good client's -- the
server's own ordering, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rawsock import Raw
from support.xenstored import Xenstored, start_xenstored

from aioxen.xenstore.wire import HEADER, HEADER_SIZE, XENSTORE_PAYLOAD_MAX, Decoder, XsType, join

FLOOD_DOMID = 5
SECOND_DOMID = 6
BUDGET = 20 * (HEADER_SIZE + XENSTORE_PAYLOAD_MAX)  # the default ``outstanding`` of 20
RSS_MARGIN = 40 << 20  # the old server grew by ~180 MB in the READ flood
HANG_GUARD = 60.0


@pytest.fixture(params=["uvloop", "asyncio"])
def server(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Xenstored]:
    """``aioxen xenstored`` on uvloop (what the CLI picks when installed) and, with uvloop
    made unimportable for the server process only, on asyncio's own loop."""
    if request.param == "asyncio":
        stub = tmp_path / "no-uvloop"
        stub.mkdir()
        (stub / "uvloop.py").write_text("raise ImportError('uvloop hidden by the test')\n")
        monkeypatch.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [str(stub), os.environ.get("PYTHONPATH")]))
        )
    # Watch events are never dropped for backlog here: the fairness probe is one.
    xs = start_xenstored(tmp_path / "root", "--quota", f"watch-event-backlog={1 << 30}")
    yield xs
    assert xs.alive(), "xenstored died during the flood"
    assert xs.stop() == 0


def frame(typ: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> bytes:
    return HEADER.pack(typ, req_id, tx_id, len(payload)) + payload


def rss(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def stats(dom0: Raw) -> dict[str, object]:
    msg = dom0.call(XsType.CONTROL, join("aioxen-stats"))
    data: dict[str, object] = json.loads(msg.payload.rstrip(b"\0"))
    return data


def peak_unsent(dom0: Raw, domid: int) -> int:
    peaks = stats(dom0)["peak_unsent"]
    assert isinstance(peaks, dict)
    return int(peaks.get(str(domid), 0))


def push(socks: list[socket.socket], data: bytes, stall: float = 1.0) -> list[int]:
    """Send ``data`` on every socket without reading anything back, as far as the server
    takes it: stop on a socket once it has accepted nothing for ``stall`` seconds.
    Returns the bytes sent per socket."""
    sent = [0] * len(socks)
    last = [time.monotonic()] * len(socks)
    for s in socks:
        s.setblocking(False)
    deadline = time.monotonic() + HANG_GUARD / 2
    active = set(range(len(socks)))
    while active and time.monotonic() < deadline:
        for i in list(active):
            try:
                n = socks[i].send(data[sent[i] : sent[i] + 65536])
            except BlockingIOError:
                n = 0
            now = time.monotonic()
            if n:
                sent[i] += n
                last[i] = now
            if sent[i] == len(data) or now - last[i] > stall:
                active.discard(i)
        time.sleep(0.002)
    return sent


class Reader(threading.Thread):
    """Reads a flood connection's replies as fast as they come, noting where the first
    WATCH_EVENT with ``token`` falls (after how many replies)."""

    def __init__(self, sock: socket.socket, token: bytes) -> None:
        super().__init__(daemon=True)
        self.sock, self.token = sock, token
        self.replies = 0
        self.errors = 0
        self.event_after: int | None = None
        self.stop = False

    def run(self) -> None:
        dec = Decoder()
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            dec.feed(data)
            for msg in dec.messages():
                if msg.type == XsType.WATCH_EVENT:
                    if msg.payload.split(b"\0")[1] == self.token and self.event_after is None:
                        self.event_after = self.replies
                    continue
                self.replies += 1
                if msg.type == XsType.ERROR:
                    self.errors += 1


def flood_conn(xs: Xenstored, domid: int = FLOOD_DOMID) -> Raw:
    raw = Raw(xs.socket, timeout=HANG_GUARD)
    raw.identify(domid)
    return raw


def watch_marker(raw: Raw) -> None:
    """Watch ``marker`` (relative: ``/local/domain/<domid>/marker``); eat the first event."""
    assert raw.call(XsType.WATCH, join("marker", "probe")).type == XsType.WATCH
    event = raw.recv()
    assert event is not None and event.type == XsType.WATCH_EVENT


def probe(good: Raw, read_path: str, expect: bytes, domid: int = FLOOD_DOMID) -> None:
    """The good client (dom0, its own idle connection), right after the flood was sent:
    READ a node and, pipelined behind it, write the marker the flood connection watches."""
    marker = f"/local/domain/{domid}/marker".encode()
    good.send_bytes(
        frame(XsType.READ, read_path.encode() + b"\0", req_id=7)
        + frame(XsType.WRITE, marker + b"\0x", req_id=8)
    )
    msg = good.reply()
    assert msg is not None and msg.type == XsType.READ and msg.payload == expect, msg
    msg = good.reply()
    assert msg is not None and msg.type == XsType.WRITE and msg.req_id == 8, msg


def test_read_flood_on_eight_connections_is_bounded_by_the_budget(server: Xenstored) -> None:
    """Finding 2: 8 connections of one domain pipeline 20-byte READs of a 2 KB node and
    never read a reply.  The domain's unsent output stays within its budget (the old
    server answered a whole read chunk, ~13,000 READs per connection, before pausing)."""
    pid = server.proc.pid
    with Raw(server.socket, timeout=HANG_GUARD) as dom0:
        home = f"/local/domain/{FLOOD_DOMID}"
        conns = [flood_conn(server) for _ in range(8)]
        try:
            assert conns[0].call(XsType.WRITE, b"big\0" + b"v" * 2000).type == XsType.WRITE
            before = rss(pid, "VmRSS")
            request = frame(XsType.READ, b"big\0")
            assert len(request) == 20
            data = request * 15_000  # 300 KB per connection
            sent = push([c.sock for c in conns], data)
            assert all(n >= 64 * 1024 for n in sent), sent
            # Everyone else is still served, and promptly (hang guard only).
            msg = dom0.call(XsType.READ, f"{home}/big".encode() + b"\0", req_id=9)
            assert msg.type == XsType.READ and len(msg.payload) == 2000
            grown = rss(pid, "VmHWM") - before
            assert grown < RSS_MARGIN, f"xenstored grew by {grown >> 20} MB"
            peak = peak_unsent(dom0, FLOOD_DOMID)
            assert 0 < peak <= BUDGET + 2 * (HEADER_SIZE + XENSTORE_PAYLOAD_MAX), peak
        finally:
            for c in conns:
                c.close()
        # The flooding connections are gone; the server is fine.
        assert dom0.call(XsType.READ, f"{home}/domid".encode() + b"\0").payload == b"5"


def test_directory_part_flood_does_not_stall_a_good_client(server: Xenstored) -> None:
    """Finding 3: thousands of pipelined DIRECTORY_PARTs on a 997-child directory (read
    as fast as the server answers) no longer run to completion before anyone else is
    served: the good client's READ and WRITE are handled within the first half of the
    flood (the old server handled all of it first, at 2.5 ms per request)."""
    total = 6000
    with Raw(server.socket, timeout=HANG_GUARD) as dom0:
        assert dom0.call(XsType.WRITE, b"/big\0").type == XsType.WRITE
        assert dom0.call(XsType.SET_PERMS, join("/big", "n0", f"r{FLOOD_DOMID}")).type == (
            XsType.SET_PERMS
        )
        dom0.send_bytes(
            b"".join(frame(XsType.WRITE, b"/big/child-%04d\0x" % i) for i in range(997))
        )
        for _ in range(997):
            reply = dom0.reply()
            assert reply is not None and reply.type == XsType.WRITE
        with flood_conn(server) as flood:
            watch_marker(flood)
            reader = Reader(flood.sock, b"probe")
            reader.start()
            try:
                requests = [frame(XsType.DIRECTORY_PART, b"/big\0%d\0" % 0) for _ in range(total)]
                flood.sock.sendall(b"".join(requests))
                probe(dom0, "/big/child-0500", b"x")
                deadline = time.monotonic() + HANG_GUARD
                while reader.replies < total and time.monotonic() < deadline:
                    time.sleep(0.01)
            finally:
                reader.stop = True
                reader.join(timeout=5)
            assert reader.replies == total and reader.errors == 0
            assert reader.event_after is not None, (
                "the marker's watch event was dropped: the flood connection had more than "
                "watch-event-backlog bytes unsent when the good client was served"
            )
            assert reader.event_after < total // 2, (
                f"the good client was served after {reader.event_after} of {total} flood requests"
            )


def test_mixed_flood_is_bounded_and_fair(server: Xenstored) -> None:
    """Any mix: one domain's connections that never read pipeline READ, DIRECTORY,
    DIRECTORY_PART, GET_PERMS, WRITE and transactions (the domain's whole budget is then
    held by them), while a connection of a second domain floods the same mix and reads;
    memory stays within the budget and the good client is served early."""
    pid = server.proc.pid
    mix = b"".join(
        [
            frame(XsType.READ, b"big\0"),
            frame(XsType.DIRECTORY, b"dir\0"),
            frame(XsType.DIRECTORY_PART, b"dir\0" + b"0\0"),
            frame(XsType.GET_PERMS, b"big\0"),
            frame(XsType.WRITE, b"scratch\0" + b"s" * 10),
            frame(XsType.TRANSACTION_START, b"\0"),
            frame(XsType.READ, b"nonexistent\0"),
            frame(XsType.TRANSACTION_END, b"T\0", tx_id=12345),
        ]
    )
    with Raw(server.socket, timeout=HANG_GUARD) as dom0:
        for domid in (FLOOD_DOMID, SECOND_DOMID):
            with flood_conn(server, domid) as setup:
                assert setup.call(XsType.WRITE, b"big\0" + b"v" * 2000).type == XsType.WRITE
                writes = (frame(XsType.WRITE, b"dir/c%03d\0" % i) for i in range(300))
                setup.send_bytes(b"".join(writes))
                for _ in range(300):
                    reply = setup.reply()
                    assert reply is not None and reply.type == XsType.WRITE
        silent = [flood_conn(server) for _ in range(4)]
        reading = flood_conn(server, SECOND_DOMID)
        try:
            watch_marker(reading)
            before = rss(pid, "VmRSS")
            sent = push([c.sock for c in silent], mix * 4000)
            assert all(n > 0 for n in sent), sent
            reader = Reader(reading.sock, b"probe")
            reader.start()
            total = 800 * 8
            reading.sock.sendall(mix * (total // 8))
            probe(dom0, f"/local/domain/{FLOOD_DOMID}/domid", b"5", SECOND_DOMID)
            deadline = time.monotonic() + HANG_GUARD
            while reader.replies < total and time.monotonic() < deadline:
                time.sleep(0.01)
            reader.stop = True
            reader.join(timeout=5)
            assert reader.replies == total
            assert reader.event_after is not None, (
                "the marker's watch event was dropped: the flood connection had more than "
                "watch-event-backlog bytes unsent when the good client was served"
            )
            assert reader.event_after < total // 2, (
                f"the good client was served after {reader.event_after} of {total} flood requests"
            )
            grown = rss(pid, "VmHWM") - before
            assert grown < RSS_MARGIN, f"xenstored grew by {grown >> 20} MB"
            peak = peak_unsent(dom0, FLOOD_DOMID)
            assert 0 < peak <= BUDGET + 2 * (HEADER_SIZE + XENSTORE_PAYLOAD_MAX), peak
        finally:
            for c in [*silent, reading]:
                c.close()


def test_the_budget_follows_the_outstanding_quota(tmp_path: Path) -> None:
    """``--quota outstanding=N``: a domain's unsent output stays within N maximum-size
    replies (plus the one reply in hand), as ``aioxen-stats`` reports."""
    xs = start_xenstored(tmp_path / "root", "--quota", "outstanding=2")
    try:
        with Raw(xs.socket, timeout=HANG_GUARD) as dom0, flood_conn(xs) as flood:
            budget = stats(dom0)["budget"]
            assert budget == 2 * (HEADER_SIZE + XENSTORE_PAYLOAD_MAX)
            assert flood.call(XsType.WRITE, b"big\0" + b"v" * 2000).type == XsType.WRITE
            sent = push([flood.sock], frame(XsType.READ, b"big\0") * 20_000)
            assert sent[0] > 0
            assert dom0.call(XsType.READ, b"/local/domain/5/domid\0").payload == b"5"
            assert 0 < peak_unsent(dom0, FLOOD_DOMID) <= budget + HEADER_SIZE + XENSTORE_PAYLOAD_MAX
    finally:
        assert xs.alive()
        assert xs.stop() == 0


def test_requests_before_a_half_close_are_all_answered(server: Xenstored) -> None:
    """Requests still buffered (waiting for their turn) when the client shuts down its
    sending side are answered before the server closes the connection."""
    with flood_conn(server) as raw:
        raw.send_bytes(frame(XsType.READ, b"domid\0") * 2000)
        raw.sock.shutdown(socket.SHUT_WR)
        replies = 0
        while (msg := raw.recv()) is not None:
            assert msg.type == XsType.READ and msg.payload == b"5"
            replies += 1
        assert replies == 2000
