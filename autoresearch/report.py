"""Read-only views of the state and the log: status, results.tsv, history.

Pure functions of their arguments, so `results` is by construction the
projection of the log (the crash tests compare the two).
"""

from __future__ import annotations

import math
from typing import Iterable

from .state import State


def fmt_metric(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.6f}" if math.isfinite(value) else str(value)


def fmt_cost(usd: float, unknown: bool = False, digits: int = 4) -> str:
    """`$0.0123`; with tokens of no known price: `unknown`, or `$0.0123 + unknown`."""
    if not unknown:
        return f"${usd:.{digits}f}"
    return f"${usd:.{digits}f} + unknown" if usd else "unknown"


def fmt_model(model: dict) -> str:
    """The anthropic model as the Models API last described it, e.g.
    `claude-sonnet-4-5 (deprecated, retires 2026-11-30)`."""
    text = model.get("model") or model.get("id") or "?"
    lifecycle = model.get("lifecycle") or "unknown"
    if lifecycle == "active":
        return text
    detail = lifecycle
    if lifecycle == "deprecated" and model.get("retires_at"):
        detail += f", retires {model['retires_at']}"
    elif lifecycle == "unknown" and model.get("error"):
        detail += f": {model['error']}"
    return f"{text} ({detail})"


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def status_line(state: State, run_elapsed: float | None = None, budget: float | None = None) -> str:
    """One line for sd_notify STATUS= and `autoresearch status`.

    e.g. `exp 42 training 3:12/5:00 · best 0.981200 · 9 kept / 41`
    """
    parts = []
    cur = state.current()
    if state.daemon in ("blocked", "exhausted", "stopped", "paused") or cur is None:
        head = state.daemon
        if state.reason:
            head += f" ({state.reason})"
        parts.append(head)
    if state.paused and state.daemon != "paused":
        parts.append("paused: starts paused until `autoresearch resume`")
    if cur is not None:
        text = f"exp {cur.n} {cur.state}"
        if cur.kind == "baseline":
            text = f"baseline (exp {cur.n}) {cur.state}"
        if cur.state == "training" and run_elapsed is not None:
            text += f" {fmt_duration(run_elapsed)}"
            if budget:
                text += f"/{fmt_duration(budget)}"
        parts.append(text)
    parts.append(f"best {fmt_metric(state.best_metric)}")
    counts = state.counts()
    parts.append(f"{counts['kept']} kept / {sum(counts.values())}")
    if state.cost_usd or state.cost_unknown:
        parts.append(fmt_cost(state.cost_usd, state.cost_unknown, 2))
    return " · ".join(parts)


RESULTS_HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")
_STATUS_WORD = {"kept": "keep", "discarded": "discard", "crashed": "crash", "rejected": "reject"}


def results_rows(state: State) -> list[tuple[str, str, str, str, str]]:
    """autoresearch's results.tsv rows: one per finished experiment, baseline first.

    As in autoresearch, a crashed run's val_bpb and memory are written as 0.
    A rejected proposal (never run) is listed as `reject`.
    """
    rows = []
    for n in sorted(state.experiments):
        exp = state.experiments[n]
        if not exp.terminal or (exp.kind == "baseline" and exp.state != "kept"):
            continue  # in flight, or a failed baseline attempt (not an experiment)
        ok = exp.state in ("kept", "discarded") and exp.metric is not None and math.isfinite(exp.metric)
        commit = (exp.commit or "-------")[:7]
        metric = f"{exp.metric:.6f}" if ok else "0.000000"
        memory = f"{exp.memory_gb:.1f}" if ok and exp.memory_gb is not None else "0.0"
        description = "baseline" if exp.kind == "baseline" else (
            " ".join((exp.description or exp.reason or "").split()) or "-")
        rows.append((commit, metric, memory, _STATUS_WORD[exp.state], description))
    return rows


def results_tsv(state: State) -> str:
    lines = ["\t".join(RESULTS_HEADER)] + ["\t".join(row) for row in results_rows(state)]
    return "\n".join(lines) + "\n"


def totals_line(state: State) -> str:
    counts, u = state.counts(), state.usage
    return (f"{sum(counts.values())} experiments: {counts['kept']} kept, {counts['discarded']} discarded, "
            f"{counts['crashed']} crashed, {counts['rejected']} rejected · best {fmt_metric(state.best_metric)}"
            f" · cost {fmt_cost(state.cost_usd, state.cost_unknown)} (tokens in {u.get('input_tokens', 0)}, out "
            f"{u.get('output_tokens', 0)}, cache read {u.get('cache_read_input_tokens', 0)}, cache write "
            f"{u.get('cache_creation_input_tokens', 0)})")


def status_text(state: State, workspace: str, daemon_pid: int | None) -> str:
    cur = state.current()
    lines = [
        f"workspace:  {workspace}",
        f"daemon:     {state.daemon}" + (f" (pid {daemon_pid})" if daemon_pid else " (not running)"),
    ]
    if state.reason:
        lines.append(f"reason:     {state.reason}")
    if state.retry_at:
        lines.append(f"retry at:   {state.retry_at}")
    lines.append(f"now:        {status_line(state)}")
    if cur is not None:
        lines.append(f"current:    exp {cur.n} {cur.state}: {cur.description or '-'}")
    best = state.experiments.get(state.best_n) if state.best_n is not None else None
    if best is not None:
        lines.append(f"best:       {fmt_metric(state.best_metric)} (exp {best.n}, {(best.commit or '')[:7]}: "
                     f"{best.description or 'baseline'})")
    if state.model:
        lines.append(f"model:      {fmt_model(state.model)}")
    if state.noise_sigma is not None:
        lines.append(f"noise:      sigma {state.noise_sigma:.6f}, keep threshold {state.threshold:.6f}")
    lines.append(f"totals:     {totals_line(state)}")
    lines.append(f"events:     {state.seq} (last {state.last_time or '-'})")
    return "\n".join(lines)


def history_line(event) -> str:
    p = event.payload
    detail = []
    for key in ("description", "commit", "metric", "reason", "kind", "exit_code", "request", "outcome"):
        if key in p and p[key] not in (None, "", {}):
            value = p[key]
            if key == "commit":
                value = str(value)[:7]
            elif key == "metric" and isinstance(value, float):
                value = fmt_metric(value)
            detail.append(f"{key}={' '.join(str(value).split())[:80]}")
    return (f"{event.seq:>6} {event.time[:19].replace('T', ' ')} {event.aggregate:<14} "
            f"{event.trigger:<14} {event.source} -> {event.dest}" + ("  " + " ".join(detail) if detail else ""))


def history_lines(events: Iterable) -> Iterable[str]:
    for event in events:
        yield history_line(event)
