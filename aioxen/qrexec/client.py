"""The calling side: ``await qrexec.call(...)`` and ``async with qrexec.connect(...)``.

Theory of operation
-------------------
A call has two steps.  First the caller gets a data channel ``(domain, port)`` for it:

* in a VM, from the agent: in-process through an [`Agent`][aioxen.qrexec.agent.Agent]
  (``via=agent``), or, from another process, through the agent's *trigger socket* in
  ``qrexec-client-vm``'s protocol (``TRIGGER_SERVICE4`` in; 8 bytes ``{domain, port}``
  back when dom0 allowed the call, the socket closed when it refused -- exit 126);
* in dom0, from the daemon: in-process through a [`Daemon`][aioxen.qrexec.daemon.Daemon]
  (``via=daemon``), or through its client socket ``<dir>/qrexec.<target>`` in
  ``qrexec-client``'s protocol (both send ``HELLO``; ``EXEC_CMDLINE {0, 0,
  "user:QUBESRPC svc+arg dom0"}`` in; ``EXEC_CMDLINE {domid, port}`` back; the socket
  stays open until the target reports the channel finished).

Then the caller *offers* that channel (the caller side is always the vchan server),
the service side connects, both send ``HELLO`` (version >= 2), and the caller streams
``DATA_STDIN`` and reads ``DATA_STDOUT``/``DATA_STDERR`` until ``DATA_EXIT_CODE``.
[`call`][aioxen.qrexec.client.call] collects everything into a
[`CallResult`][aioxen.qrexec.client.CallResult];
[`connect`][aioxen.qrexec.client.connect] hands out the stream pair.  A service side
that vanishes before its exit code ends the call with ``ConnectionResetError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aioxen.qrexec import wire as w
from aioxen.qrexec.channels import (
    DATA_BUFFER_SIZE,
    ChannelFactory,
    Streams,
    VchanChannels,
    aclose_pending,
    close_streams,
)
from aioxen.qrexec.data import CallerEnd, data_handshake
from aioxen.qrexec.framing import exchange_hello, read_message, write_message

if TYPE_CHECKING:
    from aioxen.qrexec.agent import Agent
    from aioxen.qrexec.daemon import Daemon

DEFAULT_DIR = "/var/run/qubes"
"""Where Qubes keeps the agent's trigger socket and the daemons' client sockets."""
DIR_ENV = "AIOXEN_QREXEC_DIR"
"""Overrides [`DEFAULT_DIR`][aioxen.qrexec.client.DEFAULT_DIR] for callers."""
TRIGGER_NAME = "qrexec-agent"


class ServiceRefused(PermissionError):
    """dom0's policy refused the call (exit status 126)."""


@dataclasses.dataclass(frozen=True)
class CallResult:
    """What a finished call produced."""

    stdout: bytes
    stderr: bytes
    exit_code: int

    @property
    def returncode(self) -> int:  # subprocess-style alias
        return self.exit_code


class _CallStreams:
    """The writer half of [`connect`][aioxen.qrexec.client.connect]: stdin of the
    service; ``exit_code()`` awaits its status."""

    def __init__(self, end: CallerEnd) -> None:
        self._end = end

    def write(self, data: bytes) -> None:
        self._end.stdin.write(data)

    def writelines(self, data: Any) -> None:
        for d in data:
            self.write(d)

    def write_eof(self) -> None:
        self._end.stdin.write_eof()

    def can_write_eof(self) -> bool:
        return True

    async def drain(self) -> None:
        await self._end.stdin.drain()

    def close(self) -> None:
        self._end.stdin.write_eof()

    async def wait_closed(self) -> None:
        await self._end.stdin.drain()

    @property
    def stderr(self) -> asyncio.StreamReader:
        return self._end.stderr

    async def exit_code(self) -> int:
        return await self._end.exit_code()


