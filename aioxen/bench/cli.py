"""``python -m benchmarks`` / ``aioxen bench``: run suites, print a table, write JSON/plots."""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from aioxen.bench.harness import (
    STABLE,
    Context,
    Measurement,
    Progress,
    annotate,
    cleanup,
    format_markdown,
    format_table,
    summary,
    write_json,
)
from aioxen.bench.machine import describe
from aioxen.bench.mechanisms import DEFAULT_MECHANISMS, MECHANISMS

SUITES: dict[str, str] = {
    "memcpy": "aioxen.bench.suites.memcpy",
    "streams": "aioxen.bench.suites.streams",
    "protocol": "aioxen.bench.suites.protocol",
    "net": "aioxen.bench.suites.net",
    "setup": "aioxen.bench.suites.setup",
    "xenstore": "aioxen.bench.suites.xenstore",
    "rings": "aioxen.bench.suites.rings",
    "blk": "aioxen.bench.suites.blk",
    "qrexec": "aioxen.bench.suites.qrexec",
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
        help="small sizes, short runs and one repetition: a smoke test, not a measurement",
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
        help="repetitions per figure (default 1 quick, 5 otherwise); the table reports "
        "median, min and max and flags a figure whose worst repetition is below "
        f"{STABLE}x its median",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="steady-state time each repetition of a figure is timed for (default 0.2 quick, "
        "1.0 otherwise)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="time each repetition runs before timing starts (default 0.05 quick, 0.2 otherwise)",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated case names to measure in the streams and protocol suites "
        "(e.g. 'bulk 64 KiB,ping-pong 64 B'; default: all)",
    )
    parser.add_argument(
        "--note",
        default="",
        help="a sentence about the run (e.g. 'machine shared with other jobs'), stored in "
        "the JSON and Markdown",
    )
    parser.add_argument(
        "--mechanisms",
        default=None,
        help="comma-separated mechanisms for the stream suites (default: "
        f"{','.join(DEFAULT_MECHANISMS)}, plus the variants each suite adds; known: "
        f"{','.join(MECHANISMS)})",
    )
    parser.add_argument(
        "--qubes-bin",
        metavar="DIR",
        help="qrexec suite: also measure Qubes' qrexec-daemon/-agent/-client found in DIR "
        "(built against libvchan-socket)",
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
    reps = args.reps or (1 if args.quick else 5)
    seconds = args.seconds if args.seconds is not None else (0.2 if args.quick else 1.0)
    warmup = args.warmup if args.warmup is not None else (0.05 if args.quick else 0.2)
    if reps < 1 or seconds <= 0 or warmup < 0:
        print("aioxen bench: --reps, --seconds must be positive, --warmup >= 0", file=sys.stderr)
        return 2
    if args.qubes_bin:  # read by the qrexec suite
        if not os.path.isdir(args.qubes_bin):
            print(f"aioxen bench: --qubes-bin {args.qubes_bin}: not a directory", file=sys.stderr)
            return 2
        os.environ["AIOXEN_BENCH_QUBES_BIN"] = os.path.abspath(args.qubes_bin)
    selected = args.mechanisms.split(",") if args.mechanisms else None
    results: list[Measurement] = []
    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.UTC)
    load0 = os.getloadavg()
    for loop in loops:
        ctx = Context(
            quick=args.quick,
            loop=loop,
            repetitions=reps,
            progress=progress,
            seconds=seconds,
            warmup=warmup,
            cases=args.cases.split(",") if args.cases else None,
        )
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
    annotate(results)
    elapsed = time.monotonic() - t0
    print(format_table(results))
    print(f"\n{summary(results)}")
    print(f"{len(results)} measurements in {elapsed:.1f} s")
    machine = describe(loops)
    load1 = os.getloadavg()
    machine["run"] = (
        f"{' '.join(names)}; {reps} repetitions of >= {seconds:g} s steady state "
        f"(warm-up {warmup:g} s){', quick' if args.quick else ''}; started "
        f"{started:%Y-%m-%d %H:%M} UTC, took {elapsed / 60:.1f} min; load average "
        f"{load0[0]:.1f} before, {load1[0]:.1f} after" + (f"; {args.note}" if args.note else "")
    )
    machine["elapsed_s"] = elapsed
    machine["settings"] = {"repetitions": reps, "seconds": seconds, "warmup": warmup}
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
