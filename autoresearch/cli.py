"""The `autoresearch` command line. Every command is documented with an example in docs/CLI.md.

User mistakes (bad path, bad config, locked workspace, corrupt log) end as one
line on stderr and an exit code from the one scheme in errors.Exit, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from typing import Any
from datetime import datetime
from pathlib import Path

from . import __version__
from .clock import parse_utc
from .errors import BusyError, CorruptLogError, Exit, NewerLogError, SystemRefusedError, UserError, WorkspaceError

EXAMPLES = """examples:
  autoresearch run lab --init          create ./lab from the built-in workload and loop until Ctrl-C
  autoresearch status lab              what the daemon is doing now
  autoresearch results lab > results.tsv
  autoresearch show lab 7              diff, metric and log tail of experiment 7
  autoresearch pause lab               (also: resume, skip, stop)
  autoresearch tail -f lab             follow the daemon's structured log
  autoresearch dashboard lab           live page at http://127.0.0.1:8765/
  autoresearch service install lab --user
"""


def _duration(text: str) -> float:
    """'90', '90s', '30m', '2h', '1h30m' -> seconds."""
    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or not m or not any(m.groups()):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 30m, 8h, 1h30m)")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def _experiment_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not an experiment number: {text!r} (usage: show [DIR] N)")
    return int(text)


def _workspace_dir(path: str) -> Path:
    root = Path(path).absolute()
    if not root.is_dir():
        raise WorkspaceError(f"{path}: no such directory")
    if not (root / "autoresearch.toml").exists() and not (root / ".autoresearch").is_dir():
        raise WorkspaceError(f"{path}: not an autoresearch workspace (no autoresearch.toml)")
    return root


def _require_writable(path: Path, what: str) -> None:
    """One line naming the cause when `path` (or, absent, its nearest parent) cannot be written."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if os.access(probe, os.W_OK):
        return
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    cause = "read-only file system" if read_only else f"permission denied for user {os.getuid()}"
    raise SystemRefusedError(f"{probe}: {cause}: cannot {what}")


def _open_log(root: Path):
    """The event log, opened read-only (readers never write, and work on a read-only mount)."""
    from .eventlog import EventLog

    return EventLog.open_reader(root / ".autoresearch" / "events.sqlite")


def _refuse_newer_log(root: Path) -> None:
    """For commands that touch the workspace without reading the log through `_open_log`
    (requests, the dashboard): a log written by a newer autoresearch is refused by them too."""
    from .eventlog import EventLog

    path = root / ".autoresearch" / "events.sqlite"
    if not path.exists():
        return
    try:
        EventLog.open_reader(path).close()
    except NewerLogError:
        raise
    except (UserError, sqlite3.DatabaseError):
        pass  # damage, permissions: each command says what it does about those


def _read_state(root: Path):
    from .eventlog import open_error

    log = _open_log(root)
    try:
        return log.state()
    except sqlite3.DatabaseError as exc:
        raise open_error(log.path, exc) from None
    except (ValueError, KeyError) as exc:
        raise CorruptLogError(f"{root}: cannot read the event log ({exc}); try `autoresearch verify`") from None
    finally:
        log.close()


def _no_experiment(n: int, known) -> UserError:
    return UserError(f"no experiment {n} (" + (f"experiments: 0..{max(known)})" if known else "none yet)"))


def _git_view(root: Path):
    """The workspace's git side, read-only (no `Workspace.open`: that may write .git/info/exclude);
    None when it is not a usable repository."""
    import git

    from .workspace import Workspace

    try:
        return Workspace(root=root, repo=git.Repo(root))
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None


# ---------------------------------------------------------------------- commands

def cmd_init(args) -> int:
    from . import config as config_mod
    from . import trainer
    from .workspace import Workspace

    profile = args.profile or trainer.detect_profile()
    tag = args.tag or datetime.now().strftime("%b%d").lower()
    data, proposer = args.data or "stdlib", args.proposer or "offline"
    cfg = config_mod.Config(
        run=config_mod.RunConfig(
            command="python train.py",
            prepare_command="python -m autoresearch.trainer.prepare",
            budget_seconds=float(trainer.PROFILES[profile]["budget_seconds"]),
        ),
        proposer=config_mod.ProposerConfig(kind=proposer),
        workload=config_mod.WorkloadConfig(profile=profile, data=data),
    )
    text = config_mod.render(cfg, config_mod.COMMENTS)
    ws = Workspace.create(Path(args.dir), trainer.workload_files(profile), tag, text, editable=("train.py",))
    print(f"created workspace {ws.root} (branch autoresearch/{tag}, profile {profile}, data {data})",
          file=sys.stderr)
    return 0


