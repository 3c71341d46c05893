"""PNG charts for benchmark results (needs the optional ``bench`` extra: matplotlib).

Per suite and event loop (file ``SUITE[-LOOP]-KIND.png``; the loop is left out where it
does not apply, as for ``memcpy``):

* ``throughput`` -- throughput against chunk size, one line per mechanism (suites that vary
  the chunk size);
* ``latency`` -- every time-valued result (ping-pong percentiles, set-up times), bars per
  mechanism on a **log** axis, so a p50 next to a p99.9 stays readable;
* ``cases`` -- every other result, one panel per metric, bars per case and mechanism with
  the min–max spread as error bars (log axis where the values span more than 20×).

And once per loop, ``ratio[-LOOP].png``: "aioxen vs the best baseline, per case" -- for
each case where aioxen and at least one baseline measured the same metric, how many times
better aioxen is than the *best* baseline of that case (log axis; right of 1 = aioxen
ahead).  aioxen's bars are the ones the harness marks ``ours``.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from typing import Any

from aioxen.bench.harness import Measurement

TIME_UNITS_US = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
"""Time units and their size in µs: results in these units are latencies."""


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._]+", "_", text).strip("_")
    return slug or "results"


def _loop_label(loop: str) -> str:
    """The loop as shown; ``""`` where it does not apply (``memcpy`` records ``-``)."""
    return "" if loop in ("", "-") else loop


def _file_name(suite: str, loop: str, kind: str) -> str:
    parts = [_slug(suite)]
    if _loop_label(loop):
        parts.append(_slug(loop))
    parts.append(kind)
    return "-".join(parts) + ".png"


def _title(text: str, loop: str) -> str:
    label = _loop_label(loop)
    return f"{text} ({label})" if label else text


def _is_latency(m: Measurement) -> bool:
    return m.unit in TIME_UNITS_US and not m.higher_is_better


def _is_throughput_curve(m: Measurement) -> bool:
    return "chunk" in m.params or (m.suite == "memcpy" and "size" in m.params)


def best_baseline_ratios(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """Per case, metric and loop: each aioxen mechanism against the best baseline
    (``times_better`` > 1: aioxen ahead).  Groups without a baseline are left out."""
    groups: dict[tuple[str, str, str, str], list[Measurement]] = defaultdict(list)
    for m in measurements:
        if m.samples and m.median == m.median and m.median > 0:
            groups[m.key()].append(m)
    out: list[dict[str, Any]] = []
    for (suite, case, metric, loop), group in groups.items():
        bases = [m for m in group if not m.ours]
        if not bases:
            continue
        hib = group[0].higher_is_better
        best = max(bases, key=lambda m: m.median if hib else -m.median)
        for o in (m for m in group if m.ours):
            ratio = o.median / best.median if hib else best.median / o.median
            out.append(
                {
                    "suite": suite,
                    "case": case,
                    "metric": metric,
                    "loop": loop,
                    "ours": o.mechanism,
                    "baseline": best.mechanism,
                    "times_better": ratio,
                }
            )
    return out


def plot(measurements: list[Measurement], directory: str) -> list[str]:
    """Write the charts described in the module docstring; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        path = os.path.join(directory, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    by_suite: dict[tuple[str, str], list[Measurement]] = defaultdict(list)
    for m in measurements:
        if m.samples:
            by_suite[(m.suite, m.loop)].append(m)
    for (suite, loop), ms in sorted(by_suite.items()):
        thr = [m for m in ms if _is_throughput_curve(m) and m.metric in ("throughput", "bandwidth")]
        if thr:
            save(_throughput_chart(plt, suite, loop, thr), _file_name(suite, loop, "throughput"))
        lat = [m for m in ms if _is_latency(m)]
        if lat:
            save(_latency_chart(plt, suite, loop, lat), _file_name(suite, loop, "latency"))
        done = {id(m) for m in thr + lat}
        rest = [m for m in ms if id(m) not in done]
        if rest:
            save(_cases_chart(plt, suite, loop, rest), _file_name(suite, loop, "cases"))
    by_loop: dict[str, list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_loop[m.loop].append(m)
    for loop, ms in sorted(by_loop.items()):
        rat = best_baseline_ratios(ms)
        if rat:
            save(_ratio_chart(plt, loop, rat), _file_name("ratio", loop, "best-baseline"))
    return written


def _throughput_chart(plt: Any, suite: str, loop: str, thr: list[Measurement]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    ours = {m.mechanism for m in thr if m.ours}
    for m in thr:
        size = int(m.params.get("chunk", m.params.get("size", 0)))
        series[m.mechanism].append((size, m.median))
    for mech, points in sorted(series.items()):
        points.sort()
        ax.plot(
            [p[0] / 1024 for p in points],
            [p[1] for p in points],
            marker="o",
            linewidth=2.2 if mech in ours else 1.2,
            label=_label(mech, mech in ours),
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size (KiB)")
    ax.set_ylabel(thr[0].unit)
    ax.set_title(_title(f"{suite}: throughput vs chunk size", loop))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _latency_chart(plt: Any, suite: str, loop: str, lat: list[Measurement]) -> Any:
    mechs = sorted({m.mechanism for m in lat}, key=lambda x: (not _ours(lat, x), x))
    cases = sorted({m.case for m in lat})
    series = sorted({(m.case, m.metric) for m in lat}, key=lambda cm: (cm[0], _pct_order(cm[1])))
    smallest_us = min(m.median * TIME_UNITS_US[m.unit] for m in lat)
    scale, unit = (1e3, "ms") if smallest_us >= 500 else (1.0, "µs")
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(mechs) + 2), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (case, metric) in enumerate(series):
        vals, lows, highs = [], [], []
        for mech in mechs:
            found = [m for m in lat if (m.mechanism, m.case, m.metric) == (mech, case, metric)]
            if found:
                f = found[0]
                k = TIME_UNITS_US[f.unit] / scale
                vals.append(f.median * k)
                lows.append(f.median * k - f.min * k)
                highs.append(f.max * k - f.median * k)
            else:
                vals.append(math.nan)
                lows.append(0.0)
                highs.append(0.0)
        label = metric if len(cases) == 1 else f"{case}: {metric}"
        ax.bar(
            [j + i * width for j in range(len(mechs))],
            vals,
            width,
            yerr=[lows, highs],
            capsize=2,
            label=label,
        )
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(mechs))])
    ax.set_xticklabels([_label(m, _ours(lat, m), "\n") for m in mechs], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"{unit} (log scale)")
    what = cases[0] if len(cases) == 1 else "latency"
    ax.set_title(_title(f"{suite}: {what} (median, min–max)", loop))
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _cases_chart(plt: Any, suite: str, loop: str, ms: list[Measurement]) -> Any:
    groups: dict[tuple[str, str], list[Measurement]] = defaultdict(list)
    for m in ms:
        groups[(m.metric, m.unit)].append(m)
    n = len(groups)
    fig, axes = plt.subplots(n, 1, figsize=(8, 3.4 * n), squeeze=False)
    for ax, ((metric, unit), gms) in zip(axes[:, 0], sorted(groups.items()), strict=True):
        cases = list(dict.fromkeys(m.case for m in gms))
        mechs = sorted({m.mechanism for m in gms}, key=lambda x: (not _ours(gms, x), x))
        width = 0.8 / max(1, len(mechs))
        for i, mech in enumerate(mechs):
            vals, lows, highs = [], [], []
            for case in cases:
                found = [m for m in gms if (m.mechanism, m.case) == (mech, case)]
                if found:
                    f = found[0]
                    vals.append(f.median)
                    lows.append(f.median - f.min)
                    highs.append(f.max - f.median)
                else:
                    vals.append(math.nan)
                    lows.append(0.0)
                    highs.append(0.0)
            ax.bar(
                [j + i * width for j in range(len(cases))],
                vals,
                width,
                yerr=[lows, highs],
                capsize=2,
                hatch="//" if _ours(gms, mech) else None,
                label=_label(mech, _ours(gms, mech)),
            )
        ax.set_xticks([j + width * (len(mechs) - 1) / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=8, rotation=15 if len(cases) > 4 else 0)
        positive = [m.median for m in gms if m.median > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_yscale("log")
            ax.set_ylabel(f"{unit} (log scale)")
        else:
            ax.set_ylabel(unit)
        better = "higher is better" if gms[0].higher_is_better else "lower is better"
        ax.set_title(_title(f"{suite}: {metric}, {better}", loop), fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _ratio_chart(plt: Any, loop: str, rat: list[dict[str, Any]]) -> Any:
    rows = sorted(rat, key=lambda r: (r["suite"], r["case"], r["metric"], r["ours"]))
    labels = [
        f"{r['suite']}: {r['case']} · {r['metric']} · {r['ours']} vs {r['baseline']}" for r in rows
    ]
    values = [r["times_better"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.26 * len(rows)))
    ys = list(range(len(rows)))[::-1]
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    # bars grow from 1 (a tie): right when aioxen is ahead, left when behind
    ax.barh(ys, [v - 1.0 for v in values], left=1.0, color=colors, height=0.7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    for y, v in zip(ys, values, strict=True):
        txt = f"{v:.2f}×" if v >= 0.1 else f"{v:.2g}×"
        ax.text(v, y, f" {txt} ", va="center",
                ha="left" if v >= 1 else "right", fontsize=6)  # fmt: skip
    lo, hi = min([*values, 1.0]), max([*values, 1.0])
    ax.set_xlim(lo / 2.5, hi * 2.5)  # room for the value labels
    ax.set_xlabel("times better than the best baseline (log scale; > 1: aioxen ahead)")
    ax.set_title(_title("aioxen vs the best baseline, per case", loop))
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return fig


def _label(mech: str, ours: bool, sep: str = " ") -> str:
    """A mechanism's name, marked when it is aioxen's own."""
    return f"{mech}{sep}(aioxen)" if ours and "aioxen" not in mech else mech


def _ours(ms: list[Measurement], mech: str) -> bool:
    return any(m.ours for m in ms if m.mechanism == mech)


def _pct_order(metric: str) -> tuple[float, str]:
    """p50 < p99 < p99.9, other names after, alphabetically."""
    match = re.fullmatch(r"(?:.*\s)?p(\d+(?:\.\d+)?)", metric)
    return (float(match.group(1)), metric) if match else (math.inf, metric)


def load_json(path: str) -> list[Measurement]:
    """The measurements of a ``--json`` file (to redraw charts without re-measuring)."""
    import json

    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    fields = set(Measurement.__dataclass_fields__)
    return [Measurement(**{k: v for k, v in d.items() if k in fields}) for d in doc["measurements"]]


__all__ = ["TIME_UNITS_US", "best_baseline_ratios", "load_json", "plot"]


def main(argv: list[str] | None = None) -> int:
    """``python -m aioxen.bench.plots RESULTS.json DIR``: redraw the charts of a run."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m aioxen.bench.plots RESULTS.json DIR", file=sys.stderr)
        return 2
    for path in plot(load_json(args[0]), args[1]):
        print(f"chart written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
