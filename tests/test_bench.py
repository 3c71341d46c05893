"""The benchmark harness: ratio arithmetic, and a ``--quick`` smoke run of every suite.

Nothing here asserts a speed: the smoke run only proves that one command measures every
suite, ours and the baselines side by side, and writes the JSON the docs are made from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aioxen.bench import harness, plots
from aioxen.bench.cli import SUITES
from aioxen.bench.harness import (
    NO_POLL,
    Measurement,
    annotate,
    format_markdown,
    format_table,
    ratios,
    summary,
)


def _m(mech: str, ours: bool, samples: list[float], hib: bool = True) -> Measurement:
    return Measurement(
        suite="s",
        case="c",
        mechanism=mech,
        metric="m",
        unit="u",
        higher_is_better=hib,
        ours=ours,
        samples=samples,
        loop="uvloop",
    )


def test_ratio_is_times_better_for_throughput_and_latency() -> None:
    thr = ratios([_m("ours", True, [4.0, 6.0, 5.0]), _m("base", False, [2.0, 3.0, 2.5])])
    assert [r["times_better"] for r in thr] == [2.0]
    lat = ratios([_m("ours", True, [10.0], hib=False), _m("base", False, [30.0], hib=False)])
    assert [r["times_better"] for r in lat] == [3.0]


def test_table_lists_every_measurement_and_the_ratios() -> None:
    text = format_table([_m("ours", True, [1.0, 3.0, 2.0]), _m("base", False, [1.0])])
    assert "ours *" in text and "base" in text
    assert "× better" in text and "2.00" in text


def test_a_figure_whose_worst_repetition_is_below_0_7_of_its_median_is_flagged() -> None:
    shaky = _m("ours", True, [10.0, 10.0, 6.9])  # min 0.69x the median
    steady = _m("base", False, [10.0, 10.0, 7.1])
    slow_tail = _m("lat", True, [10.0, 10.0, 14.5], hib=False)  # max: median/max 0.69
    annotate([shaky, steady, slow_tail])
    assert [f.split()[0] for f in shaky.flags] == ["unstable"]
    assert steady.flags == []
    assert [f.split()[0] for f in slow_tail.flags] == ["unstable"]
    assert shaky.worst_ratio() == pytest.approx(0.69)
    text = format_table([shaky, steady])
    assert "unstable (worst 0.69× median)" in text
    assert "1 of 2 figures unstable" in summary([shaky, steady])


def test_a_figure_that_needs_busy_polling_is_flagged_by_its_no_poll_counterpart() -> None:
    polled = _m("vchan/unix", True, [10.0], hib=False)  # latency: 10 µs polled
    no_poll = _m("vchan/unix" + NO_POLL, True, [30.0], hib=False)  # 30 µs without
    fast = _m("vchan/unix", True, [5.0])
    fast.case = "bulk"
    fast_np = _m("vchan/unix" + NO_POLL, True, [4.0])  # 0.8x: not flagged
    fast_np.case = "bulk"
    annotate([polled, no_poll, fast, fast_np])
    assert polled.flags == ["needs a free core (no-poll: 0.33×)"]
    assert no_poll.flags == [] and fast.flags == [] and fast_np.flags == []
    slow = _m("ring/unix", True, [100.0])
    slow_np = _m("ring/unix" + NO_POLL, True, [300.0])  # polling cost 3x on a busy machine
    annotate([slow, slow_np])
    assert slow.flags == ["busy-polling cost here (no-poll: 3.00×)"]
    assert "1 need a free core" in summary([polled, no_poll, fast, fast_np])
    md = format_markdown([polled, no_poll], {"run": "streams; shared machine"})
    assert "| needs a free core (no-poll: 0.33×) |" in md
    assert "Run: streams; shared machine" in md


def test_a_non_default_setting_is_said_beside_the_figure() -> None:
    wide = _m("vchan/unix 1 MiB rings", True, [3.0])
    wide.note = "1 MiB rings each way (non-default)"
    base = _m("unix-socket", False, [1.0])
    annotate([wide, base])
    md = format_markdown([wide, base], {})
    assert (
        "| **vchan/unix 1 MiB rings** | 3 | 3 | 3 | u | 1 MiB rings each way (non-default) |" in md
    )
    (ratio,) = ratios([wide, base])
    assert ratio["notes"] == "1 MiB rings each way (non-default)"


def test_timed_loops_leave_the_warm_up_out_and_time_at_least_the_given_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fake clock: each step takes 0.1 s and does 1 unit during the warm-up, 2 after."""
    clock = [0.0]
    calls: list[float] = []

    def now() -> float:
        return clock[0]

    def step() -> float:
        clock[0] += 0.1
        calls.append(clock[0])
        return 2.0 if clock[0] > 0.55 else 1.0

    async def astep() -> float:
        return step()

    monkeypatch.setattr(harness.time, "perf_counter", now)
    assert harness.timed_sync(step, seconds=1.0, warmup=0.5) == pytest.approx(20.0)
    assert calls[-1] >= 1.5
    clock[0], calls[:] = 0.0, []
    assert asyncio.run(harness.timed_async(astep, seconds=1.0, warmup=0.5)) == pytest.approx(20.0)
    assert calls[-1] >= 1.5


