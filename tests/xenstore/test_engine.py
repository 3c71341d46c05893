"""The engine in-process: domain release and targets, persistence round trips, and a
model-based hypothesis test of the tree against a plain dict."""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from support.xenstored import ClientFactory

from aioxen.platforms.inheap import InHeapWorld
from aioxen.xenstore import Perm, XenStoreClient, XenStoreError, persist
from aioxen.xenstore import paths as P
from aioxen.xenstore.engine import Engine
from aioxen.xenstore.wire import Message, XsType, join


async def test_release_removes_the_domains_nodes_and_acl_entries(
    engine: Engine, inproc: ClientFactory
) -> None:
    root = inproc(0)
    dom = inproc(7)
    await dom.write("data/x", "1")
    await root.write("/shared", "s")
    await root.set_perms("/shared", ["n0", "r7", "r8"])
    async with root.watch("@releaseDomain") as rel, dom.watch("data") as dw:
        assert await rel.next(timeout=5) == "@releaseDomain"
        assert await dw.next(timeout=5) == "data"
        await root.release(7)
        assert await rel.next(timeout=5) == "@releaseDomain"
        with pytest.raises(ConnectionResetError, match="released"):
            await dw.next(timeout=5)
    assert not await root.exists("/local/domain/7/data")
    assert await root.get_perms("/shared") == [Perm(0, "n"), Perm(8, "r")]
    assert not await root.is_domain_introduced(7)
    # A later connection as domid 7 is a new domain: fresh home, introduced again.
    assert await dom.read("domid") == b"7"
    assert not await dom.exists("data/x")


async def test_set_target_grants_the_targets_rights(inproc: ClientFactory) -> None:
    root, stub, guest = inproc(0), inproc(9), inproc(10)
    await guest.write("private", "p")
    with pytest.raises(PermissionError):
        await stub.read("/local/domain/10/private")
    await root.set_target(9, 10)
    assert await stub.read("/local/domain/10/private") == b"p"
    await stub.write("/local/domain/10/private", "from stub")


async def test_special_watch_permissions_can_be_granted(inproc: ClientFactory) -> None:
    root, driver = inproc(0), inproc(11)
    async with driver.watch("@introduceDomain") as w:
        assert await w.next(timeout=5) == "@introduceDomain"  # registration always fires
        await root.introduce(12)
        await asyncio.sleep(0.01)
        assert w.pending() == []  # not privileged: not told
        await root.set_perms("@introduceDomain", ["n0", "r11"])
        with pytest.raises(XenStoreError) as info:  # GET_PERMS takes a <path> (as Xen)
            await root.get_perms("@introduceDomain")
        assert info.value.errno == errno.EINVAL
        await root.introduce(13)
        assert await w.next(timeout=5) == "@introduceDomain"


async def test_unix_identify_creates_home_once(engine: Engine) -> None:
    out: list[Message] = []
    conn = engine.connect(0, out.append)
    conn.handle(Message(XsType.CONTROL, 1, 0, join("aioxen-identify", "21")))
    assert out[-1].payload == b"OK\x00"
    assert engine.nodes["/local/domain/21/domid"].value == b"21"
    assert engine.is_introduced(21)
    conn.handle(Message(XsType.CONTROL, 2, 0, join("aioxen-identify", "0")))
    assert out[-1].type == XsType.ERROR  # no longer privileged
    conn.handle(Message(XsType.CONTROL, 3, 0, join("aioxen-identify", "32752")))
    assert out[-1].type == XsType.ERROR


async def test_watch_reply_precedes_first_event_and_events_precede_write_reply(
    engine: Engine,
) -> None:
    out: list[Message] = []
    conn = engine.connect(0, out.append)
    conn.handle(Message(XsType.WATCH, 1, 0, join("/w", "t")))
    assert [m.type for m in out] == [XsType.WATCH, XsType.WATCH_EVENT]
    out.clear()
    conn.handle(Message(XsType.WRITE, 2, 0, b"/w/x\x00v"))
    assert [m.type for m in out] == [XsType.WATCH_EVENT, XsType.WRITE]
    assert out[0] == Message(XsType.WATCH_EVENT, 0, 0, b"/w/x\x00t\x00")


async def test_persistence_round_trip(
    tmp_path: Path, inproc: ClientFactory, engine: Engine
) -> None:
    xs = inproc(0)
    await xs.write("/a/b", b"\x00\x01\xff\xfe")
    await xs.set_perms("/a/b", ["r3", "b4"])
    await inproc(5).write("k", "v")
    await xs.set_target(6, 5)
    f = tmp_path / "state.json"
    persist.save(engine, str(f))
    again = persist.load(str(f))
    assert persist.dump(again) == persist.dump(engine)
    assert persist.dump(persist.restore(persist.dump(engine))) == persist.dump(engine)
    c = XenStoreClient.in_process(again, 0)
    assert await c.read("/a/b") == b"\x00\x01\xff\xfe"
    assert await c.get_perms("/a/b") == [Perm(3, "r"), Perm(4, "b")]
    assert await c.directory("/local/domain") == ["0", "5"]
    await c.close()
    f.write_text(json.dumps({"format": "aioxen-xenstore-1", "nodes": [["/x", "", ["n0"]]]}))
    try:
        persist.load(str(f))
    except ValueError as exc:
        assert str(f) in str(exc)
    else:  # pragma: no cover
        raise AssertionError("a dump without its root loaded")


