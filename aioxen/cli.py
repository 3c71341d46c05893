"""The ``aioxen`` command: one entry point, one module per subcommand group.

Each module named in [`SUBCOMMAND_MODULES`][] defines ``register(subparsers)``, which adds
its subcommand(s) with ``set_defaults(func=...)``; ``func(args)`` returns the exit status.
A ``func`` may be a coroutine function: it then runs on uvloop when available (or on the
loop ``$AIOXEN_LOOP`` names: ``asyncio`` or ``uvloop``).

Any stdio.  Cron, systemd units and ``nohup`` start commands with odd descriptors 0-2:
closed, ``/dev/null``, a regular file, a pipe, a terminal.  A descriptor closed at exec
time would be handed to the first file or socket the process opens (the event loop's epoll
descriptor, a platform socket), which then gets read, written or closed as "stdin" --
libuv even aborts the process when it closes a descriptor below 3.  So [`main`][] first
points every closed one of 0, 1, 2 at ``/dev/null`` ([`guard_stdio`][]): a closed stdin
reads as empty input, a closed stdout or stderr discards what is written.  The commands
themselves read and write stdio through [`aioxen.apps.stdio`][], which serves every kind
of descriptor (threads for those the loop cannot watch).

Stopping.  A long-running command (``xenstored``, ``bridge``, ``netback``, ``blkback``,
``console``, ...) stops in an orderly way on SIGINT/SIGTERM/SIGHUP: [`StopSignals`][]
turns them into an event the command awaits, then it closes what it opened; [`main`][]
then exits ``128 + signal`` (130, 143, 129) as a shell expects of a command a signal
ended.  SIGHUP is left ignored when the process started with it ignored (``nohup``).

The command-line standard (validators, addresses, error reporting, exit statuses,
``--debug``, readiness for supervisors) is described and implemented in
[`aioxen.apps.clistd`][]; [`main`][] applies its reporting part to every command:
``aioxen CMD: message`` on stderr, 2 for usage errors (argparse's too), 1 for runtime
failures, a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import os
import signal
import sys
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import NoReturn

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "aioxen.bench.cli",
    "aioxen.xenstore.cli",
    "aioxen.apps.cli",
    "aioxen.net.cli",
    "aioxen.blk.cli",
    "aioxen.xenbus.cli",
    "aioxen.console.cli",
    "aioxen.apps.qrexec_cli",
)


LOOP_ENV = "AIOXEN_LOOP"
"""Environment variable choosing the event loop of the command: ``uvloop`` (the default
when installed) or ``asyncio``."""

CLOSED_STDIO: frozenset[int] = frozenset()
"""Which of descriptors 0, 1, 2 were closed when [`main`][] started (they now point at
``/dev/null``)."""

_STREAMS = (("stdin", "r"), ("stdout", "w"), ("stderr", "w"))


def guard_stdio() -> frozenset[int]:
    """Point each closed descriptor among 0, 1, 2 at ``/dev/null`` (inheritable, like a
    normal stdio descriptor) and give Python a ``sys.stdin``/``stdout``/``stderr`` for it
    (it leaves ``None`` for a descriptor closed at startup).  Returns the closed ones."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    for fd in closed:
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        else:
            os.set_inheritable(fd, True)
        name, mode = _STREAMS[fd]
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False, errors="backslashreplace"))  # noqa: SIM115
    return frozenset(closed)


STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that ask a long-running command to stop (exit ``128 + signum``: 130, 143,
129).  SIGHUP -- the terminal hung up, or a shell exiting -- stops as cleanly as SIGTERM
instead of killing the process by its default action (sockets, lock and env files left
behind, an unsaved store); a process started with SIGHUP ignored (``nohup``) keeps
ignoring it."""

_STOPPED_BY: int | None = None
"""The first stop signal any [`StopSignals`][] received during [`main`][]'s command
(main then exits ``128 + signal`` after the clean stop)."""


class StopSignals:
    """The one stop-on-signal helper of the commands.

    Created inside the running loop, it installs a handler for each of ``signals`` (default
    [`STOP_SIGNALS`][]): a signal sets [`received`][] (the first one), wakes
    [`wait`][] and calls ``on_signal(signum)`` if given, instead of the default action.
    [`close`][] (or leaving a ``with`` block) removes the handlers again.  Where the loop
    cannot handle signals (not the main thread), the signals keep their default action.
    """

    def __init__(
        self,
        signals: Sequence[int] = STOP_SIGNALS,
        *,
        on_signal: Callable[[int], object] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._on_signal = on_signal
        self.received: int | None = None
        """The first signal received, else ``None``."""
        self._installed: list[int] = []
        for sig in signals:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # started under nohup: the hang-up is meant to be ignored
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, self._handle, sig)
                self._installed.append(sig)
        if self._installed:
            _OPEN_STOP_SIGNALS.add(self)

    def _handle(self, sig: int) -> None:
        global _STOPPED_BY
        if self.received is None:
            self.received = sig
        if _STOPPED_BY is None:
            _STOPPED_BY = sig
        self._event.set()
        if self._on_signal is not None:
            self._on_signal(sig)

    def is_set(self) -> bool:
        """Whether a stop signal arrived."""
        return self._event.is_set()

    async def wait(self) -> None:
        """Return once a stop signal arrived."""
        await self._event.wait()

    def close(self) -> None:
        """Remove the loop's handlers.  Idempotent.  Inside [`main`][] a stop signal that
        arrives after this (the command is finishing on its own) ends the process with
        ``128 + signum`` like any other stop, instead of killing it by the signal's default
        action; elsewhere (a library user) the signals get their default action back."""
        _OPEN_STOP_SIGNALS.discard(self)
        while self._installed:
            sig = self._installed.pop()
            self._loop.remove_signal_handler(sig)
            if _IN_MAIN:  # a command process: never die by the default action now
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(sig, _late_stop)

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_IN_MAIN = False
"""Set by [`main`][]: this process is an ``aioxen`` command."""

_OPEN_STOP_SIGNALS: weakref.WeakSet[StopSignals] = weakref.WeakSet()
"""[`StopSignals`][] whose loop handlers are installed.  [`run_async`][] closes those a
command left open before its loop closes: a closing loop resets their signals to the
default action, and a stop signal in that window would kill the command (-15, seen in CI)
instead of ending it with ``128 + signum``."""


def _late_stop(signum: int, frame: object) -> None:
    """A stop signal after the loop's handlers are gone: exit ``128 + signum`` now."""
    raise SystemExit(128 + signum)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    name = os.environ.get(LOOP_ENV) or "uvloop"
    if name == "asyncio":
        return asyncio.new_event_loop
    if name != "uvloop":
        raise SystemExit(f"aioxen: ${LOOP_ENV}={name!r}: expected 'asyncio' or 'uvloop'")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is an optional dependency
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run_async(coro_fn: object, args: argparse.Namespace) -> int:
    """Run ``coro_fn(args)`` on uvloop (if installed) or asyncio's default loop
    (``$AIOXEN_LOOP`` chooses)."""
    assert callable(coro_fn)
    factory = _loop_factory()

    async def command() -> int | None:
        try:
            result: int | None = await coro_fn(args)
            return result
        finally:  # still inside the loop, before it closes
            for stop in list(_OPEN_STOP_SIGNALS):
                if stop._loop is asyncio.get_running_loop():
                    stop.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(command())
    return int(result or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the standard's usage errors: ``PROG: message`` first on stderr (PROG
    is ``aioxen CMD``), then the usage line, exit status 2.  Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message}\n")
        self.print_usage(sys.stderr)
        self.exit(2)


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for sub in action.choices.values():
                if id(sub) not in seen:  # aliases map to the same parser
                    seen.add(id(sub))
                    yield sub


