"""The xenstored engine: tree, permissions, transactions, watches, domains and quotas.

Theory of operation
-------------------
The engine is the whole of xenstored except the byte transport.  It has no sockets and no
asyncio: a transport calls [`Engine.connect`][] to obtain an [`EngineConnection`][]
with an output callback ``send(Message)``, then feeds each decoded request to
[`EngineConnection.handle`][].  Everything a connection is owed -- the reply and any watch
events -- goes out through ``send``, in the order Xen's C xenstored produces it (events
caused by a request precede its reply; the first event of a new watch follows the ``OK``).
The Unix-socket server ([`aioxen.xenstore.server`][]) and the in-process transport of the
``inheap`` platform ([`aioxen.xenstore.client`][]) are two such transports over the same
engine.

Tree.  ``path -> Node``; a node has a value (bytes), a permission list and its children's
names.  Nodes are never modified in place: a change replaces the node with a copy carrying a
fresh *generation* number (a global counter), and adding or removing a child replaces the
parent too.  That makes it cheap for a transaction to keep the nodes it looked at.

Permissions (Xen semantics).  The first entry of a node's list is its owner, and its letter
is the access of every domain not listed after it.  A privileged connection (dom0) and the
owner (or a domain whose SET_TARGET is the owner) may do anything; any other domain gets
the letter of its own entry, else the default.  Reading needs ``r``, writing or removing
``w``, creating a node needs ``w`` on its nearest existing ancestor, and SET_PERMS needs
ownership; an unprivileged domain may not give a node away (``EPERM``).  A new node inherits
its parent's list, with the creator as owner when the creator is unprivileged.  A missing
node below a node the caller may not read reports ``EACCES``, not ``ENOENT``.

Transactions (optimistic, validated at commit).  A transaction keeps a private overlay of
every node it touched and, for each path it looked at, the generation it saw (or "absent").
Reads and writes go to the overlay; nothing is visible to others until commit.  At commit
every recorded path must still have the recorded generation, otherwise the commit fails
with ``EAGAIN`` and nothing is applied; on success the overlay is copied into the tree and
the transaction's watch events fire.  Because a child's creation or removal changes its
parent, two transactions creating siblings conflict -- as in Xen.

Watches.  A change at ``P`` fires every watch whose path is ``P`` or an ancestor of it.  For
writes, mkdir, set-perms and the top of a removal (non-exact changes) it also fires watches
*below* ``P``, reporting the watch path.  Each removed descendant fires exactly.  One
operation (a request, or a commit) tells a watch about a path at most once.  A domain is
only told about nodes it may read.  ``@introduceDomain`` and ``@releaseDomain`` fire on
INTRODUCE and RELEASE (and when a Unix-socket domain first identifies itself) and reach
only watches on exactly that name; a special watch path may be any ``@...``; by default
only privileged connections receive them (the owner of one can change its permissions with
SET_PERMS).  A new watch fires once immediately.  Relative watches report relative paths.

Quotas (defaults of Xen 4.17's C xenstored; unprivileged domains only): 1000 nodes per
domain and 2048-byte values (``ENOSPC``), 128 watches (``E2BIG``), 10 open transactions
(``ENOSPC``), 5 permission entries per node (``ENOSPC``), 1024 nodes touched per
transaction (``ENOSPC``).  Inside a transaction each request checks the transaction's own
view; the commit checks the node, node-size, permission and transaction-size quotas again
against the live tree (other transactions of the domain may have committed meanwhile) and
fails with ``ENOSPC``, nothing applied, if one would be exceeded.  Per-connection output
limits are the transport's business (see [`Quotas`][]).

Layout.  [`Engine`][] owns the state and offers an internal API (read-only
[`Engine.nodes`][]/[`Engine.targets`][], and methods that keep ownership counts and
generations consistent); [`EngineConnection`][] implements the requests on top of it,
through a view (the live tree, or a [`Transaction`][]'s overlay).  Serialisation is
[`aioxen.xenstore.persist`][]'s.  One module over 800 lines on purpose: the operations,
views and the engine are one consistency argument (who may change which node, when
events fire, what a commit validates) that reads best in one place.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from aioxen.errors import ProtocolError
from aioxen.xenstore import paths as P
from aioxen.xenstore.wire import (
    NUL,
    PERM_BOTH,
    PERM_OWNER,
    PERM_READ,
    PERM_WRITE,
    XENSTORE_PAYLOAD_MAX,
    Message,
    Perm,
    XsType,
    encode_perms,
    parse_domid,
    parse_perms,
    parse_u32,
    parse_write,
    split,
)

log = logging.getLogger(__name__)

ABSENT = -1
IDENTIFY_COMMAND = b"aioxen-identify"
STATS_COMMAND = b"aioxen-stats"
QUOTA_COMMAND = b"quota"
"""``CONTROL quota`` as in Xen 4.17 (``xenstore-control quota [set NAME VALUE|DOMID]``)."""


@dataclass
class Quotas:
    """Limits, with the defaults of Xen 4.17's C xenstored.  Dom0 is exempt from all.

    ``outstanding`` and ``watch_event_backlog`` are enforced by transports: a transport
    stops reading a domain's requests while more than ``outstanding`` replies are unsent,
    and drops watch events for a connection that has more than ``watch_event_backlog``
    unsent bytes (the analogue of C xenstored's 20 s watch-event timeout).
    """

    nodes: int = 1000
    node_size: int = 2048
    watches: int = 128
    transactions: int = 10
    permissions: int = 5
    transaction_nodes: int = 1024
    outstanding: int = 20
    watch_event_backlog: int = 1 << 20

    def set(self, name: str, value: int) -> None:
        key = name.replace("-", "_")
        if key not in {f.name for f in fields(self)}:
            raise ValueError(
                f"unknown quota {name!r}; known: {', '.join(f.name for f in fields(self))}"
            )
        if value < 0:
            raise ValueError(f"quota {name} must be >= 0")
        setattr(self, key, value)


class _Fail(Exception):
    """An operation fails with an errno (becomes an ERROR reply)."""

    def __init__(self, errnum: int, why: str = "") -> None:
        super().__init__(why)
        self.errnum = errnum


class Node:
    """One immutable tree node."""

    __slots__ = ("_listing", "children", "generation", "perms", "value")

    def __init__(
        self, value: bytes, perms: tuple[Perm, ...], children: tuple[str, ...], generation: int
    ) -> None:
        self.value = value
        self.perms = perms
        self.children = children
        self.generation = generation
        self._listing: bytes | None = None

    def listing(self) -> bytes:
        """The children's names, each NUL-terminated: the DIRECTORY payload.  Built once
        per node (a node is immutable: a new child makes a new node with a new generation),
        so pipelined DIRECTORY/DIRECTORY_PART requests cost no more than a READ."""
        listing = self._listing
        if listing is None:
            listing = self._listing = b"".join(name.encode() + NUL for name in self.children)
        return listing

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    def replace(
        self,
        generation: int,
        *,
        value: bytes | None = None,
        perms: tuple[Perm, ...] | None = None,
        children: tuple[str, ...] | None = None,
    ) -> Node:
        return Node(
            self.value if value is None else value,
            self.perms if perms is None else perms,
            self.children if children is None else children,
            generation,
        )


@dataclass
class _Watch:
    path: str  # absolute, or @special
    token: bytes
    relative: bool


@dataclass
class _Event:
    path: str
    exact: bool
    perms: tuple[tuple[Perm, ...], ...]  # visible to whoever may read under any of these


class _View:
    """Node access for one operation: the live tree, or a transaction's overlay."""

    def get(self, path: str) -> Node | None:
        raise NotImplementedError

    def put(self, path: str, node: Node) -> None:
        raise NotImplementedError

    def delete(self, path: str) -> None:
        raise NotImplementedError

    def event(self, ev: _Event) -> None:
        raise NotImplementedError

    def new_nodes(self, domid: int) -> int:
        """Nodes owned by ``domid`` as this view sees them (for the node quota)."""
        raise NotImplementedError

    def events(self, evs: list[_Event]) -> None:
        """Several events of one operation (duplicates reach a watch once)."""
        raise NotImplementedError

    def note_perms(self, path: str) -> None:
        """``path``'s permission list was set (re-checked against the quota at commit)."""


class _LiveView(_View):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, path: str) -> Node | None:
        return self.engine.nodes.get(path)

    def put(self, path: str, node: Node) -> None:
        self.engine.store(path, node)

    def delete(self, path: str) -> None:
        self.engine.unstore(path)

    def event(self, ev: _Event) -> None:
        self.engine.fire([ev])

    def events(self, evs: list[_Event]) -> None:
        self.engine.fire(evs)

    def new_nodes(self, domid: int) -> int:
        return self.engine.owned(domid)


