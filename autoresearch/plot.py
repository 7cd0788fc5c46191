"""`autoresearch plot`: every experiment's metric with the running best, like autoresearch's progress.png."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .state import State


def plot(state: State, out: Path, direction: str = "minimize", title: str = "") -> int:
    """Write a PNG to `out` (atomically); returns the number of experiments plotted."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    rows = [e for e in sorted(state.experiments.values(), key=lambda e: e.n) if e.terminal
            and not (e.kind == "baseline" and e.state != "kept")]
    fig, ax = plt.subplots(figsize=(12, 6), dpi=120)
    xs_ok, ys_ok, xs_kept, ys_kept, xs_failed = [], [], [], [], []
    best_x, best_y, best = [], [], None
    better = (lambda a, b: a < b) if direction == "minimize" else (lambda a, b: a > b)
    for i, e in enumerate(rows):
        if e.state in ("kept", "discarded") and e.metric is not None and math.isfinite(e.metric):
            xs_ok.append(i)
            ys_ok.append(e.metric)
            if e.state == "kept":
                xs_kept.append(i)
                ys_kept.append(e.metric)
                if best is None or better(e.metric, best):
                    best = e.metric
                label = "baseline" if e.kind == "baseline" else (e.description or f"exp {e.n}")
                ax.annotate(label[:40], (i, e.metric), textcoords="offset points", xytext=(4, 6),
                            fontsize=7, rotation=20, color="#1a7f37")
        else:
            xs_failed.append(i)
        if best is not None:
            best_x.append(i)
            best_y.append(best)
    ax.scatter(xs_ok, ys_ok, s=14, color="#9aa0a6", label="discarded", zorder=2)
    ax.scatter(xs_kept, ys_kept, s=36, color="#1a7f37", label="kept", zorder=3)
    if best_x:
        ax.step(best_x, best_y, where="post", color="#1a7f37", linewidth=1.5, label="running best", zorder=1)
    if xs_failed and ys_ok:
        low, high = min(ys_ok), max(ys_ok)
        pad = 0.05 * (high - low or 1)
        y = high + pad if direction == "minimize" else low - pad
        ax.scatter(xs_failed, [y] * len(xs_failed), marker="x", color="#cf222e",
                   label="crashed / rejected", zorder=2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (" + ("lower" if direction == "minimize" else "higher") + " is better)")
    done = [e for e in rows if e.kind == "experiment"]
    kept = sum(1 for e in done if e.state == "kept")
    ax.set_title(title or f"baseline + {len(done)} experiments, {kept} kept")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return len(rows)
