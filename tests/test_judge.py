"""The judge is pure: verdicts from recorded facts only (the fold's state), and merges of gains
found side by side. Plus the merge end to end: two experiments proposed from the same best, both
gains kept by a merge experiment whose commit has both as parents."""

from __future__ import annotations

import dataclasses
import math

from autoresearch import config as config_mod
from autoresearch.judge import judge, run_failure
from autoresearch.report import UNTRUSTED
from autoresearch.state import Experiment, State

from autoresearch.proposers.base import NoEdit, Proposal

from daemon_fixtures import TRAIN, edited, factory, git, make_workspace

CFG = config_mod.Config()


def _state(best_commit="b1", best_metric=1.0, threshold=0.0, parent_metric=1.5):
    st = State(best_commit=best_commit, best_metric=best_metric, threshold=threshold)
    st.experiments[0] = Experiment(0, state="kept", kind="baseline", commit="b0", metric=parent_metric)
    st.experiments[1] = Experiment(1, state="kept", commit="b1", parent="b0", metric=best_metric)
    return st


def _ran(metric, parent="b1", **kw):
    end = {"exit_code": 0, "signal": None, "timed_out": False, "killed": None, "metric": metric,
           "metric_text": repr(metric), "duration_s": 1.0}
    return Experiment(5, state="judging", commit="c5", parent=parent, run_end=end, **kw)


def test_kept_against_the_best_at_the_time_it_is_judged():
    assert judge(_ran(0.9), _state(), CFG).trigger == "keep"
    v = judge(_ran(1.1), _state(), CFG)
    assert v.trigger == "discard" and v.metric == 1.1 and "vs best 1.000000" in v.reason and not v.merge


def test_a_gain_over_its_own_parent_while_the_best_moved_is_a_merge_candidate():
    # Made from the baseline (b0, 1.5); the best moved to b1 (1.0) meanwhile; it scores 1.2.
    v = judge(_ran(1.2, parent="b0"), _state(), CFG)
    assert v.trigger == "discard" and v.merge and "improved on its parent by 0.300000" in v.reason
    # Kept over a best that moved since its parent: the old best's gain is merged onto it.
    v = judge(_ran(0.8, parent="b0"), _state(), CFG)
    assert v.trigger == "keep" and v.merge
    # No better than its parent: nothing to merge. Merging switched off: never.
    assert not judge(_ran(1.6, parent="b0"), _state(), CFG).merge
    off = dataclasses.replace(CFG, judge=dataclasses.replace(CFG.judge, merge=False))
    assert not judge(_ran(1.2, parent="b0"), _state(), off).merge
    # A merge experiment is judged like any other but never merged again.
    assert not judge(_ran(1.2, parent="b0", kind="merge"), _state(), CFG).merge


def test_failures_come_from_the_recorded_run_end():
    nan = _ran(None)
    nan.run_end["metric_text"] = "nan"
    assert judge(nan, _state(), CFG).reason == "metric is nan"
    none = _ran(None)
    none.run_end["metric_text"] = None
    assert judge(none, _state(), CFG).reason == "no metric in the output"
    late = _ran(1.0)
    late.run_end.update(killed="deadline", duration_s=61.2)
    assert judge(late, _state(), CFG) .trigger == "crash" and "hard deadline" in judge(late, _state(), CFG).reason
    assert run_failure({"exit_code": 3}) == "exit code 3"


def test_an_evaluation_decides_and_a_printed_figure_that_differs_is_discarded():
    exp = _ran(0.5)
    exp.evaluation, exp.printed = {"failure": "", "metric": 0.95}, 0.5
    v = judge(exp, _state(), CFG)
    assert v.trigger == "discard" and v.reason.startswith(UNTRUSTED) and v.metric == 0.95
    exp.printed = 0.95
    assert judge(exp, _state(), CFG).trigger == "keep"
    exp.evaluation = {"failure": "evaluation: no model.pt2", "metric": None}
    assert judge(exp, _state(), CFG).reason == "evaluation: no model.pt2"


def test_the_baseline_reruns_for_noise_then_keeps_the_mean_or_fails_with_its_tail():
    noisy = dataclasses.replace(CFG, judge=dataclasses.replace(CFG.judge, noise_runs=1))
    base = Experiment(0, state="judging", kind="baseline", commit="b0", metrics=[1.0],
                      run_end={"exit_code": 0, "metric": 1.0})
    assert judge(base, State(), noisy).trigger == "rerun"
    base.metrics.append(2.0)
    v = judge(base, State(), noisy)
    assert v.trigger == "keep" and math.isclose(v.metric, 1.5)
    bad = Experiment(0, state="judging", kind="baseline", runs=1, log_tail="boom\n",
                     run_end={"exit_code": 2})
    v = judge(bad, State(), CFG)
    assert v.trigger == "fail" and v.reason == "exit code 2: boom" and v.extra == {"runs": 1}


class TwoThenThinking:
    """Proposes the two edits at once, then thinks until told to stop (an agent that takes its
    time: the merge must not wait for it)."""

    name = "scripted"

    def __init__(self, edits):
        self.edits = list(edits)

    def propose(self, ctx):
        if self.edits:
            return Proposal(description=f"edit {ctx.n}", files={"train.py": self.edits.pop(0)}, proposer="scripted")
        ctx.cancel.wait(30)
        raise NoEdit("stopped")


def test_two_gains_found_side_by_side_are_merged(tmp_path):
    """Two slots, no lookahead: experiments 1 and 2 are both proposed from the baseline, one
    improves LEARNING_RATE, the other WARMUP (two lines apart). Whichever is judged second is judged against the
    best the first made; the merge experiment composes both and is kept."""
    from autoresearch.daemon import Daemon
    from daemon_fixtures import events, state

    root = make_workspace(tmp_path / "ws", slots={"count": 2, "lookahead": 0})
    lr, warmup = edited(TRAIN, LEARNING_RATE=0.1), edited(TRAIN, WARMUP=0.0)
    d = Daemon(root, proposer_factory=factory(TwoThenThinking([lr, warmup])))

    def stop_once_merged():
        if any(e.kind == "merge" and e.terminal for e in d.state.experiments.values()):
            d.stop_request = d.stop_request or "test"
    d.on_tick = stop_once_merged
    assert d.run() == 0
    st = state(root)
    merge = next(e for e in st.experiments.values() if e.kind == "merge")
    assert merge.state == "kept", (merge.state, merge.reason)
    assert sorted(merge.parents) == [1, 2] and merge.proposer == "merge" and merge.cost_usd == 0
    parents = git(root, "rev-list", "--parents", "-n", "1", merge.commit).split()[1:]
    assert sorted(parents) == sorted([st.experiments[1].commit, st.experiments[2].commit])
    best = git(root, "show", f"{st.best_commit}:train.py")
    assert "LEARNING_RATE = 0.1" in best and "WARMUP = 0.0" in best and st.best_n == merge.n
    assert (root / "train.py").read_text() == best + "\n"  # the human's worktree is at the best
    slots = {e.payload.get("slot") for e in events(root) if e.trigger == "launch" and e.experiment in (1, 2)}
    assert slots == {0, 1}  # they ran side by side
