"""Benchmark harness: measurements, repetitions, ratios, progress, table, JSON and plots.

Theory of operation
-------------------
A *suite* is a function ``run(ctx) -> list[Measurement]``.  It measures aioxen's mechanism
and the baselines users would otherwise pick *in the same run*, interleaving them inside
each repetition so that machine noise hits all of them alike.  Every [`Measurement`][]
keeps all its samples; the report shows the median, min and max, and for each of our
mechanisms the ratio to every baseline measuring the same case and metric ("× better", so
latency ratios are inverted).  Speed is never asserted: the harness only reports.

Steady state: every repetition of a figure first runs its workload for a warm-up
([`Context.warmup`][], not counted), then times at least [`Context.seconds`][] of it
(default 1 s; [`timed_async`][] and the suites' own loops), never a fixed small amount of work
that a fast path finishes in milliseconds.  Stability: a figure whose worst repetition is
below [`STABLE`][] times its median (min for throughput, max for latency, inverted) is
flagged ``unstable``.  Busy-polling: a ``vchan`` figure measured also with polling off
(mechanism name + [`NO_POLL`][]) is flagged ``needs a free core`` when that counterpart
is below [`STABLE`][] times it -- the poll policy turns polling off by itself when the
CPUs are contended, so that counterpart is what a loaded machine gets.

Helper processes and temporary directories go through [`spawn`][] and
[`make_temp_dir`][].  A helper runs in its own process group, so a Ctrl-C at the
terminal reaches only the benchmark process; the suites' ``finally`` blocks then stop
their helpers in order, and [`cleanup`][] (run by the CLI at the end, also after a
Ctrl-C) stops and reaps any helper still running and removes any directory still there.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

STABLE = 0.7
"""A figure is stable when its worst repetition is at least this fraction of its median."""
NO_POLL = " no-poll"
"""Suffix of a mechanism's variant measured with busy-polling off."""
FREE_CORE_FLAG = "needs a free core"
POLL_HURT_FLAG = "busy-polling cost here"
UNSTABLE_FLAG = "unstable"


@dataclass
class Measurement:
    """All samples of one metric of one case on one mechanism."""

    suite: str
    case: str
    mechanism: str
    metric: str
    unit: str
    higher_is_better: bool
    ours: bool
    samples: list[float] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    loop: str = ""
    note: str = ""
    """A non-default setting (or other caveat), shown beside the figure."""
    flags: list[str] = field(default_factory=list)
    """Set by [`annotate`][]: ``unstable``, ``needs a free core (...)``."""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def key(self) -> tuple[str, str, str, str]:
        return (self.suite, self.case, self.metric, self.loop)

    def worst_ratio(self) -> float:
        """The worst repetition as a fraction of the median (1.0: no spread)."""
        if not self.samples or self.median == 0:
            return float("nan")
        if self.higher_is_better:
            return self.min / self.median
        return self.median / self.max if self.max else float("nan")

    @property
    def stable(self) -> bool:
        ratio = self.worst_ratio()
        return not ratio < STABLE  # NaN (no samples) counts as stable: nothing to flag

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median=self.median, min=self.min, max=self.max)
        return data


class Collector:
    """Measurements of one suite run, created on first use and keyed by case/mechanism/metric."""

    def __init__(self, suite: str, loop: str) -> None:
        self.suite, self.loop = suite, loop
        self._by_key: dict[tuple[str, str, str], Measurement] = {}

    def get(
        self,
        case: str,
        mechanism: str,
        metric: str,
        unit: str,
        higher_is_better: bool,
        ours: bool,
        params: dict[str, Any] | None = None,
        note: str = "",
    ) -> Measurement:
        key = (case, mechanism, metric)
        if key not in self._by_key:
            self._by_key[key] = Measurement(
                suite=self.suite,
                case=case,
                mechanism=mechanism,
                metric=metric,
                unit=unit,
                higher_is_better=higher_is_better,
                ours=ours,
                params=dict(params or {}),
                loop=self.loop,
                note=note,
            )
        return self._by_key[key]

    def results(self) -> list[Measurement]:
        return list(self._by_key.values())