def walk_parsers(
    parser: argparse.ArgumentParser,
) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every (sub)subcommand parser below it, depth first."""
    yield parser
    for sub in _subparsers(parser):
        yield from walk_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="aioxen",
        description="asyncio-native Xen inter-domain communication (vchan, rings, XenStore)",
    )
    from aioxen import __version__

    parser.add_argument("--version", action="version", version=f"aioxen {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show a traceback with an error message (also after COMMAND; $AIOXEN_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in walk_parsers(parser):
        if sub is not parser:
            # --debug after the subcommand too; SUPPRESS keeps a top-level --debug.
            with contextlib.suppress(argparse.ArgumentError):
                sub.add_argument(
                    "--debug",
                    action="store_true",
                    default=argparse.SUPPRESS,
                    help="show a traceback with an error message",
                )
        sub.set_defaults(_aioxen_prog=sub.prog)
    return parser


def _debug_wanted(args: argparse.Namespace | None) -> bool:
    if args is not None and getattr(args, "debug", False):
        return True
    return os.environ.get("AIOXEN_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``aioxen`` command: run one subcommand, return its exit status."""
    global _IN_MAIN
    _IN_MAIN = True  # StopSignals.close() leaves late stop signals to _late_stop
    try:
        return _main(argv)
    finally:
        _IN_MAIN = False


def command() -> NoReturn:
    """The ``aioxen`` program (``python -m aioxen`` and the installed script): run
    [`main`][] and exit with its status through [`exit_process`][]."""
    exit_process(main())


def exit_process(status: int) -> NoReturn:
    """End the process with ``status``.  Output is flushed first, then the stop signals
    are blocked: while the interpreter shuts down its signal handlers go back to the
    default action, and a SIGTERM/SIGINT arriving then would kill the finished command by
    that signal (-15) instead of letting its status stand.  A blocked signal stays pending
    and dies with the process."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    with contextlib.suppress(ValueError, OSError):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    sys.exit(status)


def _main(argv: Sequence[str] | None) -> int:
    global CLOSED_STDIO, _STOPPED_BY
    CLOSED_STDIO = guard_stdio()  # before anything opens a descriptor
    _STOPPED_BY = None
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's parser: "aioxen CMD: unrecognized arguments"
        leaf = {p.prog: p for p in walk_parsers(parser)}.get(
            getattr(args, "_aioxen_prog", "aioxen"), parser
        )
        leaf.error(f"unrecognized arguments: {' '.join(extra)}")
    func = getattr(args, "func", None)
    if func is None:
        print("aioxen: a COMMAND is required (aioxen --help lists them)", file=sys.stderr)
        parser.print_usage(sys.stderr)
        return 2
    prog: str = getattr(args, "_aioxen_prog", "aioxen")
    try:
        if inspect.iscoroutinefunction(func):
            status = run_async(func, args)
        else:
            status = int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141
    except Exception as exc:
        return _report(prog, exc, args)
    if status == 0 and _STOPPED_BY is not None:
        return 128 + _STOPPED_BY
    return status


def _report(prog: str, exc: BaseException, args: argparse.Namespace | None) -> int:
    """Print ``exc`` the standard way and return its exit status."""
    from aioxen.apps.clistd import CommandError, UsageError, describe

    if _debug_wanted(args):
        traceback.print_exception(exc, file=sys.stderr)
    status = 1
    if isinstance(exc, UsageError):
        status = 2
    elif isinstance(exc, CommandError):
        status = exc.status
    print(f"{prog}: {describe(exc)}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