class Transaction(_View):
    """A transaction's overlay (see the module docstring)."""

    def __init__(self, engine: Engine, conn: EngineConnection, tx_id: int) -> None:
        self.engine = engine
        self.conn = conn
        self.tx_id = tx_id
        self.seen: dict[str, int] = {}
        self.overlay: dict[str, Node | None] = {}
        self.dirty: set[str] = set()
        self.pending: list[_Event] = []
        self.owned_delta: dict[int, int] = {}
        self.perms_set: set[str] = set()

    def _limit(self) -> None:
        quota = self.engine.quotas.transaction_nodes
        if not self.conn.privileged and len(self.overlay) >= quota:
            raise _Fail(errno.ENOSPC, f"transaction touches more than {quota} nodes")

    def get(self, path: str) -> Node | None:
        if path in self.overlay:
            return self.overlay[path]
        self._limit()
        node = self.engine.nodes.get(path)
        self.seen[path] = node.generation if node is not None else ABSENT
        self.overlay[path] = node
        return node

    def _own(self, node: Node | None, delta: int) -> None:
        if node is not None:
            owner = node.owner
            self.owned_delta[owner] = self.owned_delta.get(owner, 0) + delta

    def put(self, path: str, node: Node) -> None:
        old = self.get(path)
        self._own(old, -1)
        self._own(node, +1)
        self.overlay[path] = node
        self.dirty.add(path)

    def delete(self, path: str) -> None:
        self._own(self.get(path), -1)
        self.overlay[path] = None
        self.dirty.add(path)

    def event(self, ev: _Event) -> None:
        self.pending.append(ev)

    def events(self, evs: list[_Event]) -> None:
        self.pending.extend(evs)

    def note_perms(self, path: str) -> None:
        self.perms_set.add(path)

    def new_nodes(self, domid: int) -> int:
        return self.engine.owned(domid) + self.owned_delta.get(domid, 0)

    def conflicts(self) -> bool:
        nodes = self.engine.nodes
        for path, gen in self.seen.items():
            node = nodes.get(path)
            if (node.generation if node is not None else ABSENT) != gen:
                return True
        return False


def perm_for(conn: EngineConnection, perms: tuple[Perm, ...]) -> int:
    """The access mask ``conn`` has on a node with permission list ``perms``."""
    if conn.privileged:
        return PERM_BOTH | PERM_OWNER
    me = conn.domid
    target = conn.engine.targets.get(me)
    owner = perms[0].domid
    if owner == me or (target is not None and owner == target):
        return PERM_BOTH | PERM_OWNER
    for perm in perms[1:]:
        if perm.domid == me or (target is not None and perm.domid == target):
            return perm.mask
    return perms[0].mask