class Progress:
    """A one-line progress indicator on stderr (plain lines when stderr is not a tty)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_len = 0

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        line = f"[{elapsed:6.1f}s] {message}"
        if self.tty:
            pad = max(0, self._last_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
        self._last_len = 0


@dataclass
class Context:
    """What a suite gets: effort level, event loop choice, repetitions and progress."""

    quick: bool
    loop: str  # "uvloop" or "asyncio"
    repetitions: int
    progress: Callable[[str], None]
    seconds: float = 1.0
    """Steady-state time per repetition of each figure."""
    warmup: float = 0.2
    """Time each repetition runs its workload before timing starts."""
    cases: list[str] | None = None
    """``--cases``: only these case names (the suites with many cases honour it)."""

    def wants(self, case: str) -> bool:
        return self.cases is None or case in self.cases

    def loop_factory(self) -> Callable[[], Any]:
        import asyncio

        if self.loop == "uvloop":
            import uvloop

            return uvloop.new_event_loop
        return asyncio.new_event_loop


async def timed_async(step: Callable[[], Awaitable[float]], seconds: float, warmup: float) -> float:
    """Units per second of ``step()`` in steady state: ``step`` (which returns how many
    units it did) runs back to back for ``warmup`` seconds (at least once, not counted),
    then for at least ``seconds``, timed."""
    end = time.perf_counter() + warmup
    while True:
        await step()
        if time.perf_counter() >= end:
            break
    units = 0.0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        units += await step()
        now = time.perf_counter()
        if now >= end:
            return units / (now - t0)


def timed_sync(step: Callable[[], float], seconds: float, warmup: float) -> float:
    """[`timed_async`][] for a blocking ``step``."""
    end = time.perf_counter() + warmup
    while True:
        step()
        if time.perf_counter() >= end:
            break
    units = 0.0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        units += step()
        now = time.perf_counter()
        if now >= end:
            return units / (now - t0)


def annotate(measurements: list[Measurement]) -> list[Measurement]:
    """Set each measurement's ``flags``: ``unstable`` (worst repetition below [`STABLE`][]
    times the median) and, for a figure whose [`NO_POLL`][] counterpart was measured in
    the same run, ``needs a free core`` when the counterpart is below [`STABLE`][] times
    it, and ``busy-polling cost here`` when it is above 1/[`STABLE`][] times it (polling
    took CPU time the peer needed).  Returns ``measurements``."""
    by_key: dict[tuple[str, str, str, str, str], Measurement] = {
        (*m.key(), m.mechanism): m for m in measurements
    }
    for m in measurements:
        m.flags = []
        if not m.stable:
            m.flags.append(f"{UNSTABLE_FLAG} (worst {m.worst_ratio():.2f}× median)")
        other = by_key.get((*m.key(), m.mechanism + NO_POLL))
        if other is None or not other.samples or not m.samples or m.median == 0:
            continue
        ratio = other.median / m.median if m.higher_is_better else m.median / other.median
        if ratio < STABLE:
            m.flags.append(f"{FREE_CORE_FLAG} (no-poll: {ratio:.2f}×)")
        elif ratio > 1 / STABLE:  # polling cost more than it saved (e.g. no free core)
            m.flags.append(f"{POLL_HURT_FLAG} (no-poll: {ratio:.2f}×)")
    return measurements


def _notes(m: Measurement) -> str:
    return "; ".join([n for n in (m.note, *m.flags) if n])


def summary(measurements: list[Measurement]) -> str:
    """One line: how many figures are unstable or need a free core."""
    unstable = [m for m in measurements if any(f.startswith(UNSTABLE_FLAG) for f in m.flags)]
    polled = [m for m in measurements if any(f.startswith(FREE_CORE_FLAG) for f in m.flags)]
    hurt = [m for m in measurements if any(f.startswith(POLL_HURT_FLAG) for f in m.flags)]
    ours = [m for m in measurements if m.ours]
    return (
        f"{len(unstable)} of {len(measurements)} figures unstable "
        f"({sum(m.ours for m in unstable)} of {len(ours)} of aioxen's; rule: worst "
        f"repetition < {STABLE}× median); {len(polled)} need a free core for busy-polling, "
        f"in {len(hurt)} busy-polling cost more than it saved"
    )


def ratios(measurements: Iterable[Measurement]) -> list[dict[str, Any]]:
    """For each of our measurements, the ratio to each baseline of the same case/metric.

    The ratio reads "times better": ours/baseline for throughput, baseline/ours for latency.
    """
    groups: dict[tuple[str, str, str, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault(m.key(), []).append(m)
    out: list[dict[str, Any]] = []
    for group in groups.values():
        ours = [m for m in group if m.ours]
        bases = [m for m in group if not m.ours]
        for o in ours:
            for b in bases:
                if not (o.samples and b.samples) or o.median == 0 or b.median == 0:
                    continue
                ratio = o.median / b.median if o.higher_is_better else b.median / o.median
                out.append(
                    {
                        "suite": o.suite,
                        "case": o.case,
                        "metric": o.metric,
                        "loop": o.loop,
                        "ours": o.mechanism,
                        "baseline": b.mechanism,
                        "times_better": ratio,
                        "notes": _notes(o),
                    }
                )
    return out


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def format_table(measurements: list[Measurement]) -> str:
    """A plain-text table: one row per measurement, ratio rows after each group."""
    rows: list[tuple[str, ...]] = [
        ("suite", "case", "metric", "loop", "mechanism", "median", "min", "max", "unit", "notes")
    ]
    for m in measurements:
        rows.append(
            (
                m.suite,
                m.case,
                m.metric,
                m.loop,
                m.mechanism + (" *" if m.ours else ""),
                _fmt(m.median),
                _fmt(m.min),
                _fmt(m.max),
                m.unit,
                _notes(m),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    rat = ratios(measurements)
    if rat:
        text += "\n\nRatios (× better than the baseline; * = aioxen)\n"
        rrows = [("suite", "case", "metric", "loop", "aioxen", "baseline", "× better")]
        for r in rat:
            rrows.append(
                (
                    r["suite"],
                    r["case"],
                    r["metric"],
                    r["loop"],
                    r["ours"],
                    r["baseline"],
                    f"{r['times_better']:.2f}",
                )
            )
        rw = [max(len(r[i]) for r in rrows) for i in range(len(rrows[0]))]
        rl = ["  ".join(c.ljust(w) for c, w in zip(r, rw, strict=True)) for r in rrows]
        rl.insert(1, "  ".join("-" * w for w in rw))
        text += "\n".join(rl)
    return text


def format_markdown(measurements: list[Measurement], machine: dict[str, Any]) -> str:
    """The results as Markdown: the machine, one table per suite, then the ratios."""
    lines = [
        f"Machine: {machine.get('cpu_model')}, {machine.get('cores')} cores, "
        f"Python {machine.get('python')}, uvloop {machine.get('uvloop')}, "
        f"aioxen {machine.get('aioxen')}, kernel {machine.get('kernel')}.",
        "",
    ]
    if machine.get("run"):
        lines += [f"Run: {machine['run']}", ""]
    lines += [summary(measurements) + ".", ""]
    suites: dict[str, list[Measurement]] = {}
    for m in measurements:
        suites.setdefault(m.suite, []).append(m)
    for suite, ms in suites.items():
        lines += [f"### {suite}", ""]
        lines += ["| case | metric | loop | mechanism | median | min | max | unit | notes |"]
        lines += ["|---|---|---|---|---:|---:|---:|---|---|"]
        for m in ms:
            mech = f"**{m.mechanism}**" if m.ours else m.mechanism
            lines.append(
                f"| {m.case} | {m.metric} | {m.loop} | {mech} | {_fmt(m.median)} | "
                f"{_fmt(m.min)} | {_fmt(m.max)} | {m.unit} | {_notes(m)} |"
            )
        rat = ratios(ms)
        if rat:
            lines += ["", "| case | metric | loop | aioxen | baseline | × better | notes |"]
            lines += ["|---|---|---|---|---|---:|---|"]
            for r in rat:
                lines.append(
                    f"| {r['case']} | {r['metric']} | {r['loop']} | {r['ours']} | "
                    f"{r['baseline']} | {r['times_better']:.2f} | {r['notes']} |"
                )
        lines.append("")
    return "\n".join(lines)


def write_json(path: str, measurements: list[Measurement], machine: dict[str, Any]) -> None:
    doc = {
        "machine": machine,
        "summary": summary(measurements),
        "measurements": [m.to_json() for m in measurements],
        "ratios": ratios(measurements),
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


_children: list[subprocess.Popen[Any]] = []
_temp_dirs: list[str] = []


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(args, **kwargs)`` for a benchmark helper: in a process group of
    its own (a terminal's SIGINT reaches only the benchmark, which stops its helpers
    itself) and tracked for [`cleanup`][]."""
    _children[:] = [p for p in _children if p.returncode is None]
    proc = subprocess.Popen(args, process_group=0, **kwargs)
    _children.append(proc)
    return proc


