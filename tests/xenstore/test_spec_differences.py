"""Issue 14, finding 4: where ``aioxen xenstored`` differed from ``docs/misc/xenstore.txt``
(and Xen's C xenstored).  Each test quotes the sentence it checks; all run against a real
``aioxen xenstored`` process over raw sockets.

To see that no event came, each test ends with a *sentinel*: a write to a watched path
whose event must be the next message; events are delivered in order, so an unwanted
event would have arrived before it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from rawsock import Raw
from support.xenstored import Xenstored, start_xenstored

from aioxen.xenstore.wire import Message, XsType, join


@pytest.fixture(scope="module")
def xs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xenstored]:
    server = start_xenstored(tmp_path_factory.mktemp("spec") / "root")
    yield server
    assert server.alive(), "xenstored died"
    assert server.stop() == 0


def event(r: Raw) -> tuple[bytes, bytes]:
    msg = r.recv()
    assert msg is not None and msg.type == XsType.WATCH_EVENT, msg
    path, token, rest = msg.payload.split(b"\x00")
    assert rest == b""
    return path, token


def call(r: Raw, typ: int, payload: bytes) -> Message:
    """Send and return the reply; events that came first stay in ``r.queue``."""
    r.send(typ, payload, req_id=77)
    held: list[Message] = []
    while True:
        msg = r.recv()
        assert msg is not None, "server closed the connection"
        if msg.type == XsType.WATCH_EVENT:
            held.append(msg)
            continue
        r.queue[:0] = held
        return msg


def sentinel(r: Raw, writer: Raw, path: str) -> None:
    """``r`` watches ``path``; after ``writer`` writes it, its event is the next one."""
    assert call(writer, XsType.WRITE, f"{path}\x00s".encode()).type == XsType.WRITE
    assert event(r) == (path.encode(), b"sentinel")


def test_unknown_message_types_get_enosys(xs: Xenstored) -> None:
    """xs_wire.h's error table has ENOSYS, and Xen's C xenstored (4.17) answers a type it
    has no handler for with it ("Client unknown operation" -> ENOSYS), not EINVAL."""
    with Raw(xs.socket) as r:
        for typ in (20, 27, 99, XsType.WATCH_EVENT, XsType.ERROR):
            assert r.error(typ, b"/x\x00") == "ENOSYS"


def test_special_watch_paths_may_have_any_syntax(xs: Xenstored) -> None:
    """xenstore.txt, WATCH: "<wpath> can be a <path> to watch or @<wspecial>.  In the
    latter case <wspecial> may have any syntax but it matches (according to the rules
    above) only the following special events which are invented by xenstored"."""
    with Raw(xs.socket) as root, Raw(xs.socket) as writer:
        for wpath in (b"@releaseDomain/10", b"@", b"@any thing: at all!", b"@\xff\x01"):
            assert call(root, XsType.WATCH, wpath + b"\x00tok\x00").type == XsType.WATCH
            assert event(root) == (wpath, b"tok")  # "triggered once straight away"
        assert call(root, XsType.WATCH, b"@releaseDomain\x00rel\x00").type == XsType.WATCH
        assert event(root) == (b"@releaseDomain", b"rel")
        assert call(root, XsType.WATCH, b"/spec/s1\x00sentinel\x00").type == XsType.WATCH
        assert event(root) == (b"/spec/s1", b"sentinel")
        # "@releaseDomain" is not a child of "@releaseDomain/10" (the rules above): only
        # the bare name fires on RELEASE.
        assert call(root, XsType.INTRODUCE, join("31", "0", "0")).type == XsType.INTRODUCE
        assert call(root, XsType.RELEASE, join("31")).type == XsType.RELEASE
        assert event(root) == (b"@releaseDomain", b"rel")
        sentinel(root, writer, "/spec/s1")
        # UNWATCH takes the same path, byte for byte.
        assert call(root, XsType.UNWATCH, b"@\xff\x01\x00tok\x00").type == XsType.UNWATCH
        # Still one message limit: a special path longer than 3072 bytes is refused.
        assert root.error(XsType.WATCH, b"@" + b"x" * 3072 + b"\x00t\x00") == "EINVAL"


def test_special_watches_do_not_fire_on_operations_on_root(xs: Xenstored) -> None:
    """xenstore.txt: a special watch "matches ... only the following special events which
    are invented by xenstored: @introduceDomain occurs on INTRODUCE, @releaseDomain occurs
    on ... RELEASE" -- a write or SET_PERMS on ``/`` is neither."""
    with Raw(xs.socket) as root, Raw(xs.socket) as writer:
        for wpath in (b"@introduceDomain", b"@releaseDomain"):
            assert call(root, XsType.WATCH, wpath + b"\x00sp\x00").type == XsType.WATCH
            assert event(root) == (wpath, b"sp")
        assert call(root, XsType.WATCH, b"/spec/s2\x00sentinel\x00").type == XsType.WATCH
        assert event(root) == (b"/spec/s2", b"sentinel")
        perms = call(root, XsType.GET_PERMS, b"/\x00").payload
        assert call(writer, XsType.SET_PERMS, b"/\x00" + perms).type == XsType.SET_PERMS
        value = call(root, XsType.READ, b"/\x00").payload
        assert call(writer, XsType.WRITE, b"/\x00" + value).type == XsType.WRITE
        assert call(writer, XsType.MKDIR, b"/\x00").type == XsType.MKDIR
        sentinel(root, writer, "/spec/s2")


