"""``python -m benchmarks`` / ``aioxen bench``: run suites, print a table, write JSON/plots."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from aioxen.bench.harness import (
    Context,
    Measurement,
    Progress,
    cleanup,
    format_markdown,
    format_table,
    write_json,
)
from aioxen.bench.machine import describe

SUITES: dict[str, str] = {
    "memcpy": "aioxen.bench.suites.memcpy",
    "streams": "aioxen.bench.suites.streams",
    "protocol": "aioxen.bench.suites.protocol",
    "net": "aioxen.bench.suites.net",
    "setup": "aioxen.bench.suites.setup",
    "xenstore": "aioxen.bench.suites.xenstore",
    "rings": "aioxen.bench.suites.rings",
    "blk": "aioxen.bench.suites.blk",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run (default: all): {', '.join(SUITES)}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and one repetition: every suite in well under a minute",
    )
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio", "both"],
        default="uvloop",
        help="event loop to measure on (default %(default)s; both: each in turn)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions per measurement (default 1 quick, 3 otherwise)",
    )
    parser.add_argument(
        "--mechanisms",
        default=None,
        help="comma-separated mechanisms for the stream suites "
        "(vchan/unix,vchan/inheap,tcp,unix-socket,pipe)",
    )
    parser.add_argument("--json", metavar="FILE", help="write all samples and ratios as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    parser.add_argument("--plot", metavar="DIR", help="write PNG charts (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    """Run the selected suites; a Ctrl-C stops cleanly: the suites stop their helper
    processes, [`cleanup`][aioxen.bench.harness.cleanup] reaps any left and removes the
    temporary directories, and the exit status is 130 (no traceback)."""
    progress = Progress()
    try:
        rc = _run(args, progress)
    except KeyboardInterrupt:
        # a second Ctrl-C must not cut the clean-up short (and print a traceback)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        progress.done()
        cleanup()
        print(
            "benchmarks interrupted (Ctrl-C): helper processes stopped, temporary files removed",
            file=sys.stderr,
        )
        return 130
    cleanup()
    return rc


def _run(args: argparse.Namespace, progress: Progress) -> int:
    names = args.suites or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(
            f"aioxen bench: unknown suite(s): {', '.join(unknown)}; known: {', '.join(SUITES)}",
            file=sys.stderr,
        )
        return 2
    loops = ["uvloop", "asyncio"] if args.loop == "both" else [args.loop]
    reps = args.reps or (1 if args.quick else 3)
    selected = args.mechanisms.split(",") if args.mechanisms else None
    results: list[Measurement] = []
    t0 = time.monotonic()
    for loop in loops:
        ctx = Context(quick=args.quick, loop=loop, repetitions=reps, progress=progress)
        for name in names:
            module: Any = importlib.import_module(SUITES[name])
            if name == "memcpy" and loop != loops[0]:
                continue  # independent of the event loop
            try:
                if "selected" in module.run.__code__.co_varnames:
                    results += module.run(ctx, selected)
                else:
                    results += module.run(ctx)
            except Exception as exc:  # report and carry on with the other suites
                progress.done()
                print(f"suite {name} ({loop}) failed: {exc!r}", file=sys.stderr)
                if not args.keep_going:
                    raise
    progress.done()
    print(format_table(results))
    print(f"\n{len(results)} measurements in {time.monotonic() - t0:.1f} s")
    machine = describe(loops)
    if args.json:
        write_json(args.json, results, machine)
        print(f"JSON written to {args.json}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(format_markdown(results, machine))
        print(f"Markdown written to {args.markdown}")
    if args.plot:
        from aioxen.bench.plots import plot

        for path in plot(results, args.plot):
            print(f"chart written to {path}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmark suites",
        description="Run benchmark suites, print a table, write JSON, Markdown or charts "
        "(also: python -m benchmarks).",
    )
    add_arguments(parser)
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="report a failing suite and continue with the others",
    )
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    add_arguments(parser)
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="report a failing suite and continue with the others",
    )
    return run(parser.parse_args(argv))