def shm_dir() -> str | None:
    """Where grant page files and images go: ``$AIOXEN_BENCH_SHM`` if set, else
    ``/dev/shm`` (tmpfs, like real shared memory) if writable, else ``None`` (the default
    temporary directory)."""
    chosen = os.environ.get("AIOXEN_BENCH_SHM")
    if chosen:
        return chosen
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return None


def make_temp_dir(prefix: str, dir: str | None = None) -> str:
    """``tempfile.mkdtemp`` tracked for [`cleanup`][]."""
    path = tempfile.mkdtemp(prefix=prefix, dir=dir)
    _temp_dirs.append(path)
    return path


def cleanup(timeout: float = 10) -> None:
    """Stop and reap every helper [`spawn`][] started that is still running; remove every
    directory [`make_temp_dir`][] made that is still there."""
    while _children:
        end_process(_children.pop(), timeout)
    while _temp_dirs:
        shutil.rmtree(_temp_dirs.pop(), ignore_errors=True)


def end_process(proc: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM a helper process and reap it; SIGKILL it if it is still there after
    ``timeout`` seconds.  Returns its exit status (also if it had already exited)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


__all__ = [
    "NO_POLL",
    "STABLE",
    "Collector",
    "Context",
    "Measurement",
    "Progress",
    "annotate",
    "cleanup",
    "end_process",
    "format_markdown",
    "format_table",
    "make_temp_dir",
    "ratios",
    "shm_dir",
    "spawn",
    "summary",
    "timed_async",
    "timed_sync",
    "write_json",
]