class _LiveLine:
    """The terminal under the log lines (logs.HumanStream writes them here): one dimmed line that
    shows the run in flight, redrawn below each log line and refreshed every second."""

    REFRESH_S = 1.0

    def __init__(self, stream):
        self._stream = stream
        self._live = ""  # the live line now on screen ('' = none)
        self._drawn = 0.0

    def isatty(self) -> bool:
        return self._stream.isatty()

    def write(self, text: str) -> int:
        live, self._live = self._live, ""
        if live:
            self._stream.write("\r\x1b[K")  # the log line takes the live line's place...
        self._stream.write(text)
        if live and text.endswith("\n"):
            self._draw(live)  # ...which comes back below it
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def live(self, text: str | None) -> None:
        """Show `text` (already cleaned: progress.py) as the live line; None clears it."""
        now = time.monotonic()
        if text is None:
            if self._live:
                self._stream.write("\r\x1b[K")
                self._stream.flush()
                self._live = ""
        elif now - self._drawn >= self.REFRESH_S:
            self._draw(text)
            self._drawn = now

    def _draw(self, text: str) -> None:
        import shutil

        self._live = text[:max(20, shutil.get_terminal_size().columns - 1)]
        self._stream.write("\r\x1b[K\x1b[2m" + self._live + "\x1b[0m")  # dim: it is not a log line
        self._stream.flush()


