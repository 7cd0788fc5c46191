"""The progress chart, as in autoresearch's analysis: every experiment's metric, the running best.

`progress` is the chart as data (pure); `plot` draws it as a PNG for `autoresearch plot`,
and the dashboard draws the same points in the browser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .report import UNTRUSTED, finished, outcome, untrusted
from .state import State

# Experiments without a metric sit in a band beyond the worst one, one marker per outcome
# (the names `results` and `show` use too).
_NO_METRIC = {
    "crashed": dict(marker="x", color="#cf222e", label="crashed"),
    "rejected": dict(marker="v", color="#bf8700", label="rejected (never ran)"),
    "skipped": dict(marker="o", facecolors="none", edgecolors="#6e7781", label="skipped (no result)"),
}


@dataclass(frozen=True)
class Point:
    n: int
    outcome: str  # report.outcome: kept | discarded | skipped | crashed | rejected
    metric: float | None  # None: no metric (skipped, crashed, rejected): drawn as a mark
    best: float | None  # the running best after this experiment
    label: str  # what a kept point is labelled with; the description elsewhere
    baseline: bool


def progress(state: State, direction: str = "minimize") -> list[Point]:
    better = (lambda a, b: a < b) if direction == "minimize" else (lambda a, b: a > b)
    points, best = [], None
    for e in finished(state):
        how = outcome(e)
        measured = how in ("kept", "discarded")
        if how == "kept" and (best is None or better(e.metric, best)):
            best = e.metric
        label = "baseline" if e.kind == "baseline" else (e.description or e.reason or f"exp {e.n}")
        if untrusted(e):
            label += f" ({UNTRUSTED})"
        points.append(Point(e.n, how, e.metric if measured else None, best, label, e.kind == "baseline"))
    return points


def plot(state: State, out: Path, direction: str = "minimize", title: str = "") -> int:
    """Write a PNG to `out` (atomically); returns the number of experiments plotted.

    The caller makes sure at least one experiment has finished."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    points = progress(state, direction)
    fig, ax = plt.subplots(figsize=(12, 6), dpi=120)
    ok = [(i, p) for i, p in enumerate(points) if p.metric is not None]
    kept = [(i, p) for i, p in ok if p.outcome == "kept"]
    discarded = [(i, p) for i, p in ok if p.outcome == "discarded"]
    for i, p in kept:
        label = p.label if len(p.label) <= 40 else p.label[:39] + "…"
        ax.annotate(label, (i, p.metric), textcoords="offset points", xytext=(4, 6),
                    fontsize=7, rotation=20, color="#1a7f37")
    ax.scatter([i for i, _ in discarded], [p.metric for _, p in discarded], s=14, color="#9aa0a6",
               label="discarded", zorder=2)
    ax.scatter([i for i, _ in kept], [p.metric for _, p in kept], s=36, color="#1a7f37", label="kept",
               zorder=3)
    best = [(i, p.best) for i, p in enumerate(points) if p.best is not None]
    if best:
        ax.step([i for i, _ in best], [b for _, b in best], where="post", color="#1a7f37", linewidth=1.5,
                label="running best", zorder=1)
    if ok:
        low, high = min(p.metric for _, p in ok), max(p.metric for _, p in ok)
        pad = 0.05 * (high - low or 1)
        band = high + pad if direction == "minimize" else low - pad
        for how, style in _NO_METRIC.items():
            xs = [i for i, p in enumerate(points) if p.outcome == how]
            if xs:
                ax.scatter(xs, [band] * len(xs), zorder=2, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.03)
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (" + ("lower" if direction == "minimize" else "higher") + " is better)")
    done = [p for p in points if not p.baseline]
    n_kept = sum(1 for p in done if p.outcome == "kept")
    ax.set_title(title or f"baseline + {len(done)} experiments, {n_kept} kept")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        # "tight" grows the canvas to hold every label, also one beside the last point.
        fig.savefig(tmp, bbox_inches="tight", pad_inches=0.2)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return len(points)
