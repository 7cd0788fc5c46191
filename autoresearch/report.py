"""Read-only views of the state and the log: status, results.tsv, history.

Pure functions of their arguments, so `results` is by construction the
projection of the log (the crash tests compare the two).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

from .state import RUNNING, Experiment, State


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


def _exp_word(exp: Experiment) -> str:
    """`exp 42 training`, or the baseline's own words (and its failed runs)."""
    text = f"exp {exp.n} {exp.state}"
    if exp.kind == "baseline":
        text = f"baseline (exp {exp.n}) {exp.state}"
        if exp.failed_runs:
            waiting = "to run again" if exp.state == "interrupted" else exp.state  # (after `fail`)
            text = (f"baseline (exp {exp.n}) {waiting} after {exp.failed_runs} failed "
                    f"run{'s' if exp.failed_runs > 1 else ''}")
    return text


def _run_clock(exp: Experiment, runs: Mapping[int, tuple[float, str]], budget: float | None) -> str:
    """` 3:12/5:00 step 410 · loss 3.2100` for a training run we know the clock of, else ''."""
    if exp.state != "training" or exp.n not in runs:
        return ""
    elapsed, shown = runs[exp.n]
    text = f" {fmt_duration(elapsed)}" + (f"/{fmt_duration(budget)}" if budget else "")
    return text + (f" {shown}" if shown else "")


def _nodes_word(nodes: Mapping[str, dict]) -> str:
    """A remote executor's nodes: how many are used (their slots), and why the others are not."""
    usable = [v for v in nodes.values() if v.get("usable")]
    out = f"nodes: {len(usable)} usable ({sum(v.get('slots') or 0 for v in usable)} slots)"
    refused = [v for v in nodes.values() if not v.get("usable") and v.get("reason") != "node left the cluster"]
    if refused:
        out += f", {len(refused)} refused (" + "; ".join(f"{v.get('ip')}: {v.get('reason')}" for v in refused[:3]) + ")"
    return out


def status_line(state: State, runs: Mapping[int, tuple[float, str]] | None = None,
                budget: float | None = None) -> str:
    """One line for sd_notify STATUS= and `autoresearch status`.

    e.g. `exp 42 training 3:12/5:00 step 410 · loss 3.2100 · best 0.981200 · 9 kept / 41`, or with
    several in flight `3 in flight: exp 42 training 3:12/5:00, exp 43 training 0:40/5:00, exp 44
    committed · best ...`. `runs`: experiment -> (seconds since its launch, what its own output
    says, already cleaned; see progress.py).
    """
    runs = runs or {}
    parts = []
    live = state.in_flight()
    if state.daemon in ("blocked", "exhausted", "stopped", "paused") or not live:
        head = state.daemon
        if state.reason:
            head += f" ({state.reason})"
        parts.append(head)
    if state.paused and state.daemon != "paused":
        parts.append("paused: starts paused until `autoresearch resume`")
    if len(live) == 1:
        parts.append(_exp_word(live[0]) + _run_clock(live[0], runs, budget))
    elif live:
        short = {n: (elapsed, "") for n, (elapsed, _) in runs.items()}  # progress: one line is short
        parts.append(f"{len(live)} in flight: " + ", ".join(_exp_word(e) + _run_clock(e, short, budget)
                                                             for e in live))
    parts.append(f"best {fmt_metric(state.best_metric)}")
    if state.nodes:
        parts.append(_nodes_word(state.nodes))
    counts = state.counts()
    parts.append(f"{counts['kept']} kept / {sum(counts.values())}")
    if state.cost_usd or state.cost_unknown:
        parts.append(fmt_cost(state.cost_usd, state.cost_unknown, 2))
    return " · ".join(parts)


def slot_lines(state: State, runs: Mapping[int, tuple[float, str]], budget: float | None) -> list[str]:
    """`autoresearch status`: one line per experiment in flight: its slot and device when it
    holds one (training or evaluating), else that it waits."""
    out = []
    for exp in state.in_flight():
        where = ""
        if exp.state in RUNNING and exp.slot is not None:
            dev = exp.device or {}
            device = dev.get("name") or dev.get("kind") or ""
            if dev.get("index") is not None:
                device = f"gpu {dev['index']}" + (f" ({dev['name']})" if dev.get("name") else "")
            where = f"slot {exp.slot}" + (f", {device}" if device else "") + ": "
        else:
            where = "waiting: " if exp.state in ("committed", "interrupted") else ""
        out.append(f"{where}{_exp_word(exp)}{_run_clock(exp, runs, budget)}: {' '.join((exp.description or '-').split())[:120]}")
    return out


