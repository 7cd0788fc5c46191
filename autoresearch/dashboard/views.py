"""What the page shows, as plain JSON-ready dicts: pure functions of the state and the events.

Nothing here reads a clock, a file or git: the caller passes `now` and whatever
it read, so every view is testable on a hand-built state.
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterable

from .. import progress as progress_of_run, sanitize
from ..clock import parse_utc
from ..plot import progress
from ..report import listed, outcome
from ..state import Experiment, State

# Large payload fields the page never needs in an event list (a finish event's log tail, a proposal's files).
_BULKY = ("files", "log_tail")


def clean_terminal_text(text: str) -> str:
    """A run's output as the page shows it: escapes and controls stripped, a line redrawn with
    carriage returns reduced to what was left on screen, secrets redacted (sanitize.clean)."""
    return sanitize.clean(text)


def latest_loss(text: str) -> float | None:
    """The last finite loss a run printed (progress.parse reads it, as `run` and `status` do)."""
    return _finite(progress_of_run.parse(text).loss)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _duration(exp: Experiment) -> float | None:
    if exp.started and exp.ended:
        return round(parse_utc(exp.ended) - parse_utc(exp.started), 3)
    return None


def experiment_rows(state: State, direction: str = "minimize") -> list[dict[str, Any]]:
    """One row per experiment (in flight included): the table, and the chart's points.

    `best` is the running best after the row (the chart's step line); `delta` is the metric
    minus the parent's (the commit the experiment was made on)."""
    by_commit = {e.commit: e for e in state.experiments.values() if e.commit and e.state == "kept"}
    best = {p.n: p.best for p in progress(state, direction)}
    rows = []
    for n in sorted(state.experiments):
        e = state.experiments[n]
        parent = by_commit.get(e.parent) if e.parent else None
        metric = _finite(e.metric)
        delta = None
        if metric is not None and parent is not None and _finite(parent.metric) is not None and parent.n != n:
            delta = metric - parent.metric
        description = "baseline" if e.kind == "baseline" else (e.description or "")
        rows.append({
            "n": n, "kind": e.kind, "state": e.state, "terminal": e.terminal, "charted": listed(e),
            "outcome": outcome(e) if e.terminal else "in flight",  # as results, plot and show name it
            "metric": metric, "best": best.get(n), "delta": delta,
            "parent_n": parent.n if parent is not None else None,
            "description": description, "reason": e.reason, "duration_s": _duration(e),
            "cost_usd": round(e.cost_usd, 6), "started": e.started, "ended": e.ended,
        })
    return rows


def header(state: State, *, now: float, daemon_pid: int | None, boot_time: str, budget_s: float,
           slots: list[dict[str, Any]], direction: str = "minimize") -> dict[str, Any]:
    """The header: state, uptime, best and gain over the baseline, keep rate, cost, the slots.

    `slots` are the experiments in flight, each {n, launched (UTC ISO or ""), loss, slot (the run
    slot it holds, or None while it waits)}, oldest first."""
    counts = state.counts()
    finished = sum(counts.values())
    base = state.experiments.get(state.baseline_n) if state.baseline_n is not None else None
    base_metric = _finite(base.metric) if base is not None else None
    best = _finite(state.best_metric)
    gain = gain_pct = None
    if best is not None and base_metric is not None:
        sign = 1 if direction == "minimize" else -1
        gain = sign * (base_metric - best)
        gain_pct = 100 * gain / abs(base_metric) if base_metric else None
    alive = daemon_pid is not None
    live = []
    for slot in slots:
        e = state.experiments.get(slot["n"])
        if e is None:
            continue
        launched = slot.get("launched") or ""
        live.append({
            "n": e.n, "kind": e.kind, "state": e.state, "description": e.description,
            "elapsed_s": round(now - parse_utc(launched), 1) if launched and e.state == "training" else None,
            "budget_s": budget_s, "loss": slot.get("loss"), "started": e.started, "slot": slot.get("slot"),
            "device": e.device or None,
        })
    return {
        "daemon": state.daemon, "alive": alive, "pid": daemon_pid, "reason": state.reason,
        "retry_at": state.retry_at, "paused": state.paused,
        "uptime_s": round(now - parse_utc(boot_time), 1) if alive and boot_time else None,
        "best": best, "best_n": state.best_n, "baseline": base_metric, "gain": gain, "gain_pct": gain_pct,
        "counts": counts, "finished": finished,
        "keep_rate": counts["kept"] / finished if finished else None,
        "cost_usd": round(state.cost_usd, 6), "usage": dict(state.usage),
        "seq": state.seq, "last_time": state.last_time, "direction": direction, "slots": live,
    }


def event_dict(event, *, full: bool = False) -> dict[str, Any]:
    """An event for the page; bulky payload fields are left out unless `full`."""
    payload = event.payload if full else {k: v for k, v in event.payload.items() if k not in _BULKY}
    return {"seq": event.seq, "time": event.time, "aggregate": event.aggregate, "n": event.experiment,
            "trigger": event.trigger, "source": event.source, "dest": event.dest, "payload": payload}


# Daemon events that the timeline shows (a note about a request answered is noise there).
TIMELINE_TRIGGERS = {"boot", "prepare", "unblock", "resume", "begin_baseline", "baseline_done", "resume_loop",
                     "pause", "block", "exhaust", "stop"}


def timeline_items(events: Iterable) -> list[dict[str, Any]]:
    """The daemon's own transitions: the page draws periods (running, blocked, paused, stopped) and
    marks restarts (a boot with no stop before it: the daemon died)."""
    items, last = [], None
    for event in events:
        if event.aggregate != "daemon":
            continue
        kind = event.payload.get("kind") if event.trigger == "note" else None
        if event.trigger not in TIMELINE_TRIGGERS and kind not in ("program_changed", "config_reloaded"):
            continue
        item = event_dict(event)
        if event.trigger == "boot":
            item["crashed_before"] = last is not None and last != "stop"
        items.append(item)
        if event.trigger != "note":
            last = event.trigger
    return items


def diff_html(diff: str) -> str:
    """A unified diff as HTML: each line marked added / removed / context / header, and the code in
    it highlighted by Pygments for the file's language. Every piece of text is escaped."""
    from pygments.lexers import TextLexer, get_lexer_for_filename
    from pygments.token import STANDARD_TYPES
    from pygments.util import ClassNotFound

    def css(ttype) -> str:
        while ttype not in STANDARD_TYPES:
            ttype = ttype.parent
        return STANDARD_TYPES[ttype]

    lexer = TextLexer()
    out = []
    for line in diff.splitlines():
        if line.startswith("+++ ") or line.startswith("--- "):
            name = line[4:].strip()
            if line.startswith("+++ ") and name != "/dev/null":
                try:
                    lexer = get_lexer_for_filename(name.split("/", 1)[-1], stripnl=False, ensurenl=False)
                except ClassNotFound:
                    lexer = TextLexer()
            out.append(f'<span class="dl dh">{html.escape(line)}</span>')
        elif line.startswith(("diff ", "index ", "new file", "deleted file", "similarity", "rename ")):
            out.append(f'<span class="dl dh">{html.escape(line)}</span>')
        elif line.startswith("@@"):
            out.append(f'<span class="dl dhunk">{html.escape(line)}</span>')
        elif line[:1] in ("+", "-", " "):
            kind = {"+": "dadd", "-": "ddel", " ": "dctx"}[line[0]]
            code = "".join(
                f'<span class="{css(t)}">{html.escape(v)}</span>' if css(t) else html.escape(v)
                for t, v in lexer.get_tokens(line[1:]))
            out.append(f'<span class="dl {kind}"><span class="dm">{html.escape(line[0])}</span>{code}</span>')
        else:
            out.append(f'<span class="dl">{html.escape(line)}</span>')
    return "".join(out)  # each line is a block of its own (CSS): no newline between them


def experiment_detail(exp: Experiment, events: Iterable, *, diff: str, log_text: str, log_source: str,
                      row: dict[str, Any] | None) -> dict[str, Any]:
    """The experiment page: what happened, the code change, the run's output, its events."""
    return {
        "n": exp.n, "kind": exp.kind, "state": exp.state, "description": exp.description,
        "proposer": exp.proposer, "commit": exp.commit, "parent": exp.parent, "reason": exp.reason,
        "metric": _finite(exp.metric), "metrics": [m for m in exp.metrics if _finite(m) is not None],
        "memory_gb": exp.memory_gb, "runs": exp.runs, "interrupts": exp.interrupts,
        "added": exp.added, "removed": exp.removed, "usage": dict(exp.usage),
        "cost_usd": round(exp.cost_usd, 6), "sandbox": exp.sandbox, "started": exp.started,
        "ended": exp.ended, "duration_s": _duration(exp),
        "delta": row["delta"] if row else None, "parent_n": row["parent_n"] if row else None,
        "diff_html": diff_html(diff) if diff else "", "log": clean_terminal_text(log_text),
        "log_source": log_source, "latest_loss": latest_loss(clean_terminal_text(log_text)),
        "events": [event_dict(e) for e in events],
    }
