"""The one command-line standard of the ``aioxen`` commands, in one place.

Every subcommand's module uses what is here; [`aioxen.cli.main`][] applies the rest
(error reporting, exit statuses, ``--debug``) to every command, old or new, without the
command doing anything.

The standard
------------
* **Validation before any I/O.**  Arguments are checked by the ``type=`` validators below
  while argparse parses them, before the command opens a file, a socket or XenStore.  A
  bad value is a *usage error*: ``aioxen CMD: argument --x: what is wrong`` on stderr,
  then the usage line, exit status 2 ([`EXIT_USAGE`][]).
* **Errors.**  ``aioxen CMD: message`` on stderr (``CMD`` is the subcommand, e.g.
  ``aioxen xenstore read``), exit status 1 ([`EXIT_FAILURE`][]) for a runtime failure,
  2 for a usage error found later (raise [`UsageError`][]).  A command may simply let
  an exception escape: ``main`` prints it the standard way ([`describe`][]).  No
  traceback unless ``--debug`` (accepted before or after the subcommand) or
  ``$AIOXEN_DEBUG=1``.
* **Signals.**  Long-running commands stop through [`aioxen.cli.StopSignals`][]; after
  a clean stop ``main`` exits ``128 + signal``: 130 for SIGINT, 143 for SIGTERM, 129
  for SIGHUP (unless started with SIGHUP ignored, as under ``nohup``).
* **Timeouts** say what was awaited (``TimeoutError("no answer from ... within 10 s")``);
  a bare ``TimeoutError`` is still reported, as "timed out".
* **Addresses**: ``tcp:HOST:PORT`` (``tcp:[V6]:PORT``), ``unix:PATH``,
  ``vchan:DOMID/PORT``, and plain ``HOST:PORT`` where TCP is meant
  ([`address`][], [`listen_address`][], [`connect_address`][]).
* **Readiness** for shells and service managers ([`add_readiness_arguments`][],
  [`notify_ready`][]): ``--env-file PATH`` (the export lines, written atomically, mode
  0600, once ready; removed again at a clean stop), ``--ready-fd N`` (the same text
  written to descriptor N, which is then closed: s6-style) and systemd's
  ``$NOTIFY_SOCKET`` (``READY=1``; ``Type=notify`` units).

API
---
Validators (``parser.add_argument("--x", type=domid)``), each raising
``argparse.ArgumentTypeError`` with a sentence:

* [`domid`][] -- a domain id 0..32751 (Xen's ``DOMID_FIRST_RESERVED`` and above, such
  as ``DOMID_SELF``, are not domains);
* [`tcp_port`][] -- 1..65535; [`tcp_port_or_any`][] -- 0..65535, 0 = "any free port"
  (use it only where that is meaningful and say so in the help);
* [`vchan_port`][] -- ``[A-Za-z0-9_-]+``, at most [`MAX_VCHAN_PORT`][] characters;
* [`positive_int`][], [`nonnegative_int`][], [`int_range`][] (a factory),
  [`size`][] (bytes; accepts ``4096``, ``0x1000``, ``64k``, ``1M``, ``2G``),
  [`size_in`][] (a factory: bytes within bounds), [`seconds`][] (> 0),
  [`inherited_fd`][] (an open descriptor >= 3);
* [`address`][], [`listen_address`][] (TCP port 0 allowed: any free port),
  [`connect_address`][] (TCP port 1..65535) -- [`aioxen.apps.addresses.Address`][].

Errors: [`UsageError`][] (exit 2), [`CommandError`][] (exit 1, optional ``status``),
[`describe`][] (an exception as one line for people), [`fail`][] (print the standard
line and return the status, for commands that report and carry on).

Readiness: [`add_readiness_arguments`][], [`notify_ready`][], [`notify_stopping`][],
[`sd_notify`][], [`export_lines`][].
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import shlex
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from aioxen.apps.addresses import MAX_VCHAN_PORT, Address, check_vchan_port, parse_address

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DEBUG_ENV = "AIOXEN_DEBUG"
"""``$AIOXEN_DEBUG=1`` does what ``--debug`` does: tracebacks with the error messages."""

FIRST_RESERVED_DOMID = 0x7FF0
"""Xen's ``DOMID_FIRST_RESERVED``: ids from here on (``DOMID_SELF``, ``DOMID_IO``, ...)
name no domain."""


class UsageError(Exception):
    """A usage error found after parsing: ``aioxen CMD: message``, exit status 2."""


class CommandError(Exception):
    """A runtime failure: ``aioxen CMD: message``, exit status [`status`][] (1)."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def describe(exc: BaseException) -> str:
    """``exc`` as one line for people: an ``OSError`` without ``[Errno N]`` (with its file
    name), a ``TimeoutError`` with no text as "timed out", else ``str(exc)`` (or the class
    name when empty)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None:
            text = f"{os.fsdecode(exc.filename)}: {text}"
            if exc.filename2 is not None:
                text += f" -> {os.fsdecode(exc.filename2)}"
        return text
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return text or type(exc).__name__


def fail(prog: str, message: str | BaseException, status: int = EXIT_FAILURE) -> int:
    """Print ``prog: message`` on stderr the standard way and return ``status``."""
    text = describe(message) if isinstance(message, BaseException) else message
    print(f"{prog}: {text}", file=sys.stderr, flush=True)
    return status


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_XREF = re.compile(r"\[`([^`]*)`\]\[[^\]]*\]")  # mkdocstrings: [`name`][] or [`title`][target]


def plain(text: str) -> str:
    """A docstring made fit for ``--help``: reST markup removed (````code```` -> code,
    ``[`name`][]`` -> name, a trailing ``::`` -> ``:``)."""
    text = _ROLE.sub(lambda m: m.group(1), text)
    text = _XREF.sub(lambda m: m.group(1), text)
    text = text.replace("``", "")
    return re.sub(r"::$", ":", text, flags=re.MULTILINE)


# -- validators ------------------------------------------------------------------------


def _validator(name: str) -> Callable[[Callable[[str], Any]], Callable[[str], Any]]:
    def wrap(fn: Callable[[str], Any]) -> Callable[[str], Any]:
        fn.__name__ = name  # argparse names it in "invalid NAME value" (not reached here)
        return fn

    return wrap


def _int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: not a whole number") from None


def domid(text: str) -> int:
    """A domain id, 0..32751."""
    value = _int(text, "domid")
    if not 0 <= value < FIRST_RESERVED_DOMID:
        raise argparse.ArgumentTypeError(
            f"domid {value} out of range 0..{FIRST_RESERVED_DOMID - 1}"
        )
    return value


def tcp_port(text: str) -> int:
    """A TCP port, 1..65535."""
    value = _int(text, "TCP port")
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"TCP port {value} out of range 1..65535")
    return value


def tcp_port_or_any(text: str) -> int:
    """A TCP port to listen on, 0..65535 (0: any free port)."""
    value = _int(text, "TCP port")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"TCP port {value} out of range 0..65535 (0: any)")
    return value


def vchan_port(text: str) -> str:
    """A vchan port name: ``[A-Za-z0-9_-]+``, at most [`MAX_VCHAN_PORT`][] characters."""
    try:
        return check_vchan_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def int_range(lo: int, hi: int | None = None, what: str = "number") -> Callable[[str], int]:
    """A validator for a whole number in ``lo..hi`` (``hi`` ``None``: no upper bound)."""

    def check(text: str) -> int:
        value = _int(text, what)
        if value < lo or (hi is not None and value > hi):
            bound = f"{lo}..{hi}" if hi is not None else f"{lo} or more"
            raise argparse.ArgumentTypeError(f"{what} {value} out of range {bound}")
        return value

    check.__name__ = what
    return check


positive_int = int_range(1, what="number")
nonnegative_int = int_range(0, what="number")

_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``0x1000``, ``64k``, ``1M``, ``2G`` (binary units; ``KiB``/``kB`` too) ->
    bytes; ``ValueError``."""
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"invalid size {text!r}: expected bytes such as 4096, 64k or 1M")
    return int(m.group(1), 0) * _SUFFIXES[m.group(2).lower()]