def test_inheap_world_store_engine_is_lazy_and_cached() -> None:
    w = InHeapWorld()
    assert w.xenstore_engine is None
    e = w.store_engine()
    assert isinstance(e, Engine) and w.xenstore_engine is e
    assert w.store_engine() is e


def test_engine_state_is_read_only_outside_its_api() -> None:
    """The internal API hands out read-only views: the tree changes only via store()."""
    engine = Engine()
    with pytest.raises(TypeError):
        engine.nodes["/x"] = engine.nodes["/"]  # type: ignore[index]
    with pytest.raises(TypeError):
        engine.targets[1] = 2  # type: ignore[index]
    engine.set_target(3, 4)
    assert dict(engine.targets) == {3: 4}
    assert engine.owned_counts() == {0: len(engine.nodes)}


# ----------------------------------------------------------------- model checking ------

_names = st.sampled_from(["a", "b", "c"])
_paths = st.lists(_names, min_size=1, max_size=3).map(lambda parts: "/m/" + "/".join(parts))


class TreeModel(RuleBasedStateMachine):
    """Random writes, mkdirs, removals and transactions by dom0 behave like a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.engine = Engine()
        self.out: list[Message] = []
        self.conn = self.engine.connect(0, self.out.append)
        self.model: dict[str, bytes] = {"/m": b""}
        self.req = 0
        self.call(XsType.MKDIR, b"/m\x00")

    def call(self, typ: int, payload: bytes, tx: int = 0) -> Message:
        self.req += 1
        self.out.clear()
        self.conn.handle(Message(typ, self.req, tx, payload))
        replies = [m for m in self.out if m.type != XsType.WATCH_EVENT]
        assert len(replies) == 1 and replies[0].req_id == self.req
        return replies[0]

    def _create(self, model: dict[str, bytes], path: str, value: bytes | None) -> None:
        for anc in reversed([path, *P.ancestors(path)]):
            if anc.startswith("/m") and anc not in model:
                model[anc] = b""
        if value is not None:
            model[path] = value

    @rule(path=_paths, value=st.binary(max_size=8))
    def write(self, path: str, value: bytes) -> None:
        assert self.call(XsType.WRITE, path.encode() + b"\x00" + value).type == XsType.WRITE
        self._create(self.model, path, value)

    @rule(path=_paths)
    def mkdir(self, path: str) -> None:
        assert self.call(XsType.MKDIR, path.encode() + b"\x00").type == XsType.MKDIR
        self._create(self.model, path, None)

    @rule(path=_paths)
    def rm(self, path: str) -> None:
        reply = self.call(XsType.RM, path.encode() + b"\x00")
        if P.parent(path) in self.model or path in self.model:
            assert reply.type == XsType.RM
        else:
            assert reply.payload == b"ENOENT\x00"
        for p in [p for p in self.model if P.is_child(p, path)]:
            del self.model[p]

    @rule(
        writes=st.lists(st.tuples(_paths, st.binary(max_size=4)), max_size=4), commit=st.booleans()
    )
    def transaction(self, writes: list[tuple[str, bytes]], commit: bool) -> None:
        tx = int(self.call(XsType.TRANSACTION_START, b"\x00").payload.rstrip(b"\x00"))
        shadow = dict(self.model)
        for path, value in writes:
            self.call(XsType.WRITE, path.encode() + b"\x00" + value, tx)
            self._create(shadow, path, value)
        reply = self.call(XsType.TRANSACTION_END, b"T\x00" if commit else b"F\x00", tx)
        assert reply.type == XsType.TRANSACTION_END
        if commit:
            self.model = shadow

    @rule(path=_paths)
    def read(self, path: str) -> None:
        reply = self.call(XsType.READ, path.encode() + b"\x00")
        if path in self.model:
            assert reply == Message(XsType.READ, self.req, 0, self.model[path])
        else:
            assert reply.payload == b"ENOENT\x00"

    @invariant()
    def tree_matches(self) -> None:
        tree = self.engine.nodes
        nodes = {p: n.value for p, n in tree.items() if P.is_child(p, "/m")}
        assert nodes == self.model
        for p, node in tree.items():
            if p != "/":
                assert P.basename(p) in tree[P.parent(p)].children
            for child in node.children:
                assert P.join(p, child) in tree
        counted: dict[int, int] = {}
        for node in tree.values():
            counted[node.owner] = counted.get(node.owner, 0) + 1
        assert self.engine.owned_counts() == counted


TestTreeModel = TreeModel.TestCase
TestTreeModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_connect_rejects_reserved_domids(engine: Engine) -> None:
    with pytest.raises(ValueError, match="32752"):
        engine.connect(0x7FF0, lambda m: None)
