"""The benchmark harness: ratio arithmetic, and a ``--quick`` smoke run of every suite.

Nothing here asserts a speed: the smoke run only proves that one command measures every
suite, ours and the baselines side by side, and writes the JSON the docs are made from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from aioxen.bench.cli import SUITES
from aioxen.bench.harness import Measurement, format_table, ratios


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
    for key in ("cpu_model", "cores", "python", "loops", "aioxen"):
        assert machine[key], key
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
    assert all((charts / p).read_bytes().startswith(b"\x89PNG") for p in pngs)
