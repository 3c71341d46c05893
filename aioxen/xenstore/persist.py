"""Saving and loading an engine's committed state: the serialisation and the file.

[`dump`][] turns an [`Engine`][aioxen.xenstore.engine.Engine]'s committed state (nodes,
introduced domains, SET_TARGET pairs, special-node permissions; never transactions or
watches) into JSON-able data, format ``aioxen-xenstore-1``: values as latin-1 strings (every
byte round-trips), permissions in their wire form (``r3``).  [`restore`][] is its inverse
and checks what it reads (format tag, paths, parents before children, a root).  [`save`][]
replaces the file atomically (written to a temporary file beside it, fsynced, renamed), so a
crash mid-save leaves the previous state intact; [`load`][] reads it back.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from aioxen.xenstore.engine import Engine, Quotas
from aioxen.xenstore.wire import Perm

FORMAT = "aioxen-xenstore-1"


def dump(engine: Engine) -> dict[str, Any]:
    """The committed state as JSON-able data (transactions and watches excluded)."""
    return {
        "format": FORMAT,
        "nodes": [
            [path, node.value.decode("latin-1"), [str(p) for p in node.perms]]
            for path, node in engine.iter_nodes()
        ],
        "introduced": engine.introduced(),
        "targets": sorted(engine.targets.items()),
        "special": {k: [str(p) for p in v] for k, v in engine.special_perms_set().items()},
    }


def restore(data: dict[str, Any], quotas: Quotas | None = None) -> Engine:
    """The engine [`dump`][] described; ``ValueError`` (or ``KeyError``/``TypeError``
    for a malformed document) if ``data`` is not a valid dump."""
    if data.get("format") != FORMAT:
        raise ValueError("not an aioxen xenstore dump")

    def nodes() -> Iterator[tuple[str, bytes, tuple[Perm, ...]]]:
        for path, value, perm_strs in data["nodes"]:
            yield path, value.encode("latin-1"), tuple(Perm.parse(s) for s in perm_strs)

    return Engine.from_tree(
        nodes(),
        introduced=(int(d) for d in data.get("introduced", [])),
        targets=((int(a), int(b)) for a, b in data.get("targets", [])),
        special=((k, tuple(Perm.parse(s) for s in v)) for k, v in data.get("special", {}).items()),
        quotas=quotas,
    )


def save(engine: Engine, path: str) -> None:
    """Write [`dump`][] of ``engine`` to ``path``, atomically."""
    data = json.dumps(dump(engine), separators=(",", ":")).encode()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".xenstore-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load(path: str, quotas: Quotas | None = None) -> Engine:
    """The engine saved at ``path``; ``ValueError`` naming the file if it is corrupt."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return restore(json.loads(raw), quotas)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid aioxen xenstore state file: {exc}") from exc


__all__ = ["FORMAT", "dump", "load", "restore", "save"]
