"""``aioxen cat``: xencat/unixcat -- stdin to a vchan, the vchan to stdout.

Theory of operation
-------------------
One vchan, two pumps.  ``up`` reads stdin in chunks and writes them to the vchan,
awaiting ``drain()`` whenever the transport had to queue bytes (so at most the transport's
high-water mark is buffered); at stdin EOF it waits until every byte is in the ring and
calls ``write_eof()`` (the vchan EOF bit).  ``down`` reads the vchan and writes to stdout
with back-pressure; at vchan EOF it flushes and closes stdout, so the next program in the
pipeline sees its end of input at once.  When both directions are done the vchan is
closed and the exit status is 0 -- the semantics of ``nc -N`` / ``socat``: half-close in
each direction, exit when both are finished.

A peer that aborts, fails or is killed before ending its stream (no EOF bit) cuts it:
``down`` gets ``ConnectionResetError`` and ``cat`` fails with status 1 -- a cut stream
never looks like a clean end.  Stdio may be anything, closed included (see
[`aioxen.cli`][] and [`aioxen.apps.stdio`][]).

The peer closing the whole vchan (not only its write side) ends ``down`` as EOF.  If stdin
still has data after that, nothing can carry it: the next chunk read (or bytes still
queued in the transport) is reported as ``connection reset`` -- like a pipe writer that
gets ``EPIPE`` on its next write.  An interactive terminal on stdin is simply abandoned.
If the reader of stdout goes away, ``cat`` stops quietly with status 141, as a process
killed by ``SIGPIPE`` would.

Errors are one line on stderr, ``aioxen cat: ...``, with status 1 (no server within the
timeout, connection reset, a protocol violation by the peer, no platform).

Listening (``-l``) serves exactly one client ([`aioxen.vchan.accept`][]).  Without
``$XEN_ROOT`` on the ``unix`` platform it first creates a private world
([`EmbeddedRoot`][aioxen.apps.embedded.EmbeddedRoot]: temporary root + xenstored in this process)
and prints the export lines that let a second shell join it as the peer domain -- to
``--env-fd`` (then closed, so ``eval "$(...)"`` returns) or else to stderr.  The world is
removed when ``cat`` exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

import aioxen
from aioxen import vchan
from aioxen.apps.clistd import CommandError, UsageError, check_root_env, describe, env_domid
from aioxen.apps.embedded import EmbeddedRoot
from aioxen.apps.stdio import ByteSink, ByteSource, open_sink, open_source
from aioxen.cli import StopSignals
from aioxen.errors import PlatformError, ProtocolError
from aioxen.platforms import choose_platform_name
from aioxen.platforms.base import Platform

CHUNK = 65536
"""Bytes read from stdin / the vchan at a time."""

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SIGPIPE, EXIT_SIGTERM = 0, 1, 2, 141, 143


@dataclass
class CatOptions:
    """What ``aioxen cat`` was asked to do."""

    domid: int
    """The peer: the server's domid for a client, the client's domid with ``listen``."""
    port: str
    listen: bool = False
    buffer_size: int = vchan.DEFAULT_SIZE
    """Ring size each way (the listener picks it)."""
    timeout: float | None = None
    """Seconds to wait for the peer; ``None``: a client waits
    [`DEFAULT_CONNECT_TIMEOUT`][aioxen.vchan.DEFAULT_CONNECT_TIMEOUT], a listener forever."""
    verbose: bool = False
    env_fd: int | None = None
    """Where a listener with an embedded world writes the export lines (default stderr)."""


class CatError(Exception):
    """A failure reported as ``aioxen cat: <message>`` with exit status [`status`][]."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def needs_embedded_world(environ: Mapping[str, str] = os.environ) -> bool:
    """True when the environment would select the ``unix`` platform but names no root
    (the platforms' own choice, [`aioxen.platforms.choose_platform_name`][], with
    ``unix`` where it would find nothing)."""
    if environ.get("XEN_ROOT"):
        return False
    try:
        return choose_platform_name(environ, fallback="unix") == "unix"
    except PlatformError:  # a bad $AIOXEN_PLATFORM: aioxen.platform() reports it
        return False


