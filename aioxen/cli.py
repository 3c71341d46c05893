"""The ``aioxen`` command: one entry point, one module per subcommand group.

Each module named in :data:`SUBCOMMAND_MODULES` defines ``register(subparsers)``, which adds
its subcommand(s) with ``set_defaults(func=...)``; ``func(args)`` returns the exit status.
A ``func`` may be a coroutine function: it then runs on uvloop when available.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "aioxen.bench.cli",
    "aioxen.xenstore.cli",
    "aioxen.apps.cli",
    "aioxen.net.cli",
    "aioxen.blk.cli",
    "aioxen.xenbus.cli",
    "aioxen.devices.console_cli",
)


def run_async(coro_fn: object, args: argparse.Namespace) -> int:
    """Run ``coro_fn(args)`` on uvloop (if installed) or asyncio's default loop."""
    assert callable(coro_fn)
    factory: Callable[[], asyncio.AbstractEventLoop]
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is an optional dependency
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(coro_fn(args))
    return int(result or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aioxen",
        description="asyncio-native Xen inter-domain communication (vchan, rings, XenStore)",
    )
    from aioxen import __version__

    parser.add_argument("--version", action="version", version=f"aioxen {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if inspect.iscoroutinefunction(func):
            return run_async(func, args)
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141


if __name__ == "__main__":
    sys.exit(main())
