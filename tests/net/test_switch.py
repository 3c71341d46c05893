"""The learning switch: learning, forwarding, flooding, filtering, ageing, offloads."""

from __future__ import annotations

from dataclasses import dataclass, field

from aioxen.net.netif import PLAIN, FrameInfo
from aioxen.net.switch import LearningSwitch

A, B, C = (bytes.fromhex(f"00163e0000{n:02x}") for n in (1, 2, 3))
BCAST = b"\xff" * 6
MCAST = bytes.fromhex("01005e000001")


@dataclass
class Sink:
    name: str
    accept_csum: bool = True
    accept_gso: bool = True
    got: list[tuple[bytes, FrameInfo]] = field(default_factory=list)

    def send(self, frame: bytes | bytearray | memoryview, info: FrameInfo) -> None:
        self.got.append((bytes(frame), info))


def frame(dst: bytes, src: bytes, body: bytes = b"\x08\x06" + bytes(46)) -> bytes:
    return dst + src + body


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_flood_learn_forward_filter() -> None:
    sw = LearningSwitch()
    pa, pb, pc = Sink("a"), Sink("b"), Sink("c")
    for p in (pa, pb, pc):
        sw.add_port(p)
    sw.input(pa, frame(B, A))  # unknown B: flood, learn A
    assert len(pb.got) == len(pc.got) == 1 and not pa.got
    sw.input(pb, frame(A, B))  # A known: only to a
    assert len(pa.got) == 1 and len(pc.got) == 1
    sw.input(pa, frame(B, A))  # B known now
    assert len(pb.got) == 2 and len(pc.got) == 1
    sw.input(pa, frame(A, A))  # destination on the ingress port: filtered
    assert sw.stats.filtered == 1
    sw.input(pc, frame(BCAST, C))
    sw.input(pc, frame(MCAST, C))
    assert len(pa.got) == 3 and len(pb.got) == 4
    assert sw.table() == {A: "a", B: "b", C: "c"}


def test_station_moves_and_port_removal() -> None:
    sw = LearningSwitch()
    pa, pb, pc = Sink("a"), Sink("b"), Sink("c")
    for p in (pa, pb, pc):
        sw.add_port(p)
    sw.input(pa, frame(BCAST, A))
    sw.input(pb, frame(BCAST, A))  # A moved to b
    assert sw.stats.moved == 1 and sw.table()[A] == "b"
    sw.remove_port(pb)
    assert A not in sw.table()
    sw.input(pc, frame(A, C))  # unknown again: flooded to a only
    assert pa.got[-1][0] == frame(A, C)


def test_ageing_and_bounded_table() -> None:
    clock = Clock()
    sw = LearningSwitch(max_entries=2, ageing=10, clock=clock)
    pa, pb = Sink("a"), Sink("b")
    sw.add_port(pa)
    sw.add_port(pb)
    sw.input(pa, frame(BCAST, A))
    clock.now = 11
    assert sw.lookup(A) is None
    sw.input(pa, frame(BCAST, A))
    sw.input(pa, frame(BCAST, B))
    sw.input(pa, frame(BCAST, C))  # evicts the oldest (A)
    assert set(sw.table()) == {B, C}


def test_offloads_resolved_per_port() -> None:
    from test_offload import l4_ok, tcp4

    sw = LearningSwitch()
    smart, dumb = Sink("smart"), Sink("dumb", accept_csum=False, accept_gso=False)
    src = Sink("src")
    for p in (smart, dumb, src):
        sw.add_port(p)
    f = tcp4(b"d" * 4000)
    f[0:6] = BCAST
    info = FrameInfo(csum_blank=True, gso_type=1, gso_size=1448)
    sw.input(src, bytes(f), info)
    assert smart.got == [(bytes(f), info)]
    assert len(dumb.got) == 3 and all(l4_ok(g) for g, _ in dumb.got)
    sw.input(src, b"\xff" * 6 + b"\x00" * 54, FrameInfo(csum_blank=True))  # not TCP/UDP
    assert sw.stats.dropped == 1
    sw.input(src, frame(BCAST, A), PLAIN)
    assert dumb.got[-1] == (frame(BCAST, A), PLAIN)


def test_runt_frames_dropped() -> None:
    sw = LearningSwitch()
    sw.add_port(Sink("a"))
    sw.input(sw.ports[0], b"\x00" * 10)
    assert sw.stats.dropped == 1
