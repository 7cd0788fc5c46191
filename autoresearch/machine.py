"""The two state machines, built with pytransitions.

The tables below are the one place that says what may follow what. Each
trigger is one event in the log: the machine's `before_state_change`
callback appends the event (durably) and folds it into the daemon's state
*before* the model's state changes and before the caller performs the side
effect that follows. If the append fails (disk full), the state does not
change and the exception reaches the caller. An illegal trigger raises
`transitions.MachineError`; nothing is silently ignored.

Restoring after a crash is `fold` + creating the models at the folded
states: no side effect is re-run by restoring.

Payload keys, by trigger (experiment machine):
  start      kind ("experiment"|"baseline"|"merge"), proposer, parent, parents (both optional: schema 2)
  proposed   description, files {path: text}, proposer, usage, cost_usd, meta, parent (the best
             when the proposal was asked: what it changed), parent, parents (optional)
  spend      usage, cost_usd, reason          (a proposer call that gave nothing)
  commit     commit, parent, hashes {path: sha256}, added, removed
  adopt      commit, parent, hashes, files, description   (baseline: run the best as is)
  launch     log, attempt, sandbox, slot, device, slot, device (both optional: schema 2)
  rerun      like launch (noise runs of the baseline)
  finish     exit_code, signal, timed_out, killed, metric, memory_gb, duration_s, log_tail
  trained    like finish: a run that ended well, whose metric is then evaluated (metric: what
             the run printed, or None)
  evaluate   log, attempt, sandbox, files {path: sha256}   (an evaluation process started)
  evaluated  exit_code, signal, killed, metric (the trusted one), duration_s, log_tail, failure
  keep/discard/crash/reject/skip/give_up   reason, metric; keep/discard: merge (a merge is owed)
  fail       reason, runs   (the baseline's run failed: the daemon blocks, then retries the same experiment)
  interrupt  reason, graceful (a person's stop: never counts toward limits.max_interrupts)
Daemon machine:
  boot       pid, version, profile, program_hash, config_hash, branch, overrides (run --proposer)
  block      reason, retry_at
  unblock    request (when a `resume` ended the wait early)
  exhaust/stop  reason (stop: request, when asked through the inbox)
  baseline_done  n, commit, metric, sigma, threshold
  pause/resume   request (pause: restored=True when re-entered after a restart)
  note       kind: program_changed (old_hash, new_hash, added, removed) | config_reloaded |
             config_rejected (error) | merge_refused (commit: an owed merge that does not apply) |
             node (a remote executor's node: usable or why not) | late_spend (a cancelled proposal's
             tokens) | adopted_user_commit (commit, previous, remeasure) | request (request, action,
             outcome: a request answered "ignored: ...") | failure (error, experiment, state,
             daemon: an unexpected exception ended the daemon) |
             model (model, id, display_name, lifecycle, deprecated_at, retires_at, error)
"""

from __future__ import annotations

from typing import Any, Callable

from transitions import Machine, MachineError  # noqa: F401  (MachineError is part of the API)

DAEMON_STATES = ["starting", "preparing", "baseline", "running", "paused", "blocked",
                 "exhausted", "stopped"]
DAEMON_TRANSITIONS = [
    {"trigger": "boot", "source": "*", "dest": "starting"},
    {"trigger": "prepare", "source": "starting", "dest": "preparing"},
    {"trigger": "unblock", "source": "blocked", "dest": "preparing"},
    {"trigger": "resume", "source": "paused", "dest": "preparing"},
    {"trigger": "begin_baseline", "source": "preparing", "dest": "baseline"},
    {"trigger": "baseline_done", "source": "baseline", "dest": "running"},
    {"trigger": "baseline_done", "source": "paused", "dest": "paused"},  # paused mid-baseline
    {"trigger": "resume_loop", "source": "preparing", "dest": "running"},
    {"trigger": "pause", "source": ["starting", "preparing", "baseline", "running", "blocked"],
     "dest": "paused"},
    {"trigger": "block", "source": ["starting", "preparing", "baseline", "running"], "dest": "blocked"},
    {"trigger": "exhaust", "source": ["running", "paused"], "dest": "exhausted"},
    {"trigger": "stop", "source": ["starting", "preparing", "baseline", "running", "paused",
                                   "blocked", "exhausted"], "dest": "stopped"},
    # Facts that change no state (program.md edited, config reloaded, request answered).
    {"trigger": "note", "source": "*", "dest": "="},
]

EXPERIMENT_STATES = ["new", "proposing", "committed", "training", "evaluating", "judging", "kept",
                     "discarded", "crashed", "rejected", "interrupted"]
