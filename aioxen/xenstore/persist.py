"""Saving and loading an engine's committed tree to a JSON file.

The file is replaced atomically (written to a temporary file beside it, fsynced, renamed),
so a crash mid-save leaves the previous state intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

from aioxen.xenstore.engine import Engine, Quotas


def save(engine: Engine, path: str) -> None:
    data = json.dumps(engine.dump(), separators=(",", ":")).encode()
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
        return Engine.restore(json.loads(raw), quotas)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid aioxen xenstore state file: {exc}") from exc


__all__ = ["load", "save"]