UNTRUSTED = "reported metric differs from trusted evaluation"  # the judge's reason, named everywhere


def untrusted(exp: Experiment) -> bool:
    """Discarded (or crashed, a baseline) because what the run printed is not what was measured."""
    return exp.reason.startswith(UNTRUSTED)


def outcome(exp: Experiment) -> str:
    """How a finished experiment ended, as results, plot and show all name it:
    kept | discarded | skipped (discarded before its run gave a metric) | crashed | rejected."""
    if exp.state == "discarded" and not (exp.metric is not None and math.isfinite(exp.metric)):
        return "skipped"
    return exp.state


def listed(exp: Experiment) -> bool:
    """Whether results lists it and plot charts it: finished; failed baseline attempts are not
    experiments (the baseline is retried until it is kept)."""
    return exp.terminal and not (exp.kind == "baseline" and exp.state != "kept")


def finished(state: State) -> list[Experiment]:
    """The listed experiments, in order."""
    return [e for _, e in sorted(state.experiments.items()) if listed(e)]


RESULTS_HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")
_STATUS_WORD = {"kept": "keep", "discarded": "discard", "skipped": "discard", "crashed": "crash",
                "rejected": "reject"}


def results_rows(state: State) -> list[tuple[str, str, str, str, str]]:
    """autoresearch's results.tsv rows: one per finished experiment, baseline first.

    As in autoresearch, a crashed run's val_bpb and memory are written as 0 (its analysis
    drops `crash` rows by status). An experiment that never gave a metric otherwise (rejected
    before its run, skipped during it) leaves both empty: a 0 there would read as the best value,
    while pandas reads an empty field as NaN, which the analysis' comparisons leave out.
    """
    rows = []
    for exp in finished(state):
        how = outcome(exp)
        commit = (exp.commit or "-------")[:7]
        if how in ("kept", "discarded"):
            metric = f"{exp.metric:.6f}"
            memory = f"{exp.memory_gb:.1f}" if exp.memory_gb is not None else ""
        elif how == "crashed":
            metric, memory = "0.000000", "0.0"
        else:
            metric, memory = "", ""
        description = "baseline" if exp.kind == "baseline" else (
            " ".join((exp.description or exp.reason or "").split()) or "-")
        if how == "skipped":
            description += f" ({exp.reason or 'skipped'}; no result)"
        elif untrusted(exp):
            description += f" ({exp.reason})"
        rows.append((commit, metric, memory, _STATUS_WORD[how], description))
    return rows


def results_tsv(state: State) -> str:
    lines = ["\t".join(RESULTS_HEADER)] + ["\t".join(row) for row in results_rows(state)]
    return "\n".join(lines) + "\n"


def fmt_spend(usd: float, unknown: bool, usage: dict[str, int]) -> str:
    """`$0.0123 (tokens in 1200, out 340, cache read 0, cache write 800)`."""
    u = usage
    return (f"{fmt_cost(usd, unknown)} (tokens in {u.get('input_tokens', 0)}, out {u.get('output_tokens', 0)}, "
            f"cache read {u.get('cache_read_input_tokens', 0)}, "
            f"cache write {u.get('cache_creation_input_tokens', 0)})")


def totals_line(state: State) -> str:
    counts = state.counts()
    return (f"{sum(counts.values())} experiments: {counts['kept']} kept, {counts['discarded']} discarded, "
            f"{counts['crashed']} crashed, {counts['rejected']} rejected · best {fmt_metric(state.best_metric)}"
            f" · cost {fmt_spend(state.cost_usd, state.cost_unknown, state.usage)}")