_LIVE = ["proposing", "committed", "training", "evaluating", "judging"]
EXPERIMENT_TRANSITIONS = [
    {"trigger": "start", "source": "new", "dest": "proposing"},
    {"trigger": "adopt", "source": "new", "dest": "committed"},
    {"trigger": "proposed", "source": "proposing", "dest": "="},
    {"trigger": "spend", "source": "proposing", "dest": "="},
    {"trigger": "commit", "source": "proposing", "dest": "committed"},
    # (from interrupted: superseded by a person's commit made while the daemon was stopped)
    {"trigger": "reject", "source": ["proposing", "committed", "interrupted"], "dest": "rejected"},
    {"trigger": "launch", "source": "committed", "dest": "training"},
    {"trigger": "finish", "source": "training", "dest": "judging"},
    # A workspace with an evaluation step (the built-in workload's evaluator, or [eval]):
    {"trigger": "trained", "source": "training", "dest": "evaluating"},
    {"trigger": "evaluate", "source": "evaluating", "dest": "="},
    {"trigger": "evaluated", "source": "evaluating", "dest": "judging"},
    {"trigger": "rerun", "source": "judging", "dest": "training"},
    {"trigger": "keep", "source": "judging", "dest": "kept"},
    {"trigger": "discard", "source": "judging", "dest": "discarded"},
    {"trigger": "crash", "source": "judging", "dest": "crashed"},
    {"trigger": "fail", "source": "judging", "dest": "interrupted"},  # a baseline's failed run: retried
    {"trigger": "skip", "source": _LIVE, "dest": "discarded"},
    {"trigger": "interrupt", "source": _LIVE, "dest": "interrupted"},
    {"trigger": "retry", "source": "interrupted", "dest": "committed"},
    {"trigger": "repropose", "source": "interrupted", "dest": "proposing"},
    {"trigger": "give_up", "source": "interrupted", "dest": "crashed"},
]


def _expand(states: list[str], table: list[dict]) -> dict[tuple[str, str], str]:
    """(trigger, source) -> dest, with '*' and '=' spelled out."""
    legal = {}
    for row in table:
        sources = states if row["source"] == "*" else row["source"]
        for src in [sources] if isinstance(sources, str) else sources:
            legal[(row["trigger"], src)] = src if row["dest"] == "=" else row["dest"]
    return legal


LEGAL = {
    "daemon": _expand(DAEMON_STATES, DAEMON_TRANSITIONS),
    "experiment": _expand(EXPERIMENT_STATES, EXPERIMENT_TRANSITIONS),
}


def check_event(aggregate: str, trigger: str, source: str, dest: str) -> str:
    """'' when (trigger, source -> dest) is in the table, else what is wrong."""
    kind = "daemon" if aggregate == "daemon" else "experiment"
    expected = LEGAL[kind].get((trigger, source))
    if expected is None:
        return f"trigger {trigger!r} is not allowed from {kind} state {source!r}"
    if expected != dest:
        return f"trigger {trigger!r} from {source!r} leads to {expected!r}, not {dest!r}"
    return ""


Record = Callable[[str, str, str, str, dict[str, Any]], Any]


class Aggregate:
    """A transitions model whose every transition is recorded before it happens."""

    def __init__(self, aggregate: str, record: Record):
        self.aggregate = aggregate
        self._record = record

    def _before_change(self, event_data) -> None:
        payload = event_data.kwargs.get("payload") or {}
        self._record(self.aggregate, event_data.event.name, event_data.transition.source,
                     event_data.transition.dest, payload)

    def fire(self, trigger: str, **payload: Any) -> None:
        """Fire `trigger` with `payload`; raises MachineError when illegal."""
        self.trigger(trigger, payload=payload)  # `trigger` is added by transitions


def _machine(states, table, initial) -> Machine:
    return Machine(model=None, states=states, transitions=table, initial=initial,
                   auto_transitions=False, send_event=True, ignore_invalid_triggers=False,
                   before_state_change="_before_change")


class Machines:
    """One daemon model plus one model per live experiment, sharing two machines."""

    def __init__(self, record: Record, daemon_state: str = "stopped"):
        self._experiment_machine = _machine(EXPERIMENT_STATES, EXPERIMENT_TRANSITIONS, "new")
        self._daemon_machine = _machine(DAEMON_STATES, DAEMON_TRANSITIONS, "stopped")
        self._record = record
        self.daemon = Aggregate("daemon", record)
        self._daemon_machine.add_model(self.daemon, initial=daemon_state)
        self._experiments: dict[int, Aggregate] = {}

    def experiment(self, n: int, state: str = "new") -> Aggregate:
        """The model for experiment n, created at `state` the first time it is asked for."""
        model = self._experiments.get(n)
        if model is None:
            model = Aggregate(f"experiment:{n}", self._record)
            self._experiment_machine.add_model(model, initial=state)
            self._experiments[n] = model
        return model

    def forget(self, n: int) -> None:
        """Drop a finished experiment's model (its history stays in the log)."""
        model = self._experiments.pop(n, None)
        if model is not None:
            self._experiment_machine.remove_model(model)