@contextlib.asynccontextmanager
async def caller_session(
    channels: ChannelFactory,
    domain: int,
    port: int,
    buffer_size: int,
    max_version: int,
    *,
    keep_stderr: bool = True,
) -> AsyncIterator[Streams]:
    """Offer the data channel ``(domain, port)``, accept the service side, handshake;
    yield ``(stdout reader, stdin writer)`` (the writer has ``exit_code()`` and
    ``stderr``).  ``keep_stderr=False``: the service's stderr is discarded as it
    arrives (nobody has to read ``writer.stderr``, which then only sees the EOF)."""
    pending = await channels.listen(domain, port, buffer_size=buffer_size)
    try:
        reader, writer = await pending.accept()
    finally:
        await aclose_pending(pending)
    what = f"qrexec service in domain {domain} (port {port})"
    try:
        version = await data_handshake(reader, writer, max_version=max_version, what=what)
        end = CallerEnd(reader, writer, version, what=what, discard_stderr=not keep_stderr)
        try:
            yield end.stdout, _CallStreams(end)  # type: ignore[misc]
        finally:
            await end.aclose()
    finally:
        await close_streams(writer)


async def run_call(
    channels: ChannelFactory,
    domain: int,
    port: int,
    input: bytes,
    buffer_size: int = DATA_BUFFER_SIZE,
    max_version: int = w.PROTOCOL_VERSION,
) -> CallResult:
    """Run one call over the data channel ``(domain, port)`` (see the module)."""
    async with caller_session(channels, domain, port, buffer_size, max_version) as (_, wr):
        calls: Any = wr
        out, err, code = await calls._end.communicate(input)
        return CallResult(out, err, code)


def _default_dir() -> str:
    return os.environ.get(DIR_ENV, DEFAULT_DIR)


async def _resolve_channels(channels: ChannelFactory | None) -> ChannelFactory:
    if channels is not None:
        return channels
    from aioxen.platforms import resolve

    return VchanChannels(await resolve(None))


