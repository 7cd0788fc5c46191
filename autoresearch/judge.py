"""The judge: an experiment's verdict from what the log recorded about it. Pure.

`judge(exp, state, cfg)` reads the experiment's recorded run end (`finish` / `trained`) and
evaluation (`evaluated`), and the folded best; nothing in memory, no clock, no disk. So a
daemon stopped between a run's end and its judgement judges it at the next start from the
log, without running it again, and several experiments in flight are each judged against the
best *at the time they are judged*.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import progress
from .report import UNTRUSTED
from .state import Experiment, State

# A figure the run printed may differ from the trusted evaluation's by float noise only (the
# same computation, another process); beyond this relative gap the run reported something else.
TRUST_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Verdict:
    trigger: str  # keep | discard | crash | fail (a baseline's failed run) | rerun (a baseline noise run)
    reason: str = ""
    metric: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more payload for the event
    # Gains found side by side: try a merge of the two changes. Kept over a best that moved since
    # its parent: the best's change onto it; discarded although it beat its own parent: its
    # change onto the best.
    merge: bool = False

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason} if self.reason else {}
        if self.metric is not None:
            out["metric"] = self.metric
        if self.merge:  # recorded: a merge is owed even if the daemon dies before queueing it
            out["merge"] = True
        return {**out, **self.extra}


def run_failure(end: Mapping[str, Any], need_metric: bool = True) -> str:
    """Why a run that ended as `end` (RUN_END_KEYS) counts as failed, or '' when it produced a
    usable metric (or, with need_metric False, ended well: an evaluation step measures it)."""
    if end.get("timed_out") or end.get("killed") == "deadline":
        return f"hard deadline: killed after {end.get('duration_s') or 0:.0f}s"
    if end.get("killed"):
        return f"killed ({end['killed']})"
    if end.get("signal"):
        return f"killed by signal {end['signal']}"
    if end.get("exit_code") != 0:
        return f"exit code {end.get('exit_code')}"
    if not need_metric:
        return ""
    if end.get("metric") is None:
        text = end.get("metric_text")  # a non-finite figure is recorded as text only
        return f"metric is {float(text)}" if text else "no metric in the output"
    if not math.isfinite(end["metric"]):
        return f"metric is {end['metric']}"
    return ""


def disagrees(printed: float | None, trusted: float) -> bool:
    return printed is not None and not abs(printed - trusted) <= TRUST_TOLERANCE * max(1.0, abs(trusted))


def parent_metric(exp: Experiment, state: State) -> float | None:
    """The metric of the code `exp` was made from: the kept experiment (or baseline) whose commit
    is its parent; None when not known (a person's commit, a damaged log)."""
    for other in state.experiments.values():
        if other.commit == exp.parent and other.state == "kept" and other.metric is not None:
            return other.metric
    return None


def gain(metric: float, reference: float | None, direction: str) -> float:
    """How much better `metric` is than `reference` (positive = better); inf without a reference."""
    if reference is None:
        return math.inf
    return (reference - metric) if direction == "minimize" else (metric - reference)


def judge(exp: Experiment, state: State, cfg) -> Verdict:
    """The verdict on experiment `exp` (in `judging`), from the log alone."""
    if exp.evaluation:  # an evaluation step measured it: its figure is the evaluation's
        failure, metric = exp.evaluation.get("failure") or "", exp.evaluation.get("metric")
        if not failure and metric is None:
            failure = "evaluation: no metric"
        if not failure and disagrees(exp.printed, metric):
            failure = f"{UNTRUSTED} (printed {exp.printed:.6f}, trusted {metric:.6f})"
            if exp.kind != "baseline":  # measured, but the run reported something else
                return Verdict("discard", failure, metric, {"printed": exp.printed})
    else:
        failure, metric = run_failure(exp.run_end), exp.run_end.get("metric")
    if exp.kind == "baseline":
        if failure:
            tail = progress.last_lines(exp.log_tail)
            return Verdict("fail", f"{failure}: {tail}" if tail else failure, extra={"runs": exp.runs})
        if len(exp.metrics) < cfg.judge.noise_runs + 1:
            return Verdict("rerun")
        return Verdict("keep", "baseline", statistics.fmean(exp.metrics))
    if failure:
        return Verdict("crash", failure)
    direction = cfg.run.direction
    threshold = max(cfg.judge.min_delta, state.threshold)
    best = state.best_metric
    vs_best = gain(metric, best, direction)
    # Made from an older best: that best's gain and this one may compose.
    moved = exp.kind == "experiment" and bool(exp.parent) and exp.parent != state.best_commit \
        and bool(getattr(cfg.judge, "merge", False))
    if vs_best > threshold:
        return Verdict("keep", f"improved by {vs_best:.6f} (threshold {threshold:g})", metric, merge=moved)
    if cfg.judge.simplicity and abs(vs_best) <= threshold and exp.added < exp.removed:
        return Verdict("keep", f"equal within {threshold:g} and {exp.removed - exp.added} fewer lines", metric)
    reason = f"no improvement ({metric:.6f} vs best {best:.6f})"
    # Made from an older best, it may still have improved on that: a gain found side by side
    # with the one that moved the best, which a merge of the two can keep.
    merge = False
    if exp.kind == "experiment" and exp.parent and exp.parent != state.best_commit:
        vs_parent = gain(metric, parent_metric(exp, state), direction)
        if vs_parent > threshold and not math.isinf(vs_parent):
            reason += f"; improved on its parent by {vs_parent:.6f}"
            merge = moved
    return Verdict("discard", reason, metric, merge=merge)