def size(text: str) -> int:
    """A size in bytes > 0 (``64k``, ``1M`` accepted)."""
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def size_in(lo: int, hi: int, what: str = "size") -> Callable[[str], int]:
    """A validator for a size in bytes within ``lo..hi`` (suffixes as for [`size`][])."""

    def check(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} {value} out of range {lo}..{hi}")
        return value

    check.__name__ = what
    return check


def seconds(text: str) -> float:
    """A duration in seconds, > 0 (fractions allowed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} seconds: must be a positive number")
    return value


def inherited_fd(text: str) -> int:
    """A descriptor the caller passed us open, >= 3 (0-2 carry data and messages)."""
    value = _int(text, "file descriptor")
    if value < 3:
        raise argparse.ArgumentTypeError(
            f"file descriptor {value}: must be 3 or above (0-2 carry data and messages)"
        )
    # Checked now, before the event loop opens descriptors of its own that could take the
    # number of one the caller did not pass.
    try:
        os.fstat(value)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"file descriptor {value}: {describe(exc)}") from None
    return value


def _address(text: str, *, any_port: bool) -> Address:
    try:
        return parse_address(text, any_port=any_port, bare_tcp=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@_validator("address")
def address(text: str) -> Address:
    """``tcp:HOST:PORT``, ``HOST:PORT``, ``unix:PATH`` or ``vchan:DOMID/PORT`` (TCP port
    1..65535)."""
    return _address(text, any_port=False)


connect_address = address


@_validator("address")
def listen_address(text: str) -> Address:
    """Like [`address`][], where TCP port 0 means "any free port"."""
    return _address(text, any_port=True)


# -- the environment -------------------------------------------------------------------


def env_domid(default: int = 0) -> int:
    """``$AIOXEN_DOMID`` (the domain a unix-platform command plays), checked:
    [`UsageError`][] for anything but a domid 0..32751; ``default`` when unset."""
    text = os.environ.get("AIOXEN_DOMID", "")
    if not text:
        return default
    try:
        return domid(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"$AIOXEN_DOMID={text[:40]!r}: {exc}") from None


def check_root_env() -> None:
    """Before a client command opens the platform the environment selects: when that is
    the ``unix`` platform, ``$XEN_ROOT`` must name an existing directory (and
    ``$AIOXEN_DOMID``, when set, a domid: [`env_domid`][]).  A client never
    creates a root (only ``aioxen xenstored --root`` and ``aioxen cat -l`` without
    ``$XEN_ROOT`` do), so a typo makes nothing on disk.  [`CommandError`][] otherwise."""
    from aioxen.errors import PlatformError
    from aioxen.platforms import choose_platform_name

    env_domid()
    root = os.environ.get("XEN_ROOT")
    if not root:
        return
    try:
        if choose_platform_name() != "unix":
            return
    except PlatformError:
        return  # a bad $AIOXEN_PLATFORM: opening the platform reports it
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise CommandError(
            f"$XEN_ROOT={root}: no such directory (start 'aioxen xenstored --root {root}' "
            "first and source the lines it prints)"
        ) from None
    except OSError as exc:
        raise CommandError(f"$XEN_ROOT={root}: {describe(exc)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CommandError(f"$XEN_ROOT={root} is not a directory")


# -- readiness -------------------------------------------------------------------------


def add_readiness_arguments(parser: argparse.ArgumentParser, *, env_file: bool = True) -> None:
    """Add ``--ready-fd N`` (and ``--env-file PATH`` unless ``env_file`` is false) to a
    long-running command; pass the parsed ``args`` to [`notify_ready`][] once ready."""
    if env_file:
        parser.add_argument(
            "--env-file",
            metavar="PATH",
            help="once ready, write the shell export lines to PATH (atomically, mode 0600; "
            "removed at a clean stop): start the daemon with & and source PATH",
        )
    parser.add_argument(
        "--ready-fd",
        type=inherited_fd,
        metavar="N",
        help="once ready, write the export lines (or a newline) to descriptor N and close "
        "it (for supervisors; $NOTIFY_SOCKET is honoured too: systemd Type=notify)",
    )


def export_lines(exports: Mapping[str, str]) -> str:
    """``NAME=value; export NAME;`` lines, quoted for any POSIX shell."""
    return "".join(f"{k}={shlex.quote(v)}; export {k};\n" for k, v in exports.items())


def write_env_file(path: str, text: str) -> int:
    """Write ``text`` to ``path`` atomically (a temporary file in the same directory,
    mode 0600, renamed over ``path``).  Returns a read-only descriptor of the file written,
    which the caller closes: while it is open the inode cannot be reused, so comparing it
    with what ``path`` names later tells whether the file there is still this one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".env-", dir=directory)  # mkstemp: mode 0600
    try:
        held = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            with os.fdopen(fd, "w") as f:
                fd = -1
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.close(held)
            raise
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return held


