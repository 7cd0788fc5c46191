"""State as a pure fold over the event log.

`fold(events)` reads nothing but its argument and writes nothing but its
result: no clock, no disk, no git. After a crash the daemon rebuilds its
whole picture of the world from `fold(log.events())` and then reconciles git
and processes against it.

The live daemon advances its state one event at a time with `apply(state,
event)`, the same step the fold uses, so live state and replayed state can
never drift apart (tests check this over random event sequences).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

TERMINAL = ("kept", "discarded", "crashed", "rejected")
LIVE = ("proposing", "committed", "training", "evaluating", "judging", "interrupted")
RUNNING = ("training", "evaluating")  # states that hold a slot (a run or its evaluation in its checkout)
TRIALS = ("experiment", "merge")  # kinds judged against the best (the baseline measures it)
RUN_END_KEYS = ("exit_code", "signal", "timed_out", "killed", "metric", "metric_text", "duration_s")

# Events may carry fields that older logs lack (schema version 2, eventlog.py): `slot` and
# `device` on launch, `parent` / `parents` on start and proposed, `kind = "merge"` on start,
# `merge` on keep and discard (a merge owed), `merging` on a merge's start and the
# `merge_refused` note (a merge under way, or found not to apply).
# Each is read with a default, so a version-1 log folds as it always did.


@dataclass
class Experiment:
    n: int
    state: str = "new"
    kind: str = "experiment"  # "experiment" | "baseline" | "merge" (two kept changes composed)
    proposer: str = ""
    description: str = ""
    files: dict[str, str] | None = None  # the recorded proposal (editable files' content)
    meta: dict[str, Any] = field(default_factory=dict)  # the proposer's notes, e.g. fallback_from/_reason
    commit: str | None = None
    parent: str | None = None  # the best when it was proposed: what it changed
    parents: list[int] = field(default_factory=list)  # a merge's experiments (best's and the other's)
    merging: list[str] = field(default_factory=list)  # a merge's change: [base, commit], onto the best
    hashes: dict[str, str] = field(default_factory=dict)  # editable path -> sha256 at commit
    added: int = 0
    removed: int = 0
    metric: float | None = None
    metrics: list[float] = field(default_factory=list)  # one per finished run (noise runs)
    memory_gb: float | None = None
    printed: float | None = None  # what the run itself printed, when an evaluation step measured `metric`
    evaluations: int = 0  # evaluation processes started for the current run (a restart re-runs one)
    runs: int = 0  # launches (reruns and retries included)
    launched: str = ""  # when the latest run was launched (UTC ISO)
    slot: int | None = None  # the slot its latest run holds (its checkout .autoresearch/slots/<k>)
    device: dict[str, Any] = field(default_factory=dict)  # where it ran: {"kind": "cpu"} or the GPU
    run_end: dict[str, Any] = field(default_factory=dict)  # the latest run's end as recorded (RUN_END_KEYS)
    evaluation: dict[str, Any] = field(default_factory=dict)  # the latest evaluation's result as recorded
    log: str = ""  # the latest run's output log, relative to the workspace
    failed_runs: int = 0  # a baseline's failed runs (each retried as this same experiment)
    failure: str = ""  # why the latest of them failed
    interrupts: int = 0  # abnormal ones only (the daemon died, the run was lost): max_interrupts
    stops: int = 0  # graceful ones: a person's stop, --for; re-run, never counted against it
    reason: str = ""  # why it ended as it did
    log_tail: str = ""
    sandbox: str = ""  # what its run got: bwrap | fallback | off (older logs: the configured mode)
    sandbox_why: str = ""  # why not bwrap
    usage: dict[str, int] = field(default_factory=dict)
    cost_usd: float = 0.0  # the priced part; see cost_unknown
    cost_unknown: bool = False  # some tokens had no known price: the true cost is higher
    started: str = ""
    ended: str = ""
    last_seq: int = 0  # its latest event

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass
class State:
    seq: int = 0
    hash: str = ""
    daemon: str = "stopped"
    reason: str = ""  # why the daemon is blocked / exhausted / stopped
    retry_at: str = ""  # when a blocked daemon retries (UTC ISO)
    paused: bool = False  # a pause request not yet resumed: it outlives restarts
    daemon_error: str = ""  # the unexpected exception that ended the last daemon, until the next boot
    experiments: dict[int, Experiment] = field(default_factory=dict)
    best_commit: str | None = None
    best_metric: float | None = None
    best_n: int | None = None
    baseline_n: int | None = None  # None: no baseline measures the code (none yet, or a commit adopted)
    adopted: str | None = None  # a person's commit waiting for its baseline (best moves to it then)
    noise_sigma: float | None = None
    threshold: float = 0.0  # the keep threshold in effect (max(min_delta, 2 sigma))
    program_hash: str = ""
    profile: str = ""
    branch: str = ""  # the workspace's branch, as the last boot found it
    boots: int = 0
    first_time: str = ""
    last_time: str = ""
    cost_usd: float = 0.0  # the priced part; see cost_unknown
    cost_unknown: bool = False  # some tokens had no known price
    usage: dict[str, int] = field(default_factory=dict)
    last_failure_n: int | None = None
    model: dict[str, Any] = field(default_factory=dict)  # the anthropic model as the Models API saw it
    next_floor: int = 0  # numbers below it are taken (by git refs the log does not know)
    # Merges owed, oldest first: [base, commit, experiment] (the change from base to commit, the
    # experiment it is), owed by a verdict until a merge of it starts or is refused. In the log,
    # so a restart still owes them.
    merges_owed: list[list] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # event numbers repair could not keep
    # A remote executor's nodes, by id, as its last `note` (kind = node) says: usable or why not.
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- derived views (no state of their own) --

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in TERMINAL}
        for exp in self.experiments.values():
            if exp.kind in TRIALS and exp.state in out:
                out[exp.state] += 1
        return out

    def in_flight(self) -> list[Experiment]:
        """The experiments not ended, oldest first. One without an end, not the newest, whose last
        event precedes a gap in the log lost its terminal event to damage (see `gaps`): it is not
        in flight."""
        newest = max(self.experiments, default=None)
        return [e for n, e in sorted(self.experiments.items())
                if not e.terminal and (n == newest or not any(a > e.last_seq for a, _ in self.gaps))]

    def current(self) -> Experiment | None:
        """The oldest experiment in flight (None when none is)."""
        live = self.in_flight()
        return live[0] if live else None

    def next_n(self) -> int:
        return max(max(self.experiments, default=-1) + 1, self.next_floor)

    @property
    def baseline_done(self) -> bool:
        return self.baseline_n is not None


def _add_usage(total: dict[str, int], usage: dict[str, Any]) -> None:
    for key, value in usage.items():
        if isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + int(value)


def _add_spend(target, usage: dict | None, cost, cost_recorded: bool) -> None:
    """Add one event's tokens and cost to the workspace's or an experiment's totals (same fields);
    a cost recorded as None (an unpriced model) makes the total unknown, never $0."""
    if usage:
        _add_usage(target.usage, usage)
    if cost:
        target.cost_usd += float(cost)
    elif cost is None and cost_recorded:
        target.cost_unknown = True


def apply(state: State, event) -> State:
    """Advance `state` by one event, in place, and return it. No I/O."""
    p = event.payload
    if event.seq != state.seq + 1:  # events repair quarantined or found lost: fold what is left
        state.gaps.append((state.seq + 1, event.seq - 1))
    state.seq, state.hash, state.last_time = event.seq, event.hash, event.time
    state.first_time = state.first_time or event.time
    usage, cost = p.get("usage"), p.get("cost_usd")  # most events carry neither
    spends = bool(usage or cost or "cost_usd" in p)
    if spends:
        _add_spend(state, usage, cost, "cost_usd" in p)

    if event.aggregate == "daemon":
        state.daemon = event.dest
        t, kind = event.trigger, p.get("kind")
        if t == "boot":
            state.boots += 1
            state.daemon_error = ""
            state.nodes = {}  # each start checks the cluster's nodes afresh
            state.profile = p.get("profile") or state.profile
            state.program_hash = p.get("program_hash") or state.program_hash
            state.branch = p.get("branch") or state.branch
        elif t in ("pause", "resume"):
            state.paused = t == "pause"
        elif t in ("block", "exhaust", "stop"):
            state.reason = p.get("reason", "")
            state.retry_at = p.get("retry_at", "")
        elif t == "baseline_done":
            state.adopted = None
            state.baseline_n = p["n"]
            state.best_commit, state.best_metric, state.best_n = p["commit"], p["metric"], p["n"]
            state.noise_sigma = p.get("sigma")
            state.threshold = p.get("threshold", 0.0)
        elif t == "note" and kind == "program_changed":
            state.program_hash = p["new_hash"]
        elif t == "note" and kind == "model":
            state.model = {k: p.get(k) for k in ("model", "id", "lifecycle", "deprecated_at", "retires_at",
                                                 "error")}
        elif t == "note" and kind == "adopted_user_commit":
            if p.get("remeasure"):  # the metric of best no longer describes the code: measure it again
                state.adopted, state.baseline_n = p["commit"], None
            else:
                state.best_commit = p["commit"]
        elif t == "note" and kind == "merge_refused":
            state.merges_owed = [m for m in state.merges_owed if m[1] != p.get("commit")]
        elif t == "note" and kind == "node":
            state.nodes[p["node"]] = {k: p.get(k) for k in ("ip", "usable", "slots", "reason")}
        elif t == "note" and kind == "numbering":
            state.next_floor = max(state.next_floor, int(p.get("next_n", 0)))
        elif t == "note" and kind == "failure":
            where = f"exp {p['experiment']} {p.get('state')}" if p.get("experiment") is not None else p.get("state")
            state.daemon_error = f"{p.get('error', '')} (while {where})"
        if event.dest not in ("blocked", "exhausted", "stopped"):
            state.reason, state.retry_at = "", ""
        return state

    n = event.experiment
    exp = state.experiments.get(n)
    if exp is None:
        exp = state.experiments[n] = Experiment(n=n, started=event.time)
    exp.state = event.dest
    exp.last_seq = event.seq
    if spends:
        _add_spend(exp, usage, cost, "cost_usd" in p)
    t = event.trigger
    if t == "start":
        exp.kind = p.get("kind", "experiment")
        exp.proposer = p.get("proposer", "")
        exp.parents = list(p.get("parents") or [])
        exp.parent = p.get("parent", exp.parent)
        exp.merging = list(p.get("merging") or [])
        if exp.merging:
            state.merges_owed = [m for m in state.merges_owed if m[1] != exp.merging[1]]
    elif t == "proposed":
        exp.description = p.get("description", "")
        exp.files = p.get("files")
        exp.proposer = p.get("proposer", exp.proposer)
        exp.meta = p.get("meta") or {}
        exp.parent = p.get("parent", exp.parent)  # older logs: the best when it was committed
    elif t in ("commit", "adopt"):
        exp.commit, exp.parent = p["commit"], p.get("parent", exp.parent)
        exp.hashes = p.get("hashes", {})
        exp.added, exp.removed = p.get("added", 0), p.get("removed", 0)
        if t == "adopt":
            exp.kind = "baseline"
            exp.description = p.get("description", "baseline")
            exp.files = p.get("files", exp.files)
    elif t in ("launch", "rerun"):
        exp.runs += 1
        exp.sandbox = p.get("sandbox", exp.sandbox)
        exp.launched, exp.log = event.time, p.get("log", "")
        exp.sandbox_why = p.get("sandbox_why", "")
        exp.slot = p.get("slot")  # logs from before slots: None (their one run slot was 0)
        exp.device = p.get("device") or {}
        exp.run_end, exp.evaluation = {}, {}
    elif t == "finish":
        exp.run_end = {k: p.get(k) for k in RUN_END_KEYS}
        exp.log_tail = p.get("log_tail", "")
        if p.get("metric") is not None:
            exp.metrics.append(p["metric"])
        exp.memory_gb = p.get("memory_gb", exp.memory_gb)
    elif t == "trained":  # the run's own figure is only what it printed; the evaluation measures
        exp.run_end = {k: p.get(k) for k in RUN_END_KEYS}
        exp.log_tail = p.get("log_tail", "")
        exp.printed = p.get("metric")
        exp.memory_gb = p.get("memory_gb", exp.memory_gb)
        exp.evaluations = 0
    elif t == "evaluate":
        exp.evaluations += 1
    elif t == "evaluated":
        exp.evaluation = {"failure": p.get("failure", ""), "metric": p.get("metric")}
        if p.get("log_tail"):
            exp.log_tail = p["log_tail"]
        if p.get("metric") is not None and not p.get("failure"):
            exp.metrics.append(p["metric"])
    elif t == "interrupt":
        # Logs written before the `graceful` field: a person's stop said "daemon stopping (...)".
        if p.get("graceful", p.get("reason", "").startswith("daemon stopping")):
            exp.stops += 1
        else:
            exp.interrupts += 1
        exp.reason = p.get("reason", "")
    if t == "reject" and p.get("description"):  # rejected before `proposed`: its own description
        exp.description = p["description"]
    elif t == "fail":
        exp.failed_runs += 1
        exp.reason = exp.failure = p.get("reason", "")
    if p.get("merge") and t in ("keep", "discard"):  # before the best moves: a keep owes the best it replaced
        owed = [exp.parent, state.best_commit, state.best_n] if t == "keep" else [exp.parent, exp.commit, n]
        if owed[1]:
            state.merges_owed.append(owed)
    if exp.terminal:
        exp.ended = event.time
        exp.reason = p.get("reason", exp.reason)
        exp.metric = p.get("metric", exp.metric)
        if event.dest == "kept" and exp.kind in TRIALS:
            state.best_commit, state.best_metric, state.best_n = exp.commit, exp.metric, n
        if event.dest == "crashed":
            state.last_failure_n = n
    return state


def fold(events: Iterable, state: State | None = None) -> State:
    """The state after `events`, starting from `state` (not modified) or from nothing."""
    result = copy.deepcopy(state) if state is not None else State()
    for event in events:
        apply(result, event)
    return result