async def request_via_trigger(
    path: str, target: str, service: str, *, source: str = ""
) -> tuple[int, int, asyncio.StreamReader, asyncio.StreamWriter]:
    """Ask the agent at trigger socket ``path`` for a call (``qrexec-client-vm``'s
    protocol); returns ``(domain, port, reader, writer)`` -- keep the socket open for
    the call's lifetime.  ``ServiceRefused`` when dom0 refuses."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        t, p = w.encode_trigger_service(
            4, w.TriggerService(service, target, "SOCKET", source or None)
        )
        write_message(writer, t, p)
        await writer.drain()
        try:
            answer = await reader.readexactly(8)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise ServiceRefused(f"qrexec: {service} in {target} refused") from None
            raise
        params = w.parse_exec_params(answer, with_cmdline=False)
        return params.connect_domain, params.connect_port, reader, writer
    except BaseException:
        writer.close()
        raise


async def request_via_daemon_socket(
    path: str, cmdline: str, *, msg_type: int = w.MSG_EXEC_CMDLINE, connect_domain: int = 0
) -> tuple[int, int, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send ``cmdline`` to a daemon's client socket at ``path`` (``qrexec-client``'s
    protocol); returns ``(domid, port, reader, writer)``; the daemon closes the socket
    when the call's port is released."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        await exchange_hello(
            reader, writer, version=w.CLIENT_PROTOCOL_VERSION, min_version=2, what=path
        )
        write_message(writer, msg_type, w.encode_exec_params(connect_domain, 0, cmdline))
        await writer.drain()
        msg = await read_message(reader, limit=8, what=f"qrexec daemon at {path}")
        if msg is None:
            raise ServiceRefused(f"qrexec daemon at {path} refused {cmdline[:80]!r}")
        if msg.type != msg_type:
            raise w.QrexecProtocolError(
                f"qrexec daemon at {path} answered {w.message_name(msg.type)}", field="type"
            )
        params = w.parse_exec_params(msg.payload, with_cmdline=False)
        return params.connect_domain, params.connect_port, reader, writer
    except BaseException:
        writer.close()
        raise


async def _open(
    target: str,
    service: str,
    via: Agent | Daemon | str | os.PathLike[str] | None,
    channels: ChannelFactory | None,
    user: str | None,
) -> tuple[ChannelFactory, int, int, Any]:
    """Get a data channel; returns ``(channels, domain, port, finish)``."""
    from aioxen.qrexec.agent import Agent
    from aioxen.qrexec.daemon import Daemon

    if isinstance(via, Agent):
        domain, port = await via.request(target, service)
        return via.channels, domain, port, lambda: via.terminated(domain, port)
    if isinstance(via, Daemon):
        domain, port = await via.request(target, service, user=user)
        return via.channels, domain, port, lambda: None
    chans = await _resolve_channels(channels)
    where = os.fspath(via) if via is not None else _default_dir()
    if chans.local_domid == 0:
        path = os.path.join(where, f"qrexec.{target}") if os.path.isdir(where) else where
        who = user or "user"
        cmdline = f"{who}:QUBESRPC {service if '+' in service else service + '+'} dom0"
        domain, port, _, sock = await request_via_daemon_socket(path, cmdline)
    else:
        path = os.path.join(where, TRIGGER_NAME) if os.path.isdir(where) else where
        domain, port, _, sock = await request_via_trigger(path, target, service)
    return chans, domain, port, sock.close


async def call(
    target: str,
    service: str,
    *,
    input: bytes = b"",
    via: Agent | Daemon | str | os.PathLike[str] | None = None,
    channels: ChannelFactory | None = None,
    user: str | None = None,
    timeout: float | None = None,
) -> CallResult:
    """Call ``service`` (``"name+arg"``) in domain ``target`` with ``input`` on its
    stdin; returns stdout, stderr and the exit code (126 when refused).

    ``via``: an in-process [`Agent`][aioxen.qrexec.agent.Agent] or
    [`Daemon`][aioxen.qrexec.daemon.Daemon], or the directory (or socket path) of the
    agent's trigger socket (in a VM) / the daemon's client sockets (in dom0); default
    ``$AIOXEN_QREXEC_DIR`` or ``/var/run/qubes``.  ``channels`` opens the data channel
    (default: vchan on ``aioxen.platform()``).  ``user`` (calls from dom0): the user the
    service runs as; default the daemon's ``default_user`` (``user`` over a socket)."""
    async with asyncio.timeout(timeout):
        try:
            chans, domain, port, finish = await _open(target, service, via, channels, user)
        except ServiceRefused:
            return CallResult(b"", b"", w.EXIT_REFUSED)
        try:
            vers = getattr(via, "max_version", w.PROTOCOL_VERSION)
            return await run_call(chans, domain, port, input, DATA_BUFFER_SIZE, vers)
        finally:
            finish()


@contextlib.asynccontextmanager
async def connect(
    target: str,
    service: str,
    *,
    via: Agent | Daemon | str | os.PathLike[str] | None = None,
    channels: ChannelFactory | None = None,
    user: str | None = None,
    keep_stderr: bool = False,
) -> AsyncIterator[Streams]:
    """``async with qrexec.connect(target, "svc+arg") as (reader, writer)``: the
    service's stdout and stdin as streams (``writer.write_eof()`` ends stdin;
    ``await writer.exit_code()`` its status).  ``ServiceRefused`` if refused.

    The service's stderr is discarded as it arrives, so reading ``reader`` alone never
    stalls on it; with ``keep_stderr=True`` it is ``writer.stderr`` (an
    `asyncio.StreamReader`), which must then be read concurrently with ``reader`` (a
    full one pauses the call)."""
    chans, domain, port, finish = await _open(target, service, via, channels, user)
    try:
        vers = getattr(via, "max_version", w.PROTOCOL_VERSION)
        async with caller_session(
            chans, domain, port, DATA_BUFFER_SIZE, vers, keep_stderr=keep_stderr
        ) as streams:
            yield streams
    finally:
        finish()


__all__ = [
    "CallResult",
    "ServiceRefused",
    "call",
    "caller_session",
    "connect",
    "request_via_daemon_socket",
    "request_via_trigger",
    "run_call",
]
