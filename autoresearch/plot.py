"""The progress chart, as in autoresearch's analysis: every experiment's metric, the running best.

`progress` is the chart as data (pure); `plot` draws it as a PNG for `autoresearch plot`,
and the dashboard draws the same points in the browser.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .state import State


@dataclass(frozen=True)
class Point:
    n: int
    outcome: str  # kept | discarded | crashed | rejected
    metric: float | None  # None: crashed, rejected or no finite metric (drawn as a mark)
    best: float | None  # the running best after this experiment
    label: str  # what a kept point is labelled with; the description elsewhere
    baseline: bool


def charted(exp) -> bool:
    """A finished experiment; failed baseline attempts are not experiments."""
    return exp.terminal and not (exp.kind == "baseline" and exp.state != "kept")


def progress(state: State, direction: str = "minimize") -> list[Point]:
    better = (lambda a, b: a < b) if direction == "minimize" else (lambda a, b: a > b)
    points, best = [], None
    for e in sorted(state.experiments.values(), key=lambda e: e.n):
        if not charted(e):
            continue
        ok = e.state in ("kept", "discarded") and e.metric is not None and math.isfinite(e.metric)
        if ok and e.state == "kept" and (best is None or better(e.metric, best)):
            best = e.metric
        label = "baseline" if e.kind == "baseline" else (e.description or e.reason or f"exp {e.n}")
        points.append(Point(e.n, e.state, e.metric if ok else None, best, label, e.kind == "baseline"))
    return points


def plot(state: State, out: Path, direction: str = "minimize", title: str = "") -> int:
    """Write a PNG to `out` (atomically); returns the number of experiments plotted."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    points = progress(state, direction)
    fig, ax = plt.subplots(figsize=(12, 6), dpi=120)
    ok = [(i, p) for i, p in enumerate(points) if p.metric is not None]
    kept = [(i, p) for i, p in ok if p.outcome == "kept"]
    failed = [i for i, p in enumerate(points) if p.metric is None]
    for i, p in kept:
        ax.annotate(p.label[:40], (i, p.metric), textcoords="offset points", xytext=(4, 6),
                    fontsize=7, rotation=20, color="#1a7f37")
    ax.scatter([i for i, _ in ok], [p.metric for _, p in ok], s=14, color="#9aa0a6", label="discarded",
               zorder=2)
    ax.scatter([i for i, _ in kept], [p.metric for _, p in kept], s=36, color="#1a7f37", label="kept",
               zorder=3)
    best = [(i, p.best) for i, p in enumerate(points) if p.best is not None]
    if best:
        ax.step([i for i, _ in best], [b for _, b in best], where="post", color="#1a7f37", linewidth=1.5,
                label="running best", zorder=1)
    if failed and ok:
        low, high = min(p.metric for _, p in ok), max(p.metric for _, p in ok)
        pad = 0.05 * (high - low or 1)
        y = high + pad if direction == "minimize" else low - pad
        ax.scatter(failed, [y] * len(failed), marker="x", color="#cf222e", label="crashed / rejected", zorder=2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (" + ("lower" if direction == "minimize" else "higher") + " is better)")
    done = [p for p in points if not p.baseline]
    n_kept = sum(1 for p in done if p.outcome == "kept")
    ax.set_title(title or f"baseline + {len(done)} experiments, {n_kept} kept")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return len(points)
