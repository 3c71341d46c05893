"""Run one ``aioxen`` subcommand on a chosen event loop: ``blk_cli_runner.py LOOP ARGS...``
(the ``aioxen`` entry point always prefers uvloop; tests run both loops)."""

from __future__ import annotations

import asyncio
import inspect
import sys

import uvloop

from aioxen.cli import build_parser


def main() -> int:
    loop, argv = sys.argv[1], sys.argv[2:]
    args = build_parser().parse_args(argv)
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    func = args.func
    if not inspect.iscoroutinefunction(func):
        return int(func(args) or 0)
    with asyncio.Runner(loop_factory=factory) as runner:
        return int(runner.run(func(args)) or 0)


if __name__ == "__main__":
    sys.exit(main())
