"""PNG charts for benchmark results (needs the optional ``bench`` extra: matplotlib)."""

from __future__ import annotations

import os
from collections import defaultdict

from aioxen.bench.harness import Measurement


def plot(measurements: list[Measurement], directory: str) -> list[str]:
    """Write one chart per suite/loop: throughput vs chunk size, latency percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written: list[str] = []
    by_suite: dict[tuple[str, str], list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_suite[(m.suite, m.loop)].append(m)
    for (suite, loop), ms in sorted(by_suite.items()):
        thr = [
            m
            for m in ms
            if (m.metric in ("throughput", "bandwidth") and "chunk" in m.params)
            or m.suite == "memcpy"
        ]
        if thr:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            series: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for m in thr:
                size = int(m.params.get("chunk", m.params.get("size", 0)))
                series[m.mechanism].append((size, m.median))
            for mech, points in sorted(series.items()):
                points.sort()
                ax.plot(
                    [p[0] / 1024 for p in points], [p[1] for p in points], marker="o", label=mech
                )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("chunk size (KiB)")
            ax.set_ylabel(thr[0].unit)
            ax.set_title(f"{suite}: throughput vs chunk size ({loop})")
            ax.grid(True, alpha=0.3)
            ax.legend()
            path = os.path.join(directory, f"{suite}-{loop}-throughput.png".replace("/", "_"))
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        lat = [m for m in ms if m.unit == "µs"]
        if lat:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            mechs = sorted({m.mechanism for m in lat})
            metrics = [x for x in ("p50", "p99", "p99.9") if any(m.metric == x for m in lat)]
            width = 0.8 / max(1, len(metrics))
            for i, metric in enumerate(metrics):
                vals = []
                for mech in mechs:
                    found = [m.median for m in lat if m.mechanism == mech and m.metric == metric]
                    vals.append(found[0] if found else 0.0)
                ax.bar([j + i * width for j in range(len(mechs))], vals, width, label=metric)
            ax.set_xticks([j + width * (len(metrics) - 1) / 2 for j in range(len(mechs))])
            ax.set_xticklabels(mechs, rotation=15)
            ax.set_ylabel("round trip (µs)")
            ax.set_title(f"{suite}: ping-pong latency distribution ({loop})")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend()
            path = os.path.join(directory, f"{suite}-{loop}-latency.png")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