class _Up:
    """stdin -> vchan.  ``reading`` is true while blocked on stdin (nothing in flight)."""

    def __init__(self, src: ByteSource, writer: asyncio.StreamWriter, where: str) -> None:
        self.src = src
        self.writer = writer
        self.where = where
        self.reading = False
        self.sent = 0

    def _lost(self) -> ConnectionResetError:
        return ConnectionResetError(
            f"connection reset: {self.where} closed before all input was sent"
        )

    async def run(self) -> None:
        transport = self.writer.transport
        while True:
            self.reading = True
            data = await self.src.read(CHUNK)
            self.reading = False
            if not data:
                break
            if transport.is_closing():
                raise self._lost()
            self.writer.write(data)
            self.sent += len(data)
            if transport.get_write_buffer_size():
                await self._drain()
        if transport.get_write_buffer_size():
            transport.set_write_buffer_limits(high=0)  # wait until all of it is in the ring
            await self._drain()
        self.writer.write_eof()

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionResetError:
            raise self._lost() from None


async def _down(reader: asyncio.StreamReader, sink: ByteSink, counter: list[int]) -> None:
    """vchan -> stdout; closes stdout at vchan EOF."""
    while data := await reader.read(CHUNK):
        await sink.write(data)
        counter[0] += len(data)
    await sink.close_write()


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    src: ByteSource,
    sink: ByteSink,
    where: str,
    gone_task: asyncio.Future[None],
) -> tuple[int, int]:
    """Run both directions to completion; return ``(bytes sent, bytes received)``.
    ``gone_task`` completes when the connection is lost (never cancelled here: it waits
    on the stream protocol's own close future)."""
    up = _Up(src, writer, where)
    received = [0]
    up_task = asyncio.ensure_future(up.run())
    down_task = asyncio.ensure_future(_down(reader, sink, received))
    pending: set[asyncio.Future[None]] = {up_task, down_task, gone_task}
    try:
        while up_task in pending or down_task in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is gone_task:
                    continue
                t.result()  # an error in either direction ends everything
            if gone_task in done and up_task in pending and up.reading and src.isatty:
                up_task.cancel()  # nobody to send to: stop waiting for the terminal
                with contextlib.suppress(asyncio.CancelledError):
                    await up_task
                pending.discard(up_task)
    finally:
        for t in (up_task, down_task):
            if not t.done():
                t.cancel()
        await asyncio.gather(up_task, down_task, return_exceptions=True)
    return up.sent, received[0]


def _describe(exc: BaseException) -> str:
    return describe(exc)


async def run_cat(
    opts: CatOptions,
    stdin_fd: int,
    stdout_fd: int,
    *,
    stderr: TextIO | None = None,
    platform: Platform | None = None,
) -> int:
    """Run ``aioxen cat`` over ``stdin_fd``/``stdout_fd`` (taken over and closed); return
    the exit status.  Errors are written to ``stderr`` as one ``aioxen cat: ...`` line.

    ``platform`` overrides the environment's choice (and disables the embedded world).
    """
    err = stderr if stderr is not None else sys.stderr
    owned = [stdin_fd, stdout_fd]

    def say(msg: str) -> None:
        print(f"aioxen cat: {msg}", file=err, flush=True)

    try:
        return await _run(opts, owned, platform, say)
    except CatError as exc:
        say(str(exc))
        return exc.status
    except BrokenPipeError:
        return EXIT_SIGPIPE  # stdout's reader left: quietly, like SIGPIPE
    except (OSError, ProtocolError, PlatformError, ValueError) as exc:
        say(_describe(exc))
        return EXIT_ERROR
    finally:
        for fd in owned:
            with contextlib.suppress(OSError):
                os.close(fd)