def test_recursive_rm_reports_a_watched_descendant_once(xs: Xenstored) -> None:
    """xenstore.txt, WATCH_EVENT: "if the event was the recursive removal of an parent of
    <wpath>, <epath> is just <wpath>" -- and WATCH: "Each occurring event is matched
    against all the watches currently set up, and each matching watch results in a
    WATCH_EVENT message": one removal, one message per watch and path (the watched node's
    own removal and its parent's removal are the same event for it).  Also through a
    transaction."""
    with Raw(xs.socket) as root, Raw(xs.socket) as writer:
        for tx in (False, True):
            for p in ("/spec/rm/a/b/c", "/spec/rm/a/x"):
                assert call(writer, XsType.WRITE, f"{p}\x00v".encode()).type == XsType.WRITE
            assert call(root, XsType.WATCH, b"/spec/rm/a/b\x00w\x00").type == XsType.WATCH
            assert event(root) == (b"/spec/rm/a/b", b"w")
            assert call(root, XsType.WATCH, b"/spec/rm/s\x00sentinel\x00").type == XsType.WATCH
            assert event(root) == (b"/spec/rm/s", b"sentinel")
            if tx:
                msg = call(writer, XsType.TRANSACTION_START, b"\x00")
                tx_id = int(msg.payload.rstrip(b"\x00"))
                writer.send(XsType.RM, b"/spec/rm/a\x00", req_id=5, tx_id=tx_id)
                assert writer.reply() == Message(XsType.RM, 5, tx_id, b"OK\x00")
                writer.send(XsType.TRANSACTION_END, b"T\x00", req_id=6, tx_id=tx_id)
                assert writer.reply() == Message(XsType.TRANSACTION_END, 6, tx_id, b"OK\x00")
            else:
                assert call(writer, XsType.RM, b"/spec/rm/a\x00").type == XsType.RM
            got = [event(root), event(root)]
            assert sorted(got) == [(b"/spec/rm/a/b", b"w"), (b"/spec/rm/a/b/c", b"w")]
            sentinel(root, writer, "/spec/rm/s")
            for w in (b"/spec/rm/a/b\x00w\x00", b"/spec/rm/s\x00sentinel\x00"):
                assert call(root, XsType.UNWATCH, w).type == XsType.UNWATCH


def test_is_domain_introduced_needs_privilege(xs: Xenstored) -> None:
    """Xen's C xenstored marks IS_DOMAIN_INTRODUCED privileged (XS_FLAG_PRIV): EACCES for
    a guest, as for INTRODUCE/RELEASE ("xenstored prevents its use other than by
    dom0")."""
    with Raw(xs.socket) as guest, Raw(xs.socket) as root:
        guest.identify(32)
        assert guest.error(XsType.IS_DOMAIN_INTRODUCED, b"32\x00") == "EACCES"
        assert call(root, XsType.IS_DOMAIN_INTRODUCED, b"32\x00").payload == b"T\x00"


def test_permissions_of_special_paths(xs: Xenstored) -> None:
    """xenstore.txt, SET_PERMS: "It is possible to set permissions for the special watch
    paths "@introduceDomain" and "@releaseDomain" to enable receiving those watches in
    unprivileged domains."  Only those two: SET_PERMS on another ``@name`` is EINVAL, and
    GET_PERMS takes a <path> (EINVAL for ``@``, as Xen's C xenstored)."""
    with Raw(xs.socket) as root, Raw(xs.socket) as guest:
        guest.identify(33)
        assert root.error(XsType.SET_PERMS, join("@noSuchEvent", "n0")) == "EINVAL"
        assert root.error(XsType.SET_PERMS, join("@releaseDomain/10", "n0")) == "EINVAL"
        assert root.error(XsType.GET_PERMS, b"@releaseDomain\x00") == "EINVAL"
        assert root.error(XsType.GET_PERMS, b"@noSuchEvent\x00") == "EINVAL"
        assert guest.error(XsType.SET_PERMS, join("@introduceDomain", "n33")) == "EACCES"
        assert call(root, XsType.SET_PERMS, join("@introduceDomain", "n0", "r33")).type == (
            XsType.SET_PERMS
        )
        assert call(guest, XsType.WATCH, b"@introduceDomain\x00g\x00").type == XsType.WATCH
        assert event(guest) == (b"@introduceDomain", b"g")
        assert call(root, XsType.INTRODUCE, join("34", "0", "0")).type == XsType.INTRODUCE
        assert event(guest) == (b"@introduceDomain", b"g")
        # Reading is not owning: the guest still may not change them.
        assert guest.error(XsType.SET_PERMS, join("@introduceDomain", "n0", "b33")) == "EACCES"
        assert call(root, XsType.SET_PERMS, join("@introduceDomain", "n0")).type == (
            XsType.SET_PERMS
        )
