"""XenStore path rules (``docs/misc/xenstore.txt``), pure.

Theory of operation
-------------------
A node path is absolute (``/local/domain/3/data``) or relative to the caller's home
``/local/domain/<domid>``.  Allowed characters are ASCII letters, digits and ``-/_@``;
doubled slashes, trailing slashes (except the root ``/``) and the empty path are forbidden,
and so is anything longer than ``XENSTORE_ABS_PATH_MAX`` (3072) after resolution or
``XENSTORE_REL_PATH_MAX`` (2048) as sent.  ``.`` is not an allowed character, so ``..``
can never climb out of a subtree.  Watch paths may instead be ``@<wspecial>`` of any
syntax (the spec: "<wspecial> may have any syntax"); only ``@introduceDomain`` and
``@releaseDomain`` ever fire (besides a new watch's first event).

A path is a *child* of another if it is identical to it, or the other is ``/``, or the
other followed by ``/`` is a prefix of it (so ``/a`` is a child of itself).
"""

from __future__ import annotations

import re

from aioxen.errors import ProtocolError
from aioxen.xenstore.wire import XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX

_VALID = re.compile(r"[A-Za-z0-9\-/_@]*")
INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_WATCHES = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)


def home(domid: int) -> str:
    """A domain's home path, the base of its relative paths."""
    return f"/local/domain/{domid}"


def _decode(raw: bytes | str) -> str:
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(f"path {raw!r} is not ASCII", field="path") from None
    return text


def _check_chars(text: str) -> None:
    if not _VALID.fullmatch(text):
        bad = next(c for c in text if not _VALID.fullmatch(c))
        raise ProtocolError(f"path {text!r} contains invalid character {bad!r}", field="path")


def canonicalize(raw: bytes | str, domid: int) -> tuple[str, bool]:
    """Resolve and validate a node path; returns ``(absolute_path, was_relative)``.

    ``ProtocolError`` (``field="path"``) names what is wrong.
    """
    text = _decode(raw)
    if not text:
        raise ProtocolError("empty path", field="path")
    if text.startswith("@"):
        raise ProtocolError(f"special path {text!r} is only valid for watches", field="path")
    relative = not text.startswith("/")
    if relative:
        if len(text) > XENSTORE_REL_PATH_MAX:
            raise ProtocolError(
                f"relative path of {len(text)} bytes exceeds XENSTORE_REL_PATH_MAX "
                f"({XENSTORE_REL_PATH_MAX})",
                field="path",
            )
        text = f"{home(domid)}/{text}"
    validate_absolute(text)
    return text, relative


def validate_absolute(text: str) -> None:
    if not text.startswith("/"):
        raise ProtocolError(f"path {text!r} is not absolute", field="path")
    if len(text) > XENSTORE_ABS_PATH_MAX:
        raise ProtocolError(
            f"path of {len(text)} bytes exceeds XENSTORE_ABS_PATH_MAX ({XENSTORE_ABS_PATH_MAX})",
            field="path",
        )
    if text != "/" and text.endswith("/"):
        raise ProtocolError(f"path {text!r} has a trailing slash", field="path")
    if "//" in text:
        raise ProtocolError(f"path {text!r} has a doubled slash", field="path")
    _check_chars(text)


def canonicalize_watch(raw: bytes | str, domid: int) -> tuple[str, bool]:
    """As [`canonicalize`][], but also accepts special ``@name`` watch paths."""
    if (raw[:1] == b"@") if isinstance(raw, bytes) else raw.startswith("@"):
        # xenstore.txt: "<wspecial> may have any syntax" -- any bytes but NUL, kept as
        # latin-1 so that events give back exactly the bytes the watcher sent.
        text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        if len(text) > XENSTORE_ABS_PATH_MAX:
            raise ProtocolError(
                f"special watch path of {len(text)} bytes exceeds XENSTORE_ABS_PATH_MAX "
                f"({XENSTORE_ABS_PATH_MAX})",
                field="path",
            )
        if "\0" in text:
            raise ProtocolError("special watch path contains a NUL byte", field="path")
        return text, False
    return canonicalize(_decode(raw), domid)


def relativize(path: str, domid: int) -> str:
    """``path`` made relative to the home of ``domid`` (used for relative watches)."""
    prefix = home(domid) + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def parent(path: str) -> str:
    if path == "/":
        return "/"
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def join(base: str, name: str) -> str:
    return f"/{name}" if base == "/" else f"{base}/{name}"


def is_child(child: str, ancestor: str) -> bool:
    """True if ``child`` is ``ancestor`` itself or lies below it."""
    if ancestor == "/" or child == ancestor:
        return True
    return child.startswith(ancestor) and child[len(ancestor) : len(ancestor) + 1] == "/"


def ancestors(path: str) -> list[str]:
    """Proper ancestors of ``path``, nearest first, ending with ``/``."""
    out: list[str] = []
    while path != "/":
        path = parent(path)
        out.append(path)
    return out


__all__ = [
    "INTRODUCE_DOMAIN",
    "RELEASE_DOMAIN",
    "SPECIAL_WATCHES",
    "ancestors",
    "basename",
    "canonicalize",
    "canonicalize_watch",
    "home",
    "is_child",
    "join",
    "parent",
    "relativize",
    "validate_absolute",
]