def test_quick_run_of_every_suite_writes_json_and_charts(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    charts = tmp_path / "charts"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out), "--plot", str(charts)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    machine = doc["machine"]
    for key in ("cpu_model", "cores", "python", "loops", "aioxen", "run"):
        assert machine[key], key
    assert machine["settings"] == {"repetitions": 1, "seconds": 0.2, "warmup": 0.05}
    assert "figures unstable" in doc["summary"]
    assert all("flags" in m and "note" in m for m in doc["measurements"])
    suites = {m["suite"] for m in doc["measurements"]}
    assert suites == set(SUITES)
    for suite in suites - {"memcpy"}:
        ms = [m for m in doc["measurements"] if m["suite"] == suite]
        assert any(m["ours"] for m in ms) and any(not m["ours"] for m in ms), suite
        assert all(m["samples"] for m in ms), suite
    assert {r["suite"] for r in doc["ratios"]} == suites - {"memcpy"}
    assert "measurements in" in proc.stdout
    pngs = sorted(p.name for p in charts.glob("*.png"))
    assert "streams-uvloop-throughput.png" in pngs and "streams-uvloop-latency.png" in pngs
    assert "ratio-uvloop-best-baseline.png" in pngs
    for suite in SUITES:  # a chart for every suite
        assert any(p.startswith(f"{suite}-") for p in pngs), (suite, pngs)
    assert not [p for p in pngs if "--" in p or " " in p], pngs
    assert all((charts / p).read_bytes().startswith(b"\x89PNG") for p in pngs)


def test_chart_names_and_titles_leave_out_a_loop_that_does_not_apply() -> None:
    assert plots._file_name("memcpy", "-", "throughput") == "memcpy-throughput.png"
    assert plots._title("memcpy: throughput vs chunk size", "-") == (
        "memcpy: throughput vs chunk size"
    )
    assert plots._file_name("streams", "uvloop", "latency") == "streams-uvloop-latency.png"
    assert plots._title("x", "asyncio") == "x (asyncio)"
    assert plots._file_name("a b/c", "", "cases") == "a_b_c-cases.png"


def test_best_baseline_ratio_picks_the_best_baseline_per_case() -> None:
    thr = [
        _m("ours", True, [6.0]),
        _m("slow", False, [2.0]),
        _m("fast", False, [3.0]),
    ]
    (r,) = plots.best_baseline_ratios(thr)
    assert (r["ours"], r["baseline"], r["times_better"]) == ("ours", "fast", 2.0)
    lat = [
        _m("ours", True, [10.0], hib=False),
        _m("slow", False, [40.0], hib=False),
        _m("fast", False, [5.0], hib=False),
    ]
    (r,) = plots.best_baseline_ratios(lat)
    assert (r["baseline"], r["times_better"]) == ("fast", 0.5)
    assert plots.best_baseline_ratios([_m("ours", True, [1.0])]) == []