def experiment_text(exp: Experiment, diff: str | None = None, tail_chars: int = 3000) -> str:
    """`autoresearch show`: what an experiment tried, who proposed it, how it ended and why."""
    how = outcome(exp) if exp.terminal else exp.state
    lines = [f"experiment {exp.n} ({exp.kind}): {how}" + (" (discarded before a result)" if how == "skipped" else ""),
             f"description: {' '.join(exp.description.split()) or '-'}",
             f"proposer:    {exp.proposer or '-'}"]
    if exp.meta.get("fallback_from"):  # the configured agent produced nothing usable
        lines.append(f"agent:       the {exp.meta['fallback_from']} agent failed: "
                     f"{exp.meta.get('fallback_reason') or '-'}; the {exp.proposer or 'offline'} search "
                     "proposed this instead")
    lines.append(f"commit:      {exp.commit or '-'} (parent {exp.parent or '-'})")
    metric = fmt_metric(exp.metric)
    if len(exp.metrics) > 1:
        metric += f"  (runs: {', '.join(fmt_metric(m) for m in exp.metrics)})"
    lines.append(f"metric:      {metric}")
    if exp.printed is not None:  # measured by the evaluation step; this is what the run said
        lines.append(f"printed:     {fmt_metric(exp.printed)} (by the run; the metric above is the trusted evaluation's)")
    lines.append(f"lines:       +{exp.added} -{exp.removed}")
    if exp.reason:
        lines.append(f"reason:      {exp.reason}")
    if exp.cost_usd or exp.cost_unknown or any(exp.usage.values()):
        lines.append(f"cost:        {fmt_spend(exp.cost_usd, exp.cost_unknown, exp.usage)}")
    if diff is not None:
        lines += ["", "--- diff ---", diff.rstrip()]
    if exp.log_tail:
        lines += ["", "--- log tail ---", exp.log_tail.rstrip()[-tail_chars:]]
    return "\n".join(lines)


def status_text(state: State, workspace: str, daemon_pid: int | None,
                runs: Mapping[int, tuple[float, str]] | None = None, budget: float | None = None,
                requests: Iterable[dict] = ()) -> str:
    """`autoresearch status`; `runs` as for status_line; `requests`: those still in the inbox
    (control.pending_requests)."""
    runs = runs or {}
    live = state.in_flight()
    lines = [
        f"workspace:  {workspace}",
        f"daemon:     {state.daemon}" + (f" (pid {daemon_pid})" if daemon_pid else " (not running)"),
    ]
    if state.reason:
        lines.append(f"reason:     {state.reason}")
    if state.retry_at:
        lines.append(f"retry at:   {state.retry_at}" + ("  (`autoresearch resume` retries now)"
                                                          if state.daemon == "blocked" else ""))
    if state.daemon_error:
        lines.append(f"failed:     {state.daemon_error}; details in daemon.log")
    requests = list(requests)
    if requests:
        listed = ", ".join(f"{r['action']}" + (f" exp {r['experiment']}" if r.get("experiment") is not None else "")
                           + f" ({str(r.get('time', ''))[11:19]}Z)" for r in requests)
        when = "when the daemon reads them" if daemon_pid else "when the daemon starts"
        lines.append(f"requests:   {listed}: not read yet; they take effect {when}")
    lines.append(f"now:        {status_line(state, runs, budget)}")
    for i, line in enumerate(slot_lines(state, runs, budget)):
        lines.append(("in flight:  " if i == 0 else " " * 12) + line)
    for cur in live:
        if cur.failed_runs:
            lines.append(f"baseline:   {cur.failed_runs} failed run{'s' if cur.failed_runs > 1 else ''} of "
                         f"exp {cur.n}, retried after each block; last: {cur.failure}")
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
    contained = sandbox_warning(state)
    if contained:
        lines.append(f"sandbox:    {contained}")
    return "\n".join(lines)


def last_sandbox(state: State):
    """The experiment whose run started last (its sandbox is what runs get now), or None."""
    ran = [e for e in state.experiments.values() if e.sandbox]
    return max(ran, key=lambda e: e.n) if ran else None


def sandbox_warning(state: State) -> str:
    """A warning while runs are not fully contained (the last run had no bubblewrap); else ''."""
    exp = last_sandbox(state)
    if exp is None or exp.sandbox == "bwrap":
        return ""
    why = f": {exp.sandbox_why}" if exp.sandbox_why else ""
    return f"WARNING: runs are not fully contained (exp {exp.n} ran with sandbox {exp.sandbox}{why})"


def history_line(event) -> str:
    p = event.payload
    detail = []
    for key in ("description", "commit", "metric", "reason", "kind", "lifecycle", "exit_code", "request",
                "outcome", "error"):
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