def _run_overrides(args, root: Path) -> dict:
    """`run`'s creation options on an existing workspace: never silently ignored.

    --proposer applies to this invocation (recorded in the boot event; autoresearch.toml is not
    changed). --profile, --data and --tag describe how a workspace is created: one that differs
    from the workspace is refused with what to do instead.
    """
    from . import config as config_mod
    from .workspace import BRANCH_PREFIX

    cfg = config_mod.load(root)
    wl = cfg.workload
    if args.profile and args.profile != wl.profile:
        has = wl.profile or "none (not the built-in workload)"
        raise UserError(f"--profile {args.profile}: {root.name} has profile {has}, fixed for the life of a "
                        "workspace; --profile only applies when one is created")
    if args.data and args.data != wl.data:
        raise UserError(f"--data {args.data}: --data only applies when a workspace is created; "
                        f"to change it, edit workload.data in {root / config_mod.CONFIG_NAME}")
    if args.tag:
        branch = subprocess.run(["git", "symbolic-ref", "-q", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True).stdout.strip()
        if branch != BRANCH_PREFIX + args.tag:
            raise UserError(f"--tag {args.tag}: --tag only names the branch of a new workspace; "
                            f"{root.name} is on branch {branch or '(unknown)'}")
    if args.proposer and args.proposer != cfg.proposer.kind:
        config_mod.override(cfg, {"proposer.kind": args.proposer}, f"--proposer {args.proposer}")
        return {"proposer.kind": args.proposer}
    return {}


def _warn_uncontained(mode: str) -> None:
    """`run`'s first line, when the runs it starts will not be fully contained (no bubblewrap)."""
    from . import sandbox

    kind, why = sandbox.expected(mode)
    if kind != "bwrap":
        print(f"autoresearch: WARNING: runs will not be fully contained (sandbox {kind}: {why}); "
              "see README, What it guarantees", file=sys.stderr)


def cmd_run(args) -> int:
    from . import config as config_mod
    from .control import lock_holder, locked_error

    if args.max_experiments is not None and args.max_experiments < 0:
        raise UserError(f"--max-experiments must be 0 or more, not {args.max_experiments}")
    root = Path(args.dir)
    created = args.init and not (root / config_mod.CONFIG_NAME).exists()
    if created:
        cmd_init(args)
    root = _workspace_dir(args.dir)
    # Refuse a bad config or a locked workspace before the heavy imports (git, the agent SDKs):
    # the daemon checks both again, authoritatively, once it holds the lock.
    config_mod.load(root)
    holder = lock_holder(root / ".autoresearch")
    if holder is not None:
        raise locked_error(root / ".autoresearch", holder)
    overrides = {} if created else _run_overrides(args, root)
    _require_writable(root / ".autoresearch", "run the daemon here")

    from . import logs, secrets
    from .daemon import Daemon
    from .report import status_line

    daemon = Daemon(root, max_experiments=args.max_experiments, run_for=args.run_for, overrides=overrides)
    daemon.open()  # every refusal happens here: before a log file, a lock file, anything
    _warn_uncontained(daemon.cfg.sandbox.mode)
    secrets.install_log_guard()
    fmt = args.log_format if args.log_format != "auto" else ("human" if sys.stdout.isatty() else "json")
    live = _LiveLine(sys.stdout) if fmt == "human" and sys.stdout.isatty() else None
    logs.configure(root / ".autoresearch", stream=live or sys.stdout, journal=args.journal, fmt=fmt,
                   level=args.log_level, redact=secrets.redact)
    if live is not None:
        daemon.on_tick = lambda: live.live(daemon.live_line())
    try:
        code = daemon.run()
    finally:
        if live is not None:
            live.live(None)
        logs.close()
    print(f"autoresearch: {status_line(daemon.state)}", file=sys.stderr)
    if daemon.error:
        print(f"autoresearch: error: the daemon failed: {daemon.error} (traceback in "
              f"{root / '.autoresearch' / logs.LOG_NAME})", file=sys.stderr)
    return code


def cmd_status(args) -> int:
    from .control import lock_holder, pending_requests
    from .report import last_sandbox, status_text

    root = _workspace_dir(args.dir)
    state = _read_state(root)
    pid = lock_holder(root / ".autoresearch")
    live = state.in_flight()
    runs: dict[int, tuple[float, str]] = {}
    shown_of: dict[int, Any] = {}
    budget = None
    if pid is not None and any(e.state == "training" and e.launched for e in live):
        # Each run in flight: its clock from its launch event, its progress from its own output.
        from . import config as config_mod, progress

        try:
            budget = config_mod.load(root).run.budget_seconds
        except UserError:
            budget = None  # a config being edited: the elapsed time alone still helps
        for e in live:
            if e.state == "training" and e.launched:
                elapsed = max(0.0, time.time() - parse_utc(e.launched))
                shown_of[e.n] = progress.read(root / e.log)
                runs[e.n] = (elapsed, str(shown_of[e.n]) if shown_of[e.n] else "")

    def as_json(e):
        shown = shown_of.get(e.n)
        return {"n": e.n, "state": e.state, "description": e.description, "kind": e.kind,
                "failed_runs": e.failed_runs, "slot": e.slot if e.state in ("training", "evaluating") else None,
                "device": e.device or None if e.state in ("training", "evaluating") else None,
                "run": None if e.n not in runs else {
                    "elapsed_s": round(runs[e.n][0], 1), "budget_s": budget,
                    "step": shown.step if shown else None, "loss": shown.loss if shown else None}}

    requests = pending_requests(root / ".autoresearch")
    if args.json:
        print(json.dumps({
            "daemon": state.daemon, "running": pid is not None, "pid": pid, "reason": state.reason,
            "retry_at": state.retry_at, "daemon_error": state.daemon_error,
            "current": as_json(live[0]) if live else None,  # the oldest in flight
            "in_flight": [as_json(e) for e in live],
            "best_metric": state.best_metric, "best_commit": state.best_commit, "counts": state.counts(),
            "cost_usd": state.cost_usd, "cost_unknown": state.cost_unknown, "usage": state.usage,
            "model": state.model or None, "events": state.seq,
            "nodes": state.nodes or None,  # a Ray executor's nodes: usable or why not
            "sandbox": None if last_sandbox(state) is None else last_sandbox(state).sandbox,
            "requests": requests}, indent=2))
        return 0
    text = status_text(state, str(root), pid, runs, budget, requests)
    if pid is None and state.daemon not in ("stopped", "exhausted"):
        text += "\nnote:       no daemon is running (it died or was killed); `autoresearch run` resumes"
    print(text)
    return 0


def cmd_history(args) -> int:
    from .report import history_line

    root = _workspace_dir(args.dir)
    log = _open_log(root)
    seen: set[int] = set()
    try:
        for event in log.events():
            if event.experiment is not None:
                seen.add(event.experiment)
            if args.experiment is not None and event.experiment != args.experiment:
                continue
            if args.json:
                print(json.dumps({"seq": event.seq, "time": event.time, "aggregate": event.aggregate,
                                  "trigger": event.trigger, "source": event.source, "dest": event.dest,
                                  "payload": event.payload}))
            else:
                print(history_line(event))
    finally:
        log.close()
    if args.experiment is not None and args.experiment not in seen:
        raise _no_experiment(args.experiment, seen)
    return 0


def cmd_results(args) -> int:
    from .report import results_tsv, totals_line

    state = _read_state(_workspace_dir(args.dir))
    sys.stdout.write(results_tsv(state))
    print(totals_line(state), file=sys.stderr)
    return 0


def cmd_show(args) -> int:
    from . import config as config_mod, secrets
    from .report import experiment_text
    from .sanitize import clean
    from .workspace import Workspace

    root = _workspace_dir(args.dir)
    state = _read_state(root)
    exp = state.experiments.get(args.n)
    if exp is None:
        raise _no_experiment(args.n, state.experiments)
    secrets.remember_environment()
    diff = None
    if exp.commit and exp.parent:
        diff = Workspace.open(root, config_mod.load(root).run.editable).diff(exp.parent, exp.commit)
    # All of it may carry an agent's or a run's text: no escapes, no secrets.
    print(clean(experiment_text(exp, diff, args.tail_chars)))
    return 0


def _anchors(ws) -> list[tuple[int, str, int | None]]:
    if ws is None:
        return []
    try:
        return ws.anchors()
    except UserError:
        return []


def cmd_verify(args) -> int:
    from .eventlog import EventLog, verify_path
    from .machine import check_event

    root = _workspace_dir(args.dir)
    path = root / ".autoresearch" / "events.sqlite"
    ws = _git_view(root)
    anchors = _anchors(ws)
    if not path.exists() and anchors:
        print(f"{path}: missing, but git anchors {anchors[0][0]} events of it (refs/autoresearch/log)",
              file=sys.stderr)
        print("to recover: restore the file, or `autoresearch repair` starts a new log that records the loss",
              file=sys.stderr)
        return Exit.CORRUPT
    report = verify_path(path, [(s, h) for s, h, _ in anchors])
    state = None
    try:
        log = EventLog.open_reader(path)
        try:
            state = log.state()
        finally:
            log.close()
    except (UserError, sqlite3.DatabaseError, ValueError, KeyError):
        pass  # the report below names what is wrong
    if not report.ok:
        print(f"{path}: {report}" + _unknown_refs(ws, state, report), file=sys.stderr)
        _print_damage(report, sys.stderr)
        if report.corrupt:
            print("to recover: `autoresearch repair` backs the log up, keeps every event that proves itself "
                  "and records the others as quarantined or lost", file=sys.stderr)
        return Exit.CORRUPT
    # The chain is intact; also check every transition against the machines' tables.
    log = EventLog.open_reader(path)
    try:
        current: dict[str, str] = {}
        last = 0
        for event in log.events():
            if event.seq != last + 1:
                current.clear()  # events recorded as damaged: what they did is unknown
            last = event.seq
            problem = check_event(event.aggregate, event.trigger, event.source, event.dest)
            expected = current.get(event.aggregate)
            if not problem and expected is not None and event.source != expected:
                problem = f"source {event.source!r} but {event.aggregate} was in {expected!r}"
            if problem:
                print(f"{path}: event {event.seq}: illegal transition: {problem}", file=sys.stderr)
                return Exit.CORRUPT
            current[event.aggregate] = event.dest
    finally:
        log.close()
    anchored = f"; anchored in git up to event {anchors[0][0]}" if anchors else ""
    print(f"{path}: {report}; every transition legal{anchored}")
    _print_damage(report, sys.stdout)
    unknown = _unknown_refs(ws, state, report)
    if unknown:  # evidence of lost events; a "note" once the daemon has recorded their numbers as taken
        recorded = "not reused" in unknown and state.next_floor > max(
            int(n) for n in re.findall(r"refs/autoresearch/exp/(\d+)", unknown))
        print(("note:" if recorded else "warning:") + unknown.removeprefix(";"), file=sys.stderr)
    return 0


def _unknown_refs(ws, state, report) -> str:
    """'; experiments 9-12 have refs ...' for experiment refs the log does not know."""
    if ws is None or state is None:
        return ""
    try:
        refs = ws.all_exp_refs()
    except Exception:  # a broken ref store: verify is about the log
        return ""
    unknown = sorted(n for n in refs if n not in state.experiments)
    if not unknown:
        return ""
    names = ", ".join(f"refs/autoresearch/exp/{n}" for n in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
    span = f"experiment {unknown[0]} has a ref" if len(unknown) == 1 else \
        f"experiments {unknown[0]}-{unknown[-1]} have refs" if unknown[-1] - unknown[0] == len(unknown) - 1 else \
        f"{len(unknown)} experiments have refs"
    its = "its number is" if len(unknown) == 1 else "their numbers are"
    return f"; {span} in git but no event in the log ({names}; kept, {its} not reused)"


def _print_damage(report, stream) -> None:
    for d in report.damage:
        print(f"  {d}", file=stream)
        if d.raw:
            print(f"    raw: {d.raw[:300]}{' ...' if len(d.raw) > 300 else ''}", file=stream)


def cmd_repair(args) -> int:
    from .control import lock_holder
    from .eventlog import no_log_error, repair, verify_path

    root = _workspace_dir(args.dir)
    pid = lock_holder(root / ".autoresearch")
    if pid is not None:
        raise BusyError(f"{args.dir}: a daemon (pid {pid if pid > 0 else 'unknown'}) is running; "
                        "stop it before repairing")
    path = root / ".autoresearch" / "events.sqlite"
    anchors = [(s, h) for s, h, _ in _anchors(_git_view(root))]
    if path.exists():
        report = verify_path(path, anchors)
        if report.ok:
            print(f"{path}: {report}; nothing to repair")
            return 0
        if not report.corrupt:
            raise CorruptLogError(f"{path}: {report}; repair cannot fix this")
    elif not anchors:
        raise no_log_error(path)
    _require_writable(path.parent, "repair the event log")
    print(repair(path, anchors))
    return 0


def cmd_plot(args) -> int:
    from . import config as config_mod
    from .plot import plot
    from .report import finished

    root = _workspace_dir(args.dir)
    state = _read_state(root)
    if not finished(state):
        raise UserError(f"{args.dir}: nothing to plot yet: no experiment has finished (not even the "
                        "baseline); no file written")
    out = Path(args.output)
    count = plot(state, out, config_mod.load(root).run.direction)
    print(f"wrote {out} ({count} experiments)")
    return 0


LIVENESS_CHECK_S = 0.25  # how often a waiting request checks that the daemon still runs


def cmd_request(args) -> int:
    """pause | resume | stop | skip: write to the inbox, return once the daemon has logged its answer."""
    from .control import lock_holder, request_path, submit_request, withdraw_request

    root = _workspace_dir(args.dir)
    _refuse_newer_log(root)
    state_dir = root / ".autoresearch"
    # Pause outlives restarts, so pause and resume can wait in the inbox for the next start;
    # skip and stop mean "now" and need a running daemon.
    queueable = args.command in ("pause", "resume")
    running = lock_holder(state_dir) is not None
    if running or queueable:
        _require_writable(state_dir / "inbox", f"send a {args.command} request")
    if not running:
        if queueable and (state_dir / "events.sqlite").exists():
            submit_request(state_dir, args.command)
            print(f"{args.command}: queued: no daemon is running on {args.dir}; "
                  "it takes effect when the daemon starts")
            return 0
        raise BusyError(f"{args.dir}: no daemon is running on this workspace")
    target = seen = None
    if args.command == "skip":
        target = args.experiment
        if target is None:  # every experiment in flight, as the person sees them now
            seen = _in_flight(root)
    rid = submit_request(state_dir, args.command, experiment=target, seen=seen)
    row, gone = _await_answer(state_dir, rid, args.timeout)
    if row is None:
        # Say where the request really is: withdrawn, still in the inbox, or taken but unanswered.
        if gone and not queueable and withdraw_request(state_dir, rid):
            raise BusyError(f"{args.command}: the daemon exited before reading the request; withdrawn "
                            f"({args.command} needs a running daemon)")
        if request_path(state_dir, rid).exists():
            when = "when a daemon starts" if gone else "when the daemon reads it"
            why = "the daemon exited before reading it" if gone else \
                f"the daemon did not read it within {args.timeout:g}s"
            raise BusyError(f"{args.command}: {why}; the request stays in its inbox and takes effect {when}")
        why = "the daemon exited without answering it" if gone else \
            f"the daemon took it but did not answer within {args.timeout:g}s"
        raise BusyError(f"{args.command}: {why}; see `autoresearch history` and daemon.log")
    seq, aggregate, trigger, dest, payload = row
    outcome = json.loads(payload).get("outcome")
    if outcome:
        print(f"{args.command}: {outcome} (event {seq})", file=sys.stderr)
        return Exit.DECLINED
    rows = [row]
    if args.command == "skip" and target is None:  # every experiment in flight: one event each, one turn
        time.sleep(0.2)
        rows = _find_answers(state_dir / "events.sqlite", rid) or rows
    print(f"{args.command}: done: " + ", ".join(f"{a} {t} -> {d} (event {q})" for q, a, t, d, _ in rows))
    return 0


def _await_answer(state_dir: Path, rid: str, timeout: float):
    """(the event that answered `rid` or None, whether the daemon is gone): waits until the
    answer, the timeout, or the daemon's exit (after one more look: it may have answered last)."""
    from .control import lock_holder
    from .eventlog import open_error

    path = state_dir / "events.sqlite"
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + LIVENESS_CHECK_S
    problem = None  # the last reason the log could not be read; it may pass (a stopping daemon
    gone = False    # writes a deleted -wal back into the log)
    while True:
        row = None
        try:
            row = _find_answer(path, rid)
            problem = None
        except (UserError, sqlite3.DatabaseError) as exc:
            problem = exc if isinstance(exc, UserError) else open_error(path, exc)
        if row or gone or time.monotonic() >= deadline:
            break
        if time.monotonic() >= next_check:
            gone = lock_holder(state_dir) is None
            next_check = time.monotonic() + LIVENESS_CHECK_S
        time.sleep(0.05)
    if row is None and problem is not None:
        raise problem
    return row, gone


def _in_flight(root: Path) -> list[int] | None:
    """The experiments in flight per the log (without an outcome yet); None if unreadable (the
    daemon then skips whatever is in flight when it reads the request)."""
    try:
        return [e.n for e in _read_state(root).in_flight()]
    except UserError:
        return None


def _find_answers(path: Path, rid: str) -> list:
    """Every event that answers request `rid`, oldest first (a bare skip: one per experiment it
    skipped); [] while none has."""
    from .eventlog import EventLog

    if not path.exists():
        return []
    log = EventLog.open_reader(path)
    try:
        return log.db.execute("SELECT seq, aggregate, trigger, dest, payload FROM events WHERE payload LIKE ? "
                              "ORDER BY seq", [f'%"request":"{rid}"%']).fetchall()
    finally:
        log.close()


def _find_answer(path: Path, rid: str):
    """The first event that answers request `rid`, or None (yet)."""
    answers = _find_answers(path, rid)
    return answers[0] if answers else None


def cmd_tail(args) -> int:
    from .tail import tail

    root = _workspace_dir(args.dir)
    try:
        tail(root / ".autoresearch", follow=args.follow, as_json=args.json, experiment=args.experiment,
             lines=args.lines)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    return 0


def cmd_dashboard(args) -> int:
    from .dashboard.server import serve

    root = _workspace_dir(args.dir)
    _refuse_newer_log(root)
    try:
        return serve(root, args.listen, token=args.token, token_file=args.token_file, new_token=args.new_token)
    except KeyboardInterrupt:
        return 0


def cmd_service(args) -> int:
    from . import service

    root = Path(args.dir).absolute()
    if args.action == "install":
        _workspace_dir(args.dir)
        listen = (args.listen or "127.0.0.1:8765") if args.dashboard else None
        if args.listen and not args.dashboard:
            raise UserError("--listen is for the dashboard's unit: add --dashboard")
        installed = service.install(root, user=args.user, gpu=args.gpu, print_only=args.print, name=args.name,
                                    dashboard=listen)
        if args.print:
            print(installed.text, end="")
        else:
            print(f"installed and started {installed.unit} ({installed.path})")
            if installed.token:
                print(f"dashboard access token (shown this once; open http://HOST:PORT/?token=...): {installed.token}")
            for hint in installed.hints:
                print(f"hint: {hint}")
    elif args.action == "uninstall":
        print(f"stopped and removed {service.uninstall(root, user=args.user, name=args.name, dashboard=args.dashboard)}")
    else:
        print(service.status(root, user=args.user, name=args.name, dashboard=args.dashboard))
    return 0


# ---------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoresearch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="An unattended ML-research daemon: propose, train, judge, keep or roll back.",
        epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"autoresearch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help, example):
        sp = sub.add_parser(name, help=help, description=f"{help}\n\nexample:\n  {example}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func)
        return sp

    def init_options(sp):
        sp.add_argument("--tag", help="branch name suffix: autoresearch/<tag> (default: today, e.g. nov26)")
        sp.add_argument("--profile", choices=["cpu", "gpu"], help="default: gpu if CUDA is available, else cpu")
        sp.add_argument("--data", help="stdlib (default, offline) | dir:/path | climbmix | tinystories")
        sp.add_argument("--proposer", choices=["offline", "anthropic", "command"],
                        help="default: offline; for `run` on an existing workspace: this run only "
                             "(autoresearch.toml is not changed)")

    sp = add("init", cmd_init, "create a workspace from the built-in workload", "autoresearch init lab")
    sp.add_argument("dir")
    init_options(sp)

    sp = add("run", cmd_run, "run the daemon in the foreground (Ctrl-C stops; run again to resume)",
             "autoresearch run lab --init --for 8h")
    sp.add_argument("dir", nargs="?", default=".")
    sp.add_argument("--init", action="store_true", help="create the workspace first if it does not exist")
    init_options(sp)
    sp.add_argument("--max-experiments", type=int, metavar="N",
                    help="stop once N experiments reach an outcome in this invocation (kept, discarded, "
                         "crashed, rejected or skipped; the re-run of an interrupted one counts when it "
                         "ends; a measured baseline does not, a failed baseline run does); 0: only a "
                         "baseline if there is none yet")
    sp.add_argument("--for", dest="run_for", type=_duration, metavar="DURATION",
                    help="stop after this long, e.g. 90m or 8h")
    sp.add_argument("--journal", choices=["auto", "on", "off"], default="auto",
                    help="log to journald (auto: when running under systemd)")
    sp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sp.add_argument("--log-format", default="auto", choices=["auto", "human", "json"],
                    help="how the log is printed: human lines (as `autoresearch tail` shows them) or JSON "
                         "lines (as in daemon.log); auto (default): human on a terminal, JSON otherwise")

    sp = add("status", cmd_status, "what the daemon is doing, best so far, totals", "autoresearch status lab")
    sp.add_argument("dir", nargs="?", default=".")
    sp.add_argument("--json", action="store_true")

    sp = add("history", cmd_history, "replay the event log: one line per transition",
             "autoresearch history lab --experiment 3")
    sp.add_argument("dir", nargs="?", default=".")
    sp.add_argument("--experiment", type=int, metavar="N")
    sp.add_argument("--json", action="store_true", help="one JSON object per event")

    sp = add("results", cmd_results, "autoresearch-compatible results.tsv on stdout (totals on stderr)",
             "autoresearch results lab > results.tsv")
    sp.add_argument("dir", nargs="?", default=".")

    sp = add("show", cmd_show, "diff, metric and log tail of one experiment (show [DIR] N)",
             "autoresearch show lab 7")
    # One argument is the experiment (the directory defaults to the current one); two are DIR N.
    sp.add_argument("dir", nargs="?", default=".")
    sp.add_argument("n", type=_experiment_number, metavar="N")
    sp.add_argument("--tail-chars", type=int, default=3000)

    sp = add("verify", cmd_verify,
             "check the event log: sequence, hash chain, anchors in git, schema, legal transitions",
             "autoresearch verify lab")
    sp.add_argument("dir", nargs="?", default=".")

    sp = add("repair", cmd_repair,
             "back up a damaged event log; keep every event that proves itself, record the rest",
             "autoresearch repair lab")
    sp.add_argument("dir", nargs="?", default=".")

    sp = add("plot", cmd_plot, "PNG of every experiment's metric with the running best",
             "autoresearch plot lab -o progress.png")
    sp.add_argument("dir", nargs="?", default=".")
    sp.add_argument("-o", "--output", default="progress.png")

    for name, help in (("pause", "let every run in flight finish, then wait (nothing new starts)"),
                       ("resume", "continue after a pause"),
                       ("stop", "stop the daemon gracefully (experiments in flight are re-run on resume)"),
                       ("skip", "abort experiment N as discarded; without N, every experiment in flight")):
        example = "autoresearch skip lab 12" if name == "skip" else f"autoresearch {name} lab"
        sp = add(name, cmd_request, help, example)
        sp.add_argument("dir", nargs="?", default=".")
        if name == "skip":
            sp.add_argument("experiment", nargs="?", type=int, metavar="N",
                            help="the experiment to skip (default: all in flight)")
        sp.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the daemon")

    sp = add("tail", cmd_tail, "show or follow the daemon's structured log", "autoresearch tail -f lab")
    sp.add_argument("dir", nargs="?", default=".")
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("--json", action="store_true", help="raw JSON lines")
    sp.add_argument("--experiment", type=int, metavar="N")
    sp.add_argument("-n", "--lines", type=int, default=50)

    sp = add("dashboard", cmd_dashboard, "a read-only live web page over the workspace's event log",
             "autoresearch dashboard lab --listen 127.0.0.1:8765")
    sp.add_argument("dir", nargs="?", default=".")
    sp.add_argument("--listen", default="127.0.0.1:8765", metavar="HOST:PORT",
                    help="where to listen (default 127.0.0.1:8765; beyond loopback a token is required)")
    sp.add_argument("--token", action="store_true", help="require the access token on loopback too")
    sp.add_argument("--new-token", action="store_true", help="replace the stored token with a new one (shown once)")
    sp.add_argument("--token-file", type=Path, metavar="PATH",
                    help="where the token's hash is kept (default: in ~/.local/state/autoresearch/dashboard/)")

    sp = add("service", cmd_service, "install, uninstall or inspect the systemd unit of a workspace",
             "autoresearch service install lab --user --gpu 0")
    # One parser per action, so that options and the directory may come in any order
    # (`service install --user lab`: with a single parser argparse binds `dir` too early).
    actions = sp.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help in (("install", "render the unit, daemon-reload, enable --now"),
                         ("uninstall", "disable --now, remove the unit file, daemon-reload"),
                         ("status", "systemctl status of the workspace's unit")):
        ap = actions.add_parser(action, help=help, description=help)
        ap.add_argument("dir", nargs="?", default=".")
        ap.add_argument("--user", action="store_true",
                        help="a user unit (systemctl --user) instead of system-wide")
        ap.add_argument("--name", help="instance name (default: the workspace directory's name)")
        ap.add_argument("--dashboard", action="store_true",
                        help="the dashboard's unit (autoresearch-dashboard@NAME) instead of the daemon's")
        if action == "install":
            ap.add_argument("--gpu", type=int, metavar="N",
                            help="pin the service to GPU N (CUDA_VISIBLE_DEVICES)")
            ap.add_argument("--print", action="store_true", help="only print the unit; install nothing")
            ap.add_argument("--listen", metavar="HOST:PORT",
                            help="with --dashboard: where it listens (default 127.0.0.1:8765; beyond loopback "
                                 "a token is made and shown once)")
    return p


# The machine refusing (not a bug, not the user's typo): one line and Exit.SYSTEM, not a traceback.
_REFUSALS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse exits with Exit.USAGE (2) on a bad option
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"autoresearch: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except BrokenPipeError:  # `autoresearch history | head`
        return 0
    except OSError as exc:
        if exc.errno not in _REFUSALS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"autoresearch: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return int(Exit.SYSTEM)
    except KeyboardInterrupt:
        return int(Exit.INTERRUPTED)
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_READONLY"):
            print(f"autoresearch: error: cannot write the event log: {exc}", file=sys.stderr)
            return int(Exit.SYSTEM)
        raise


if __name__ == "__main__":
    sys.exit(main())