def test_charts_from_a_json_file_cover_every_suite(tmp_path: Path) -> None:
    """Every suite gets a chart; latency is drawn on a log axis; the ratio chart exists.
    Drawn from a synthetic results file with one group of each kind the suites record."""
    ms = []
    for suite in SUITES:
        for mech, ours, value in (("ours-" + suite, True, 2.0), ("base", False, 1.0)):
            ms.append(
                Measurement(suite, "c1", mech, "rate", "ops/s", True, ours, [value], {}, "uvloop")
            )
    for mech, ours in (("vchan", True), ("unix", False)):
        for metric, value in (("p50", 20.0), ("p99.9", 4000.0)):
            ms.append(
                Measurement(
                    "streams", "ping-pong 64 B", mech, metric, "µs", False, ours, [value], {},
                    "uvloop",
                )
            )  # fmt: skip
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"measurements": [m.to_json() for m in ms]}))
    charts = tmp_path / "charts"
    assert plots.main([str(results), str(charts)]) == 0
    names = {p.name for p in charts.glob("*.png")}
    for suite in SUITES:
        assert f"{suite}-uvloop-cases.png" in names, names
    assert "streams-uvloop-latency.png" in names
    assert "ratio-uvloop-best-baseline.png" in names

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = [m for m in ms if m.unit == "µs"]
    fig = plots._latency_chart(plt, "streams", "uvloop", lat)
    assert fig.axes[0].get_yscale() == "log"
    plt.close(fig)


# --------------------------------------------------------------------------------------
# clean exits: no helper process and no temporary file outlives a run

REPO = Path(__file__).resolve().parents[1]


def _marked_processes(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds ``marker``."""
    needle = f"AIOXEN_TEST_MARKER={marker}".encode()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def _leftovers(dirs: list[Path]) -> list[str]:
    return [str(p) for d in dirs for p in d.iterdir()]


PrivateRun = tuple[str, dict[str, str], list[Path]]


@pytest.fixture
def private_run(tmp_path: Path) -> Iterator[PrivateRun]:
    """``(marker, env, dirs)`` for a benchmark run whose temporary files can only land in
    ``dirs`` (its ``$TMPDIR`` and ``$AIOXEN_BENCH_SHM``, the latter on tmpfs as the default
    is) and whose every descendant process carries ``marker`` in its environment."""
    marker = uuid.uuid4().hex
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    shm_parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    shm = Path(tempfile.mkdtemp(prefix="aioxen-test-bench-shm-", dir=shm_parent))
    env = dict(os.environ, TMPDIR=str(tmpdir), AIOXEN_BENCH_SHM=str(shm), AIOXEN_TEST_MARKER=marker)
    try:
        yield marker, env, [tmpdir, shm]
    finally:
        for pid in _marked_processes(marker):  # only after a failure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(shm, ignore_errors=True)


def test_quick_protocol_run_leaves_no_temporary_files(private_run: PrivateRun) -> None:
    marker, env, dirs = private_run
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "protocol",
         "--mechanisms", "unix-socket,vchan/unix"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _leftovers(dirs) == []
    assert _marked_processes(marker) == {}


def test_ctrl_c_stops_helpers_removes_temp_dirs_and_exits_130(private_run: PrivateRun) -> None:
    marker, env, dirs = private_run
    # A full-size streams run (minutes): it is interrupted as soon as both peers are up.
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "streams", "--reps", "1",
         "--mechanisms", "vchan/unix,unix-socket"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job has
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # a hang guard only
        peers: list[str] = []
        listening = False
        while len(peers) < 2 or not listening:  # both peers up, the socket peer listening
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the benchmark peers never started"
            time.sleep(0.1)
            peers = [c for c in _marked_processes(marker).values() if "aioxen.bench.peer" in c]
            listening = any(dirs[0].glob("aioxen-bench-*/sock"))
        assert any("xenstored" in c for c in _marked_processes(marker).values())
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "interrupted" in err
    assert _marked_processes(marker) == {}
    assert _leftovers(dirs) == []


def test_ctrl_c_in_the_rings_suite_is_clean_too(private_run: PrivateRun) -> None:
    """The rings suite holds a pinned ring when interrupted: it must release it before its
    platform closes (it raised ``BufferError`` with a traceback)."""
    marker, env, dirs = private_run
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "rings", "--reps", "3"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300  # a hang guard only
        servers: list[str] = []
        while len(servers) < 2:  # the ring server and the seqpacket server are up
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the rings servers never started"
            time.sleep(0.1)
            servers = [
                c for c in _marked_processes(marker).values() if "aioxen.bench.suites.rings" in c
            ]
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert _marked_processes(marker) == {}
    assert _leftovers(dirs) == []