async def _run(
    opts: CatOptions,
    owned: list[int],
    platform: Platform | None,
    say: Callable[[str], None],
) -> int:
    stdin_fd, stdout_fd = owned
    world: EmbeddedRoot | None = None
    async with contextlib.AsyncExitStack() as stack:
        if platform is None:
            if opts.listen and needs_embedded_world():
                try:
                    own = env_domid()  # checked before the world is made
                except UsageError as exc:
                    raise CatError(str(exc), EXIT_USAGE) from None
                world = await stack.enter_async_context(EmbeddedRoot(prefix="aioxen-cat-"))
                if own == opts.domid:
                    raise CatError(f"the peer domid {opts.domid} is our own ($AIOXEN_DOMID)")
                _publish(world.exports(opts.domid), opts.env_fd)
                platform = world.platform(own)
            else:
                if opts.env_fd is not None:
                    _publish("", opts.env_fd)
                try:
                    check_root_env()  # a missing or non-directory $XEN_ROOT: before any I/O
                except UsageError as exc:
                    raise CatError(str(exc), EXIT_USAGE) from None
                except CommandError as exc:
                    raise CatError(str(exc)) from None
                try:
                    platform = aioxen.platform()
                except PlatformError as exc:
                    if os.environ.get("AIOXEN_PLATFORM") or os.environ.get("XEN_ROOT"):
                        raise  # the platform's own message says what is wrong
                    raise CatError(
                        "no aioxen platform available: not under Xen and $XEN_ROOT is not "
                        "set; first eval the export lines printed by 'aioxen cat -l DOMID "
                        "PORT' (or by 'aioxen xenstored --root DIR')"
                    ) from exc
                if platform.single_process:  # no other program can be the peer
                    raise CatError(
                        f"the {platform.name} platform lives in one process; use unix or xen"
                    )
            await stack.enter_async_context(platform)
        elif opts.env_fd is not None:
            _publish("", opts.env_fd)
        where = f"domain {opts.domid} port {opts.port!r}"
        try:
            if opts.listen:
                reader, writer = await vchan.accept(
                    opts.domid,
                    opts.port,
                    platform=platform,
                    read_size=opts.buffer_size,
                    write_size=opts.buffer_size,
                    timeout=opts.timeout,
                )
            else:
                timeout = opts.timeout
                if timeout is None:
                    timeout = vchan.DEFAULT_CONNECT_TIMEOUT
                reader, writer = await vchan.open_connection(
                    opts.domid, opts.port, platform=platform, timeout=timeout
                )
        except TimeoutError as exc:
            if opts.listen:
                raise CatError(f"no client from {where} within {opts.timeout} s") from exc
            raise
        # Completes when the connection is lost; cancelling it would cancel the stream
        # protocol's close future, so it is only ever awaited to completion.
        gone = asyncio.ensure_future(writer.wait_closed())
        gone.add_done_callback(_retrieve)
        try:
            if opts.verbose:
                info = writer.get_extra_info
                say(
                    f"connected to {where} as {info('role')}, domain {platform.domid} "
                    f"(rings {info('write_size')} out / {info('read_size')} in)"
                )
            src = await open_source(stdin_fd)
            owned.remove(stdin_fd)
            try:
                sink = await open_sink(stdout_fd)
                owned.remove(stdout_fd)
                try:
                    sent, received = await _pump(reader, writer, src, sink, where, gone)
                finally:
                    sink.abort()
            finally:
                src.close()
        except BaseException:
            writer.transport.abort()
            # let the transport release its pages before the platform closes
            with contextlib.suppress(BaseException):
                await asyncio.shield(gone)
            raise
        writer.close()
        with contextlib.suppress(ConnectionError):
            await asyncio.shield(gone)
        if opts.verbose:
            say(f"disconnected: sent {sent} bytes, received {received} bytes")
    return EXIT_OK


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _publish(text: str, env_fd: int | None) -> None:
    """Write the export lines to ``env_fd`` (then closed) or, without one, to stderr."""
    if env_fd is None:
        if text:
            sys.stderr.write(text)
            sys.stderr.flush()
        return
    try:
        data = text.encode()
        while data:
            data = data[os.write(env_fd, data) :]
        os.close(env_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.close(env_fd)
        raise CatError(f"--env-fd {env_fd}: {_describe(exc)}") from exc


async def main(opts: CatOptions) -> int:
    """The command: take over fds 0 and 1 (fd 1 is pointed at ``/dev/null`` so that
    closing our copy really ends the output) and run [`run_cat`][]; SIGTERM stops it
    cleanly (status 143)."""
    try:
        stdin_fd = os.dup(0)
    except OSError as exc:
        print(f"aioxen cat: stdin: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    try:
        stdout_fd = os.dup(1)
    except OSError as exc:
        os.close(stdin_fd)
        print(f"aioxen cat: stdout: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    task = asyncio.current_task()
    assert task is not None
    # SIGINT arrives as KeyboardInterrupt (130); SIGTERM and SIGHUP stop it here
    stop = StopSignals((signal.SIGTERM, signal.SIGHUP), on_signal=lambda _: task.cancel())
    try:
        return await run_cat(opts, stdin_fd, stdout_fd)
    except asyncio.CancelledError:
        if stop.received is not None:
            return 128 + stop.received
        raise
    finally:
        stop.close()


__all__ = ["CatError", "CatOptions", "main", "needs_embedded_world", "run_cat"]