class EngineConnection:
    """One client connection to the engine (a socket, or an in-process client)."""

    def __init__(self, engine: Engine, domid: int, send: Callable[[Message], None]) -> None:
        self.engine = engine
        self.domid = domid
        self.privileged = domid == 0
        self._send = send
        self.watches: dict[tuple[str, bytes], _Watch] = {}
        self.transactions: dict[int, Transaction] = {}
        self.closed = False
        self.on_kill: Callable[[], None] | None = None
        self.dropped_events = 0
        self.event_filter: Callable[[Message], bool] | None = None

    def __repr__(self) -> str:
        return f"<EngineConnection domid={self.domid} watches={len(self.watches)}>"

    # -- entry point ------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """Process one request; the reply (and any events) go out through ``send``."""
        if self.closed:
            return
        try:
            reply = self._dispatch(msg)
        except _Fail as fail:
            if fail.args and fail.args[0]:
                log.debug("domid %d %s: %s", self.domid, msg.type_name, fail.args[0])
            reply = msg.error_reply(fail.errnum)
        except ProtocolError as exc:
            log.debug("domid %d %s: %s", self.domid, msg.type_name, exc)
            reply = msg.error_reply(errno.EINVAL)
        except Exception:  # pragma: no cover - a bug; keep serving everyone else
            log.exception("xenstored engine failed on %s from domid %d", msg, self.domid)
            reply = msg.error_reply(errno.EIO)
        if len(reply.payload) > XENSTORE_PAYLOAD_MAX:
            reply = msg.error_reply(errno.E2BIG)
        self._send(reply)
        if msg.type == XsType.WATCH and reply.type == XsType.WATCH:
            self._initial_event(msg)

    def close(self) -> None:
        """Forget this connection's watches and transactions.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.watches.clear()
        self.transactions.clear()
        self.engine.disconnect(self)

    def deliver_event(self, msg: Message) -> None:
        if self.closed:
            return
        if self.event_filter is not None and not self.event_filter(msg):
            self.dropped_events += 1
            return
        self._send(msg)

    # -- helpers ----------------------------------------------------------------------

    def _view(self, msg: Message) -> _View:
        if msg.tx_id == 0:
            return self.engine.live
        tx = self.transactions.get(msg.tx_id)
        if tx is None:
            raise _Fail(errno.ENOENT, f"no transaction {msg.tx_id}")
        return tx

    def _path(self, raw: bytes) -> str:
        return P.canonicalize(raw, self.domid)[0]

    def _one_path(self, msg: Message) -> str:
        return self._path(split(msg.payload, 1, what="path")[0])

    def _require_privileged(self, what: str) -> None:
        if not self.privileged:
            raise _Fail(errno.EACCES, f"{what} needs a privileged connection")

    def _dispatch(self, msg: Message) -> Message:
        handler = _HANDLERS.get(msg.type)
        if handler is None:
            if msg.type in _UNSUPPORTED:
                raise _Fail(errno.ENOSYS, f"{msg.type_name} not supported")
            raise _Fail(errno.ENOSYS, f"unknown message type {msg.type}")
        return handler(self, msg)

    # -- node access ------------------------------------------------------------------

    def _denied_or_missing(self, view: _View, path: str) -> _Fail:
        for anc in P.ancestors(path):
            node = view.get(anc)
            if node is not None:
                if not perm_for(self, node.perms) & PERM_READ:
                    return _Fail(errno.EACCES, f"{anc} not readable")
                break
        return _Fail(errno.ENOENT, f"{path} does not exist")

    def _get(self, view: _View, path: str, need: int) -> Node:
        node = view.get(path)
        if node is None:
            raise self._denied_or_missing(view, path)
        if perm_for(self, node.perms) & need != need:
            raise _Fail(errno.EACCES, f"{path}: access denied")
        return node

    def _check_size(self, value: bytes) -> None:
        if not self.privileged and len(value) > self.engine.quotas.node_size:
            raise _Fail(errno.ENOSPC, f"value of {len(value)} bytes exceeds node-size quota")

    def _create(self, view: _View, path: str, value: bytes) -> Node:
        """Create ``path`` and any missing ancestors (needs ``w`` on the nearest one)."""
        missing = [path]
        for anc in P.ancestors(path):
            if view.get(anc) is not None:
                break
            missing.append(anc)
        top_parent = P.parent(missing[-1])
        base = view.get(top_parent)
        assert base is not None  # "/" always exists
        if not perm_for(self, base.perms) & PERM_WRITE:
            raise _Fail(errno.EACCES, f"{top_parent}: may not create children")
        engine = self.engine
        if not self.privileged:
            quota = engine.quotas.nodes
            if view.new_nodes(self.domid) + len(missing) > quota:
                raise _Fail(errno.ENOSPC, f"domain {self.domid} would exceed {quota} nodes")
        parent_node = base
        parent_path = top_parent
        node = base
        for npath in reversed(missing):
            perms = parent_node.perms
            if not self.privileged:
                perms = (Perm(self.domid, perms[0].access), *perms[1:])
            node = Node(value if npath == path else b"", perms, (), engine.next_generation())
            view.put(npath, node)
            view.put(
                parent_path,
                parent_node.replace(
                    engine.next_generation(), children=(*parent_node.children, P.basename(npath))
                ),
            )
            parent_node, parent_path = node, npath
        return node

    def _remove_tree(self, view: _View, path: str, node: Node) -> None:
        stack = [(path, node)]
        doomed: list[tuple[str, Node]] = []
        while stack:
            cpath, cnode = stack.pop()
            doomed.append((cpath, cnode))
            for name in cnode.children:
                child_path = P.join(cpath, name)
                child = view.get(child_path)
                if child is not None:
                    stack.append((child_path, child))
        evs: list[_Event] = []
        for cpath, cnode in reversed(doomed):
            view.delete(cpath)
            if cpath != path:
                evs.append(_Event(cpath, True, (cnode.perms,)))
        ppath = P.parent(path)
        pnode = view.get(ppath)
        if pnode is not None:
            name = P.basename(path)
            view.put(
                ppath,
                pnode.replace(
                    self.engine.next_generation(),
                    children=tuple(c for c in pnode.children if c != name),
                ),
            )
        # The top's event reaches a watch below it as the watch's own path, which an
        # existing watched descendant's exact event already reported: sent once (see
        # Engine.fire).
        evs.append(_Event(path, False, (node.perms,)))
        view.events(evs)

    # -- operations -------------------------------------------------------------------

    def op_read(self, msg: Message) -> Message:
        view = self._view(msg)
        node = self._get(view, self._one_path(msg), PERM_READ)
        return msg.reply(XsType.READ, node.value)

    def op_write(self, msg: Message) -> Message:
        view = self._view(msg)
        raw, value = parse_write(msg.payload)
        path = self._path(raw)
        self._check_size(value)
        node = view.get(path)
        if node is None:
            self._create(view, path, value)
            perms = view.get(path).perms  # type: ignore[union-attr]
        else:
            if not perm_for(self, node.perms) & PERM_WRITE:
                raise _Fail(errno.EACCES, f"{path}: not writable")
            view.put(path, node.replace(self.engine.next_generation(), value=value))
            perms = node.perms
        view.event(_Event(path, False, (perms,)))
        return msg.ok_reply()

    def op_mkdir(self, msg: Message) -> Message:
        view = self._view(msg)
        path = self._one_path(msg)
        node = view.get(path)
        if node is not None:
            if not perm_for(self, node.perms) & PERM_WRITE:
                raise _Fail(errno.EACCES, f"{path}: not writable")
            return msg.ok_reply()
        created = self._create(view, path, b"")
        view.event(_Event(path, False, (created.perms,)))
        return msg.ok_reply()

    def op_rm(self, msg: Message) -> Message:
        view = self._view(msg)
        path = self._one_path(msg)
        if path == "/":
            raise _Fail(errno.EINVAL, "cannot remove /")
        node = view.get(path)
        if node is None:
            fail = self._denied_or_missing(view, path)
            if fail.errnum == errno.ENOENT and view.get(P.parent(path)) is not None:
                return msg.ok_reply()
            raise fail
        if not perm_for(self, node.perms) & PERM_WRITE:
            raise _Fail(errno.EACCES, f"{path}: not writable")
        self._remove_tree(view, path, node)
        return msg.ok_reply()

    def op_directory(self, msg: Message) -> Message:
        view = self._view(msg)
        node = self._get(view, self._one_path(msg), PERM_READ)
        payload = node.listing()
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            raise _Fail(errno.E2BIG, "directory listing too long; use DIRECTORY_PART")
        return msg.reply(XsType.DIRECTORY, payload)

    def op_directory_part(self, msg: Message) -> Message:
        view = self._view(msg)
        raw_path, raw_off = split(msg.payload, 2, what="DIRECTORY_PART payload")
        node = self._get(view, self._path(raw_path), PERM_READ)
        offset = parse_u32(raw_off, "offset")
        listing = node.listing()
        if offset > len(listing) or (offset and listing[offset - 1] != 0):
            raise _Fail(errno.EINVAL, f"offset {offset} is not at a name boundary")
        head = str(node.generation).encode() + NUL
        room = XENSTORE_PAYLOAD_MAX - len(head) - 1
        chunk = listing[offset : offset + room]
        if offset + len(chunk) < len(listing):
            cut = chunk.rfind(NUL) + 1
            if cut == 0:
                raise _Fail(errno.E2BIG, "child name too long")
            return msg.reply(XsType.DIRECTORY_PART, head + chunk[:cut])
        return msg.reply(XsType.DIRECTORY_PART, head + chunk + NUL)

    def op_get_perms(self, msg: Message) -> Message:
        # GET_PERMS takes a <path>; "@name" is one only for WATCH and SET_PERMS (EINVAL,
        # as Xen's C xenstored answers).
        raw = split(msg.payload, 1, what="path")[0]
        view = self._view(msg)
        node = self._get(view, self._path(raw), PERM_READ)
        return msg.reply(XsType.GET_PERMS, encode_perms(node.perms))

    def op_set_perms(self, msg: Message) -> Message:
        parts = split(msg.payload, what="SET_PERMS payload")
        if len(parts) < 2:
            raise _Fail(errno.EINVAL, "SET_PERMS needs a path and at least one permission")
        perms = parse_perms(parts[1:])
        if not self.privileged and len(perms) > self.engine.quotas.permissions:
            raise _Fail(errno.ENOSPC, f"more than {self.engine.quotas.permissions} permissions")
        raw = parts[0]
        if raw.startswith(b"@"):
            name = P.canonicalize_watch(raw, self.domid)[0]
            if name not in P.SPECIAL_WATCHES:
                raise _Fail(errno.EINVAL, f"{name} is not a special node")
            current = self.engine.special_perms(name)
            if not perm_for(self, current) & PERM_OWNER:
                raise _Fail(errno.EACCES, f"SET_PERMS on {name}: not its owner")
            if not self.privileged and perms[0].domid != current[0].domid:
                raise _Fail(errno.EPERM, f"{name}: only a privileged domain may change the owner")
            self.engine.set_special_perms(name, perms)
            return msg.ok_reply()
        view = self._view(msg)
        path = self._path(raw)
        node = self._get(view, path, PERM_OWNER)
        if not self.privileged and perms[0].domid != node.owner:
            raise _Fail(errno.EPERM, f"{path}: only a privileged domain may change the owner")
        view.put(path, node.replace(self.engine.next_generation(), perms=perms))
        view.note_perms(path)
        view.event(_Event(path, False, (node.perms, perms)))
        return msg.ok_reply()

    def op_watch(self, msg: Message) -> Message:
        raw_path, token = split(msg.payload, 2, what="WATCH payload")
        path, relative = P.canonicalize_watch(raw_path, self.domid)
        key = (path, token)
        if key in self.watches:
            raise _Fail(errno.EEXIST, f"watch {path} {token!r} exists")
        if not self.privileged:
            quota = self.engine.quotas.watches
            if self.engine.domain_watches(self.domid) >= quota:
                raise _Fail(errno.E2BIG, f"domain {self.domid} has {quota} watches")
        self.watches[key] = _Watch(path, token, relative)
        return msg.ok_reply()

    def _initial_event(self, msg: Message) -> None:
        raw_path, token = split(msg.payload, 2, what="WATCH payload")
        self.deliver_event(Message(XsType.WATCH_EVENT, 0, 0, raw_path + NUL + token + NUL))

    def op_unwatch(self, msg: Message) -> Message:
        raw_path, token = split(msg.payload, 2, what="UNWATCH payload")
        path, _ = P.canonicalize_watch(raw_path, self.domid)
        if self.watches.pop((path, token), None) is None:
            raise _Fail(errno.ENOENT, f"no watch {path} {token!r}")
        return msg.ok_reply()

    def op_reset_watches(self, msg: Message) -> Message:
        self.watches.clear()
        self.transactions.clear()
        return msg.ok_reply()

    def op_transaction_start(self, msg: Message) -> Message:
        if msg.tx_id != 0:
            raise _Fail(errno.EBUSY, "TRANSACTION_START inside a transaction")
        engine = self.engine
        if not self.privileged:
            quota = engine.quotas.transactions
            if engine.domain_transactions(self.domid) >= quota:
                raise _Fail(errno.ENOSPC, f"domain {self.domid} has {quota} transactions open")
        tx_id = engine.new_transaction_id()
        self.transactions[tx_id] = Transaction(engine, self, tx_id)
        return msg.reply(XsType.TRANSACTION_START, str(tx_id).encode() + NUL)

    def op_transaction_end(self, msg: Message) -> Message:
        tx = self.transactions.get(msg.tx_id)
        if tx is None:
            raise _Fail(errno.ENOENT, f"no transaction {msg.tx_id}")
        arg = split(msg.payload, 1, what="TRANSACTION_END payload")[0]
        if arg not in (b"T", b"F"):
            raise _Fail(errno.EINVAL, f"TRANSACTION_END argument {arg!r} is not T or F")
        del self.transactions[msg.tx_id]
        if arg == b"T":
            self.engine.commit(tx)
        return msg.ok_reply()

    def op_get_domain_path(self, msg: Message) -> Message:
        domid = parse_domid(split(msg.payload, 1, what="domid")[0])
        return msg.reply(XsType.GET_DOMAIN_PATH, P.home(domid).encode() + NUL)

    def op_is_domain_introduced(self, msg: Message) -> Message:
        self._require_privileged("IS_DOMAIN_INTRODUCED")
        domid = parse_domid(split(msg.payload, 1, what="domid")[0])
        return msg.reply(
            XsType.IS_DOMAIN_INTRODUCED, b"T\x00" if self.engine.is_introduced(domid) else b"F\x00"
        )

    def op_introduce(self, msg: Message) -> Message:
        self._require_privileged("INTRODUCE")
        parts = split(msg.payload, what="INTRODUCE payload")
        if len(parts) < 3:
            raise _Fail(errno.EINVAL, "INTRODUCE needs domid, mfn and event channel")
        domid = parse_domid(parts[0])
        if domid == 0:
            raise _Fail(errno.EINVAL, "domain 0 cannot be introduced")
        self.engine.introduce(domid)
        return msg.ok_reply()

    def op_release(self, msg: Message) -> Message:
        self._require_privileged("RELEASE")
        domid = parse_domid(split(msg.payload, 1, what="domid")[0])
        if domid == 0:
            raise _Fail(errno.EINVAL, "domain 0 cannot be released")
        if not self.engine.is_introduced(domid):
            raise _Fail(errno.ENOENT, f"domain {domid} is not introduced")
        self.engine.release(domid)
        return msg.ok_reply()

    def op_resume(self, msg: Message) -> Message:
        self._require_privileged("RESUME")
        parse_domid(split(msg.payload, 1, what="domid")[0])
        return msg.ok_reply()

    def op_set_target(self, msg: Message) -> Message:
        self._require_privileged("SET_TARGET")
        raw_dom, raw_target = split(msg.payload, 2, what="SET_TARGET payload")
        domid, target = parse_domid(raw_dom), parse_domid(raw_target)
        self.engine.set_target(domid, target)
        return msg.ok_reply()

    def op_control(self, msg: Message) -> Message:
        parts = split(msg.payload, what="CONTROL payload")
        if not parts:
            raise _Fail(errno.EINVAL, "empty CONTROL")
        self._require_privileged("CONTROL")
        command, args = parts[0], parts[1:]
        if command == IDENTIFY_COMMAND:
            if len(args) != 1:
                raise _Fail(errno.EINVAL, "aioxen-identify takes one domid")
            self.identify(parse_domid(args[0]))
            return msg.ok_reply()
        if command == STATS_COMMAND:
            return msg.reply(XsType.CONTROL, json.dumps(self.engine.stats()).encode() + NUL)
        if command == b"print":
            log.info("xenstore print: %s", b" ".join(args).decode("ascii", "replace"))
            return msg.ok_reply()
        if command == QUOTA_COMMAND:
            return msg.reply(XsType.CONTROL, self._control_quota(args))
        if command == b"help":
            names = (IDENTIFY_COMMAND, STATS_COMMAND, QUOTA_COMMAND, b"print", b"help")
            return msg.reply(XsType.CONTROL, b"\n".join(names) + b"\n\x00")
        raise _Fail(errno.EINVAL, f"unknown CONTROL command {command!r}")

    def _control_quota(self, args: list[bytes]) -> bytes:
        """``quota``: the settings; ``quota set NAME VALUE``: change one (VALUE >= 1, as
        Xen; it applies from the next request on, and to commits of open transactions);
        ``quota DOMID``: what that domain holds against its quotas."""
        engine = self.engine
        if not args:
            lines = ["Quota settings:"]
            for f in fields(engine.quotas):
                name = f.name.replace("_", "-")
                lines.append(f"{name:<19}: {getattr(engine.quotas, f.name):8d}")
            return ("\n".join(lines) + "\n").encode() + NUL
        if args[0] == b"set":
            if len(args) != 3 or not args[2].isdigit() or int(args[2]) < 1:
                raise _Fail(errno.EINVAL, "quota set takes a name and a value >= 1")
            try:
                engine.quotas.set(args[1].decode("ascii", "replace"), int(args[2]))
            except ValueError as exc:
                raise _Fail(errno.EINVAL, str(exc)) from None
            log.info("quota %s set to %s", args[1].decode("ascii", "replace"), int(args[2]))
            return b"OK" + NUL
        if len(args) != 1:
            raise _Fail(errno.EINVAL, "quota takes no argument, set NAME VALUE, or a domid")
        domid = parse_domid(args[0])
        text = (
            f"Domain {domid}:\n"
            f"nodes: {engine.owned(domid)}\n"
            f"watches: {engine.domain_watches(domid)}\n"
            f"transactions: {engine.domain_transactions(domid)}\n"
        )
        return text.encode() + NUL

    def identify(self, domid: int) -> None:
        """Make this connection act as ``domid`` (see [`aioxen.xenstore.server`][])."""
        if domid >= 0x7FF0:
            raise _Fail(errno.EINVAL, f"domid {domid} is reserved")
        if self.watches or self.transactions:
            raise _Fail(errno.EBUSY, "identify before setting watches or transactions")
        self.domid = domid
        self.privileged = domid == 0
        self.engine.ensure_home(domid)
        if domid != 0 and not self.engine.is_introduced(domid):
            self.engine.introduce(domid)


_Handler = Callable[[EngineConnection, Message], Message]
_HANDLERS: dict[int, _Handler] = {
    XsType.CONTROL: EngineConnection.op_control,
    XsType.DIRECTORY: EngineConnection.op_directory,
    XsType.READ: EngineConnection.op_read,
    XsType.GET_PERMS: EngineConnection.op_get_perms,
    XsType.WATCH: EngineConnection.op_watch,
    XsType.UNWATCH: EngineConnection.op_unwatch,
    XsType.TRANSACTION_START: EngineConnection.op_transaction_start,
    XsType.TRANSACTION_END: EngineConnection.op_transaction_end,
    XsType.INTRODUCE: EngineConnection.op_introduce,
    XsType.RELEASE: EngineConnection.op_release,
    XsType.GET_DOMAIN_PATH: EngineConnection.op_get_domain_path,
    XsType.WRITE: EngineConnection.op_write,
    XsType.MKDIR: EngineConnection.op_mkdir,
    XsType.RM: EngineConnection.op_rm,
    XsType.SET_PERMS: EngineConnection.op_set_perms,
    XsType.IS_DOMAIN_INTRODUCED: EngineConnection.op_is_domain_introduced,
    XsType.RESUME: EngineConnection.op_resume,
    XsType.SET_TARGET: EngineConnection.op_set_target,
    XsType.RESET_WATCHES: EngineConnection.op_reset_watches,
    XsType.DIRECTORY_PART: EngineConnection.op_directory_part,
}
_UNSUPPORTED = {XsType.GET_FEATURE, XsType.SET_FEATURE, XsType.GET_QUOTA, XsType.SET_QUOTA}


class Engine:
    """A complete XenStore (see the module docstring).  Not thread-safe; one event loop.

    Its state is private; the rest of this module ([`EngineConnection`][],
    [`Transaction`][]) and [`aioxen.xenstore.persist`][] use the *internal API* below
    (public names, documented, for this package only): the read-only mappings
    [`nodes`][] and [`targets`][], and methods that change state while keeping the
    ownership counts, [`modified`][] and the generation counter consistent.
    """

    def __init__(self, quotas: Quotas | None = None) -> None:
        """A fresh store: ``/``, ``/local/domain/0`` and ``/tool/xenstored``."""
        self._setup(quotas)
        root = (Perm(0, "n"),)
        self.store("/", Node(b"", root, (), self.next_generation()))
        for path in ("/local", "/local/domain", "/tool", "/tool/xenstored"):
            self._make(path, b"", root)
        self._make("/local/domain/0/domid", b"0", root)
        self._make("/local/domain/0/name", b"Domain-0", root)

    def _setup(self, quotas: Quotas | None) -> None:
        """The empty state (no nodes, not even ``/``)."""
        self.quotas = quotas or Quotas()
        self._gen = 0
        self._tx_counter = 0
        self._nodes: dict[str, Node] = {}
        self._owned: dict[int, int] = {}
        self._conns: set[EngineConnection] = set()
        self._introduced: set[int] = set()
        self._targets: dict[int, int] = {}
        self._special: dict[str, tuple[Perm, ...]] = {}
        self.nodes: Mapping[str, Node] = MappingProxyType(self._nodes)
        """The committed tree, ``path -> Node`` (read-only; change it with [`store`][]
        and [`unstore`][])."""
        self.targets: Mapping[int, int] = MappingProxyType(self._targets)
        """SET_TARGET: ``domid -> target domid`` (read-only; see [`set_target`][])."""
        self.live: _View = _LiveView(self)
        """The view of requests outside a transaction: straight on the committed tree."""
        self.stats_extra: Callable[[], dict[str, Any]] | None = None
        """A transport's own counters for ``aioxen-stats`` (the server's budgets)."""
        self.modified = 0
        """Counts committed changes (persistence polls it)."""

    # -- internal API: the tree ------------------------------------------------------

    def next_generation(self) -> int:
        """A fresh generation number for a new or replaced node (a global counter)."""
        self._gen += 1
        return self._gen

    def store(self, path: str, node: Node) -> None:
        """Commit ``node`` at ``path`` (new or replacing), keeping the ownership counts.

        No checks and no watch events: callers have done both."""
        old = self._nodes.get(path)
        if old is not None:
            self._owned[old.owner] -= 1
        self._nodes[path] = node
        self._owned[node.owner] = self._owned.get(node.owner, 0) + 1
        self.modified += 1

    def unstore(self, path: str) -> None:
        """Remove the node at ``path`` alone (not its children, not the parent's list)."""
        old = self._nodes.pop(path, None)
        if old is not None:
            self._owned[old.owner] -= 1
            self.modified += 1

    def _make(self, path: str, value: bytes, perms: tuple[Perm, ...]) -> None:
        """Create or overwrite ``path`` (and missing ancestors) with ``perms``; no checks."""
        for anc in reversed(P.ancestors(path)):
            if anc not in self._nodes:
                self._make(anc, b"", perms)
        ppath = P.parent(path)
        if path not in self._nodes and path != "/":
            pnode = self._nodes[ppath]
            self.store(
                ppath,
                pnode.replace(self.next_generation(), children=(*pnode.children, P.basename(path))),
            )
            self.store(path, Node(value, perms, (), self.next_generation()))
        else:
            self.store(path, self._nodes[path].replace(self.next_generation(), value=value))
        self.fire([_Event(path, False, (perms,))])

    def owned(self, domid: int) -> int:
        """How many committed nodes ``domid`` owns (the node quota counts these)."""
        return self._owned.get(domid, 0)

    def owned_counts(self) -> dict[int, int]:
        """``domid -> nodes owned`` for every domain owning at least one node."""
        return {domid: n for domid, n in self._owned.items() if n}

    # -- internal API: connections, transactions, domains -----------------------------

    def disconnect(self, conn: EngineConnection) -> None:
        """Forget ``conn`` (called by [`EngineConnection.close`][])."""
        self._conns.discard(conn)

    def new_transaction_id(self) -> int:
        """A transaction id (1..2**32-1) no open transaction of any connection uses."""
        in_use = {tx for conn in self._conns for tx in conn.transactions}
        while True:
            self._tx_counter = (self._tx_counter % 0xFFFFFFFF) + 1
            if self._tx_counter not in in_use:
                return self._tx_counter

    def domain_watches(self, domid: int) -> int:
        """Watches held by all connections of ``domid`` (the watch quota)."""
        return sum(len(c.watches) for c in self._conns if c.domid == domid)

    def domain_transactions(self, domid: int) -> int:
        """Open transactions of all connections of ``domid`` (the transaction quota)."""
        return sum(len(c.transactions) for c in self._conns if c.domid == domid)

    def special_perms(self, name: str) -> tuple[Perm, ...]:
        """The permission list of the special watch node ``name`` (``@introduceDomain``,
        ``@releaseDomain``); dom0-only by default."""
        return self._special.get(name, (Perm(0, "n"),))

    def set_special_perms(self, name: str, perms: tuple[Perm, ...]) -> None:
        """SET_PERMS on a special node (the caller checked ownership)."""
        self._special[name] = perms

    def special_perms_set(self) -> dict[str, tuple[Perm, ...]]:
        """The special nodes whose permissions were set, with their lists."""
        return dict(self._special)

    def set_target(self, domid: int, target: int) -> None:
        """SET_TARGET: ``domid`` acts with ``target``'s rights from now on."""
        self._targets[domid] = target

    def introduced(self) -> list[int]:
        """The introduced domains, sorted (dom0 is always introduced, never listed)."""
        return sorted(self._introduced)

    def commit(self, tx: Transaction) -> None:
        """Apply ``tx`` whole, or fail with nothing applied.

        Conflicts fail with ``EAGAIN``.  Then every quota is checked again against the
        tree as it is *now* and the quotas in force now, because each request inside the
        transaction could only check its own view (other transactions of the same domain
        may have committed meanwhile): ``ENOSPC`` if the commit would leave a domain
        owning more than ``nodes`` nodes, or a value written (permission list set) by
        the transaction over ``node_size`` (``permissions``), or the transaction touching
        more than ``transaction_nodes`` nodes.  Nothing is changed before all checks
        passed.
        """
        if tx.conflicts():
            raise _Fail(errno.EAGAIN, f"transaction {tx.tx_id} conflicts")
        if not tx.conn.privileged:
            self._check_commit_quotas(tx)
        for path in sorted(tx.dirty, key=len):
            node = tx.overlay[path]
            if node is None:
                self.unstore(path)
            else:
                self.store(path, node.replace(self.next_generation()))
        self.fire(tx.pending)

    def _check_commit_quotas(self, tx: Transaction) -> None:
        q = self.quotas
        where = f"transaction {tx.tx_id} of domain {tx.conn.domid}"
        for domid, delta in sorted(tx.owned_delta.items()):
            if domid == 0 or delta <= 0:
                continue
            total = self._owned.get(domid, 0) + delta
            if total > q.nodes:
                raise _Fail(
                    errno.ENOSPC,
                    f"{where}: commit would leave domain {domid} owning {total} nodes "
                    f"(quota {q.nodes})",
                )
        if len(tx.overlay) > q.transaction_nodes:
            raise _Fail(
                errno.ENOSPC,
                f"{where} touches {len(tx.overlay)} nodes (quota {q.transaction_nodes})",
            )
        for path in tx.dirty:
            node = tx.overlay[path]
            if node is None:
                continue
            live = self._nodes.get(path)
            if len(node.value) > q.node_size and (live is None or live.value != node.value):
                raise _Fail(
                    errno.ENOSPC,
                    f"{where}: {path} value of {len(node.value)} bytes exceeds node-size "
                    f"quota {q.node_size}",
                )
            if path in tx.perms_set and len(node.perms) > q.permissions:
                raise _Fail(
                    errno.ENOSPC,
                    f"{where}: {path} has {len(node.perms)} permissions (quota {q.permissions})",
                )

    def fire(self, evs: list[_Event]) -> None:
        """Deliver the events of one operation (a request, or a commit).

        A watch hears about a path at most once per operation: a recursive removal
        reports a watch below the removed node as the watch's own path, and an existing
        watched node's exact removal event says the same.  Special watches (``@name``)
        match only special events, never operations on ``/``.
        """
        sent: set[tuple[int, str, bytes, str]] = set()
        for ev in evs:
            special = ev.path.startswith("@")
            for conn in list(self._conns):
                if not conn.watches:
                    continue
                if not conn.privileged and not any(
                    perm_for(conn, perms) & PERM_READ for perms in ev.perms
                ):
                    continue
                for watch in list(conn.watches.values()):
                    if special != watch.path.startswith("@"):
                        continue
                    if special:
                        if watch.path != ev.path:
                            continue
                        report = ev.path
                    elif P.is_child(ev.path, watch.path):
                        report = ev.path
                    elif not ev.exact and P.is_child(watch.path, ev.path):
                        report = watch.path
                    else:
                        continue
                    if len(evs) > 1:
                        key = (id(conn), watch.path, watch.token, report)
                        if key in sent:
                            continue
                        sent.add(key)
                    if watch.relative:
                        report = P.relativize(report, conn.domid)
                    payload = report.encode("latin-1") + NUL + watch.token + NUL
                    if len(payload) > XENSTORE_PAYLOAD_MAX:
                        conn.dropped_events += 1
                        continue
                    conn.deliver_event(Message(XsType.WATCH_EVENT, 0, 0, payload))

    # -- public API ------------------------------------------------------------------

    def connect(self, domid: int, send: Callable[[Message], None]) -> EngineConnection:
        """A new connection acting as ``domid`` (0 is privileged).

        For ``domid != 0`` this is what an identify does: the domain's home is created
        and the domain counts as introduced.
        """
        if not 0 <= domid < 0x7FF0:
            raise ValueError(f"domid {domid} out of range 0..{0x7FF0 - 1}")
        conn = EngineConnection(self, 0, send)
        self._conns.add(conn)
        if domid != 0:
            conn.identify(domid)
        return conn

    def ensure_home(self, domid: int) -> None:
        """Create ``/local/domain/<domid>`` (owned by it) and its ``domid`` key if missing,
        as the toolstack does when it builds a domain."""
        home = P.home(domid)
        perms = (Perm(domid, "n"),)
        if home not in self._nodes:
            self._make(home, b"", perms)
        if f"{home}/domid" not in self._nodes:
            self._make(f"{home}/domid", str(domid).encode(), perms)

    def is_introduced(self, domid: int) -> bool:
        return domid == 0 or domid in self._introduced

    def introduce(self, domid: int) -> None:
        if domid in self._introduced:
            return
        self._introduced.add(domid)
        self.fire([_Event(P.INTRODUCE_DOMAIN, True, (self.special_perms(P.INTRODUCE_DOMAIN),))])

    def release(self, domid: int) -> None:
        """Forget a domain: its connections die, its nodes go, others' ACLs drop it."""
        self._introduced.discard(domid)
        self._targets.pop(domid, None)
        for conn in [c for c in self._conns if c.domid == domid]:
            conn.close()
            if conn.on_kill is not None:
                conn.on_kill()
        doomed = sorted((p for p, n in self._nodes.items() if n.owner == domid), key=len)
        for path in doomed:
            node = self._nodes.get(path)
            if node is not None and node.owner == domid:
                self._remove_tree(path, node)
        for path, node in list(self._nodes.items()):
            if any(p.domid == domid for p in node.perms[1:]):
                perms = (node.perms[0], *(p for p in node.perms[1:] if p.domid != domid))
                self.store(path, node.replace(self.next_generation(), perms=perms))
        self.fire([_Event(P.RELEASE_DOMAIN, True, (self.special_perms(P.RELEASE_DOMAIN),))])

    def _remove_tree(self, path: str, node: Node) -> None:
        dom0 = EngineConnection(self, 0, lambda m: None)
        dom0._remove_tree(self.live, path, node)

    def stats(self) -> dict[str, Any]:
        extra = self.stats_extra() if self.stats_extra is not None else {}
        return extra | {
            "nodes": len(self._nodes),
            "generation": self._gen,
            "connections": [
                {
                    "domid": c.domid,
                    "watches": len(c.watches),
                    "transactions": len(c.transactions),
                    "dropped_events": c.dropped_events,
                }
                for c in self._conns
            ],
            "introduced": sorted(self._introduced),
        }

    def iter_nodes(self) -> Iterator[tuple[str, Node]]:
        """All nodes, parents before children."""
        return iter(sorted(self._nodes.items(), key=lambda item: (item[0].count("/"), item[0])))

    @classmethod
    def from_tree(
        cls,
        nodes: Iterable[tuple[str, bytes, tuple[Perm, ...]]],
        *,
        introduced: Iterable[int] = (),
        targets: Iterable[tuple[int, int]] = (),
        special: Iterable[tuple[str, tuple[Perm, ...]]] = (),
        quotas: Quotas | None = None,
    ) -> Engine:
        """An engine holding exactly ``nodes`` (``(path, value, perms)``, parents before
        children, ``/`` first) and the given domain state: what
        [`aioxen.xenstore.persist.restore`][] rebuilds from a saved file.  ``ValueError``
        for a bad path, an empty permission list, a node before its parent, no root."""
        engine = cls.__new__(cls)
        engine._setup(quotas)
        for path, value, perms in nodes:
            if path != "/":
                P.validate_absolute(path)
            if not perms:
                raise ValueError(f"node {path} has no permissions")
            node = Node(value, perms, (), engine.next_generation())
            if path != "/":
                ppath = P.parent(path)
                pnode = engine._nodes.get(ppath)
                if pnode is None:
                    raise ValueError(f"node {path} listed before its parent")
                engine.store(
                    ppath,
                    pnode.replace(pnode.generation, children=(*pnode.children, P.basename(path))),
                )
            engine.store(path, node)
        if "/" not in engine._nodes:
            raise ValueError("dump has no root node")
        engine._introduced.update(introduced)
        engine._targets.update(targets)
        engine._special.update(special)
        return engine


__all__ = [
    "IDENTIFY_COMMAND",
    "Engine",
    "EngineConnection",
    "Node",
    "Quotas",
    "Transaction",
    "perm_for",
]
