"""Interop with the real ``io/ring.h`` macros: a C program built from
``DEFINE_RING_TYPES`` (netif tx/rx, blkif) acts as front or back on a shared ``mmap``'d
file; every pairing of C and Python ends runs the same random scenario and must produce
the same transcript: entries, notify decisions, final-check results and header contents.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ringpeer_driver import (
    CPeer,
    PyPeer,
    build_ringpeer,
    fmt_request,
    request_for,
    run_scenario,
    scenario,
)

from aioxen.rings.sring import ring_entries


@pytest.fixture(scope="module")
def ringpeer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ringpeer(tmp_path_factory.mktemp("ringpeer"))


def _pair(
    exe: Path, front_c: bool, back_c: bool, kind: str, path: Path, nbytes: int, start: int
) -> tuple[CPeer | PyPeer, CPeer | PyPeer]:
    path.write_bytes(b"\xa5" * nbytes)  # garbage: the front must initialise the header
    front: CPeer | PyPeer = (
        CPeer(exe, "front", kind, path, nbytes, start)
        if front_c
        else PyPeer("front", kind, path, nbytes, start)
    )
    back: CPeer | PyPeer = (
        CPeer(exe, "back", kind, path, nbytes, start)
        if back_c
        else PyPeer("back", kind, path, nbytes, start)
    )
    return front, back


CASES = [
    ("tx", 4096, 0),
    ("tx", 4096, 2**32 - 37),
    ("rx", 4096, 2**32 - 300),
    ("blk", 4096, 2**32 - 5),
    ("blk", 4 * 4096, 2**32 - 100),  # ring-page-order 2: 128 entries
    ("blk", 2 * 4096, 2**31 - 3),
]


@pytest.mark.parametrize(("kind", "nbytes", "start"), CASES)
def test_all_pairings_agree(
    ringpeer: Path, tmp_path: Path, kind: str, nbytes: int, start: int
) -> None:
    transcripts: dict[str, list[str]] = {}
    for front_c in (True, False):
        for back_c in (True, False):
            front, back = _pair(ringpeer, front_c, back_c, kind, tmp_path / "ring", nbytes, start)
            try:
                assert front.nr_ents == back.nr_ents
                ops = scenario(seed=start ^ nbytes, nr_ents=front.nr_ents, steps=400)
                name = f"{'C' if front_c else 'Py'}-{'C' if back_c else 'Py'}"
                transcripts[name] = run_scenario(front, back, ops)
            finally:
                front.close()
                back.close()
    reference = transcripts["C-C"]
    for name, t in transcripts.items():
        for i, (a, b) in enumerate(zip(reference, t, strict=True)):
            assert a == b, f"{name} diverges from C-C at step {i}: {b!r} != {a!r}"
    # The scenario really exercised both notify outcomes, index wrap and slot wrap.
    replies = [line.split(" -> ")[1] for line in reference]
    assert "notify 1" in replies and "notify 0" in replies
    assert "more 1" in replies and "more 0" in replies
    produced = sum(int(line.split()[2]) for line in reference if line.startswith("F put"))
    assert produced > 2 * front.nr_ents
    if start > 2**31:
        assert produced > 2**32 - start  # the indices crossed 2**32


def test_first_requests_decode_as_c_wrote_them(ringpeer: Path, tmp_path: Path) -> None:
    nbytes, start = 4096, 2**32 - 2
    for kind in ("tx", "rx", "blk"):
        front, back = _pair(ringpeer, True, False, kind, tmp_path / "ring", nbytes, start)
        try:
            assert front.cmd("put 5") == "ok"
            assert front.cmd("push") == "notify 1"
            got = back.cmd("take").split()[1:]
            assert got == [fmt_request(kind, request_for(kind, start + i)) for i in range(5)]
            assert front.nr_ents == ring_entries(nbytes, back.ring.slot_size)  # type: ignore[union-attr]
        finally:
            front.close()
            back.close()


@pytest.fixture
def c_front_py_back(ringpeer: Path, tmp_path: Path) -> Iterator[tuple[CPeer, PyPeer]]:
    front, back = _pair(ringpeer, True, False, "tx", tmp_path / "ring", 4096, 2**32 - 1)
    assert isinstance(front, CPeer) and isinstance(back, PyPeer)
    yield front, back
    front.close()
    back.close()


def test_notify_suppression_follows_req_event(c_front_py_back: tuple[CPeer, PyPeer]) -> None:
    front, back = c_front_py_back
    # Initially req_event = start + 1: the first push notifies.
    assert front.cmd("put 1") == "ok" and front.cmd("push") == "notify 1"
    # The back end has not re-armed: further pushes are silent.
    assert front.cmd("put 3") == "ok" and front.cmd("push") == "notify 0"
    assert back.cmd("take").count(":") == 4 * 4
    # Re-armed by the final check: the next push notifies, exactly once.
    assert back.cmd("final") == "more 0"
    assert front.cmd("info").split()[2] == str(2**32 - 1 + 4 + 1 - 2**32)  # req_event
    assert front.cmd("put 2") == "ok" and front.cmd("push") == "notify 1"
    assert front.cmd("put 1") == "ok" and front.cmd("push") == "notify 0"
    # Back answers; the front never armed rsp_event past its initial value, which the
    # first push already passed.
    back.cmd("take")
    assert back.cmd("put 7") == "ok" and back.cmd("push") == "notify 1"
    assert back.cmd("final") == "more 0"