def sd_notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``message`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``) to systemd's
    ``$NOTIFY_SOCKET`` (a Unix datagram socket; ``@name`` is the abstract namespace).
    Returns whether it was sent; no socket set is not an error."""
    where = environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    if where[0] == "@":
        target = "\0" + where[1:]
    elif where[0] == "/":
        target = where
    else:
        raise OSError(errno.EAFNOSUPPORT, f"$NOTIFY_SOCKET={where!r}: not a Unix socket path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), target)
    return True


class Readiness:
    """What [`notify_ready`][] did, for [`stopping`][] to undo (the env file)."""

    def __init__(self, env_file: str | None, held: int | None) -> None:
        self.env_file = env_file
        self._held = held  # a descriptor of the env file we wrote

    def stopping(self) -> None:
        """Tell systemd we are stopping and remove the env file if it still is the one
        we wrote (a successor's is left alone).  Idempotent."""
        with contextlib.suppress(OSError):
            sd_notify("STOPPING=1")
        held, self._held = self._held, None
        if self.env_file and held is not None:
            try:
                ours, there = os.fstat(held), os.stat(self.env_file)
                if (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino):
                    os.unlink(self.env_file)
            except OSError:
                pass
            finally:
                os.close(held)


def notify_ready(
    args: argparse.Namespace | None = None,
    *,
    exports: Mapping[str, str] | None = None,
    status: str | None = None,
) -> Readiness:
    """Say "ready" every way the command was asked to: ``args.env_file`` (the export
    lines), ``args.ready_fd`` (the export lines, or a newline without exports; then
    closed) and ``$NOTIFY_SOCKET`` (``READY=1`` plus ``STATUS=status``).  An env file or
    ready descriptor that cannot be written raises [`CommandError`][] (the caller stops);
    a notify socket that cannot be reached is reported on stderr only.  Call
    [`Readiness.stopping`][] when stopping."""
    text = export_lines(exports or {})
    env_file = getattr(args, "env_file", None)
    ready_fd = getattr(args, "ready_fd", None)
    held = None
    if env_file:
        try:
            held = write_env_file(env_file, text)
        except OSError as exc:
            why = exc.strerror or describe(exc)  # its file name is our temporary file's
            raise CommandError(f"--env-file {env_file}: {why}") from exc
    if ready_fd is not None:
        try:
            data = (text or "\n").encode()
            while data:
                data = data[os.write(ready_fd, data) :]
        except OSError as exc:
            raise CommandError(f"--ready-fd {ready_fd}: {describe(exc)}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.close(ready_fd)
    message = "READY=1" + (f"\nSTATUS={status}" if status else "")
    try:
        sd_notify(message)
    except OSError as exc:
        print(f"aioxen: $NOTIFY_SOCKET: {describe(exc)}", file=sys.stderr, flush=True)
    return Readiness(env_file, held)


def notify_stopping() -> None:
    """``STOPPING=1`` to ``$NOTIFY_SOCKET`` (if set; errors ignored)."""
    with contextlib.suppress(OSError):
        sd_notify("STOPPING=1")


__all__ = [
    "DEBUG_ENV",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "MAX_VCHAN_PORT",
    "CommandError",
    "Readiness",
    "UsageError",
    "add_readiness_arguments",
    "address",
    "check_root_env",
    "check_vchan_port",
    "connect_address",
    "describe",
    "domid",
    "env_domid",
    "export_lines",
    "fail",
    "inherited_fd",
    "int_range",
    "listen_address",
    "nonnegative_int",
    "notify_ready",
    "notify_stopping",
    "parse_size",
    "plain",
    "positive_int",
    "sd_notify",
    "seconds",
    "size",
    "size_in",
    "tcp_port",
    "tcp_port_or_any",
    "vchan_port",
    "write_env_file",
]
