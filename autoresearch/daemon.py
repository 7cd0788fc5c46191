"""The daemon: process lifecycle (lock, signals, sd_notify) and the research loop.

One thread does all the work (the "main loop"): it records transitions, runs
git, starts runs and judges them. Anything slow (a training run, an agent's
API call) happens in a child process or a worker thread that the main loop
*waits for* in short ticks, so between ticks it keeps serving signals, the
inbox, program.md changes and the systemd watchdog. If the main loop itself
hangs, the watchdog stops being pinged and systemd restarts us: that is the
point of pinging from here and from nowhere else.

Every transition is recorded in the event log before the side effect that
follows it (machine.py). After a crash, `_open` folds the log and `_boot`
reconciles git, refs and leftover processes with the folded state.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sqlite3
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import structlog

from . import __version__, config as config_mod, faults, progress, secrets
from .clock import parse_utc, utc_iso
from .alerts import Alerts
from .control import INBOX_NAME, WorkspaceLock
from .errors import ConfigError, CorruptLogError, Exit, UserError, WorkspaceError
from .eventlog import EventLog, verify_path
from .machine import LEGAL, Machines
from .notify import Notifier, WatchdogTimer
from .proposers.base import (HistoryRow, NoEdit, Proposal, ProposalContext, ProposerAuthError,
                             ProposerUnavailable)
from .proposers.prompt import change_summary
from .report import UNTRUSTED, fmt_duration, status_line
from . import sandbox
from .runner import Run, RunResult, kill_tagged, scrubbed_env
from .state import State, apply
from .workspace import HUMAN_FILES, STATE_DIR, Workspace, blob_sha

log = structlog.get_logger("autoresearch.daemon")
logging.getLogger("transitions").setLevel(logging.WARNING)  # our own events say it all

EVENTS_NAME = "events.sqlite"
TICK_S = 0.25  # longest sleep of the main loop between services
STATUS_REFRESH_S = 5.0  # STATUS= while a run is in flight: its elapsed time, this often
BACKOFF_S = (5, 15, 30, 60, 120, 300, 600)  # blocked: wait before retrying
DISK_FULL_RETRY_S = (0.5, 30.0)  # first and longest wait between appends while the disk is full
RUN_SLOT = 0  # one run at a time today; its checkout is .autoresearch/slots/0
# A figure the run printed may differ from the trusted evaluation's by float noise only (the
# same computation, another process); beyond this relative gap the run reported something else.
TRUST_TOLERANCE = 1e-3
PROGRAM_SETTLE_S = 0.2  # an editor's save may take several writes; record the settled text once


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_proposer(cfg: config_mod.Config, kind: str | None = None):
    kind = kind or cfg.proposer.kind
    if kind == "offline":
        from .proposers.offline import OfflineProposer
        return OfflineProposer(seed=cfg.proposer.seed)
    if kind == "anthropic":
        from .proposers.anthropic import AnthropicProposer
        return AnthropicProposer(cfg.anthropic)
    from .proposers.command import CommandProposer
    return CommandProposer(cfg.command)


def _harness_dir(cfg: config_mod.Config) -> Path | None:
    if not cfg.workload.profile:
        return None  # not the built-in workload
    from .trainer import harness_dir
    return harness_dir()


def _disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL, or ENOSPC/EDQUOT from the OS: space may come back, so waiting helps."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _failure(result: RunResult, need_metric: bool = True) -> str:
    """Why a finished run counts as crashed, or '' when it produced a usable metric (or, with
    need_metric False, ended well: its metric then comes from the evaluation step)."""
    if result.timed_out or result.killed == "deadline":
        return f"hard deadline: killed after {result.duration_s:.0f}s"
    if result.killed:
        return f"killed ({result.killed})"
    if result.signal:
        return f"killed by signal {result.signal}"
    if result.exit_code != 0:
        return f"exit code {result.exit_code}"
    if not need_metric:
        return ""
    if result.metric is None:
        return "no metric in the output"
    if not math.isfinite(result.metric):
        return f"metric is {result.metric}"
    return ""


def _disagrees(printed: float | None, trusted: float) -> bool:
    return printed is not None and not abs(printed - trusted) <= TRUST_TOLERANCE * max(1.0, abs(trusted))


def _fail_line(tail: str) -> str:
    """The evaluator's own reason (its last FAIL: line), if it gave one."""
    lines = [ln for ln in tail.splitlines() if ln.startswith("FAIL: ")]
    return lines[-1][6:].strip() if lines else ""


def _place(root: Path, rel: str, data: bytes) -> None:
    """Write `data` at root/rel, replacing whatever a run left there (a symlink is replaced,
    never followed: the run's files are not to be trusted)."""
    path = root
    for part in Path(rel).parts[:-1]:
        path = path / part
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        path.mkdir(exist_ok=True)
    target = root / rel
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.write_bytes(data)


def _check_strict(cfg: config_mod.Config) -> None:
    """sandbox.mode = "strict" is a promise: no run without bubblewrap, so no start either."""
    if cfg.sandbox.mode == "strict":
        kind, why = sandbox.expected("strict")
        if kind != "bwrap":
            raise ConfigError(f"sandbox.mode = 'strict' but bubblewrap cannot run here: {why}")


def _program_problem(program: str, cwd: Path) -> str:
    """'' when a run could start `program` (its argv[0]) in `cwd` with the run's PATH, else why not."""
    if program in ("python", "python3"):
        return ""  # the daemon's own interpreter (Run.start)
    if "/" in program:
        path = cwd / program
        if not path.exists():
            return f"{program}: no such file"
        if not path.is_file() or not os.access(path, os.X_OK):
            return f"{program}: not an executable file"
        return ""
    search = scrubbed_env(os.environ)["PATH"]
    if shutil.which(program, path=os.pathsep.join(str(cwd / d) for d in search.split(os.pathsep) if d)):
        return ""
    return f"{program}: command not found (PATH={search})"


class Stop(Exception):
    """Unwinds the current step when a stop was requested."""



def _history_description(exp) -> str:
    """An experiment's line in the agent's history: its description, and why a rejected one was
    rejected (out of scope, a duplicate...), which the agent needs in order not to repeat it."""
    if exp.state == "rejected" and exp.description and exp.reason:
        return f"{exp.description} (rejected: {exp.reason})"
    return exp.description or exp.reason

class Daemon:
    def __init__(self, root: Path | str, *, max_experiments: int | None = None,
                 run_for: float | None = None, proposer_factory: Callable | None = None,
                 overrides: dict[str, Any] | None = None):
        self.root = Path(root).absolute()
        self.overrides = dict(overrides or {})  # config keys replaced for this invocation (run --proposer)
        self.session_max_experiments = max_experiments
        self.session_deadline = time.monotonic() + run_for if run_for else None
        self._make_proposer = proposer_factory or make_proposer
        self.notifier = Notifier(unset_environment=True)  # runs must not talk to systemd as us
        self.watchdog = WatchdogTimer(self.notifier)
        self.alerts = Alerts(lambda: self.cfg.notify, self.root)  # [notify] command: queued, never waited for
        self._wake = threading.Event()
        self._flags: set[str] = set()  # "stop", "reload", "program", "inbox": set by handlers
        self._stop_reason = ""
        self._stop_request: str | None = None
        self._skip_request: tuple[str, int] | None = None  # (request id, experiment n)
        self.error = ""  # the unexpected exception that ended run(), if one did
        self._run: Run | None = None
        self._run_started = 0.0
        self._status_sent = 0.0  # when STATUS= was last sent (monotonic)
        self._result: RunResult | None = None
        # (failure, trusted metric, log tail) of the run's evaluation
        self._evaluation: tuple[str, float | None, str] | None = None
        self._failures = 0  # consecutive blocks, for the backoff
        self._prepared = False  # prepare_command succeeded in this process: once per start
        self._session_experiments = 0  # experiments that reached an outcome in this invocation
        self._model_checked: str | None = None  # the anthropic model looked up in this start
        self._changes: dict[int, str] = {}  # experiment -> prompt.change_summary (cache)
        self._fingerprints: dict[tuple, tuple | None] = {}  # (commit, editable) -> blob ids (cache)
        self._observer = None
        self._old_handlers: dict = {}
        self.on_tick: Callable[[], None] | None = None  # called by the main loop on every service tick
        self.log: EventLog | None = None

    # ------------------------------------------------------------------ opening

    def open(self) -> None:
        """Everything that may refuse to start, before anything is touched: a refusal raises a
        UserError and leaves no trace (not even an empty .autoresearch/). `run` opens if needed."""
        if self.log is None:
            self._open()

    def _open(self) -> None:
        if not self.root.is_dir():
            raise WorkspaceError(f"{self.root}: no such directory")
        secrets.remember_environment()  # whatever a run prints of them is redacted
        self.cfg = self._load_config()
        _check_strict(self.cfg)
        self.ws = Workspace.open(self.root, self.cfg.run.editable)
        self.branch = self.ws.branch  # the workspace's branch: an agent that leaves it is put back
        created = not (self.root / STATE_DIR).exists()
        self.state_dir = self.ws.state_dir
        self.lock = WorkspaceLock(self.state_dir)
        self.lock.acquire()
        try:
            path = self.state_dir / EVENTS_NAME
            self.state = State()
            self._anchors = self.ws.anchors()
            anchors = [(seq, digest) for seq, digest, _ in self._anchors]
            if not path.exists() and anchors:
                raise CorruptLogError(f"{path} is missing, but git anchors {anchors[0][0]} events of it "
                                      "(refs/autoresearch/log); restore it, or `autoresearch repair` "
                                      "starts a new log that records the loss")
            if path.exists():
                # Verifying and replaying a long log takes a while: tell systemd we are alive.
                self.notifier.extend_timeout(120_000_000)
                report = verify_path(path, anchors)
                if not report.ok:
                    raise CorruptLogError(f"{path}: corrupt at {report}; see `autoresearch verify`")
                self.log = EventLog.open(path)
                self.state = self.log.state()
            # Reconcile before judging cleanliness: a kill inside git leaves its locks, a kill
            # inside a rollback a half-reset worktree; the log says the rollback was under way.
            self.ws.clear_stale_locks()
            if self._rollback_under_way():
                self._reset(self.state.best_commit or self.ws.best() or self.ws.head())
            self._check_profile()
            if self.state.branch and self.branch != self.state.branch and self._agent_leftovers_possible():
                # An agent CLI switched branches just before we died: the workspace's branch is
                # the one the log recorded; the agent's is rolled back like the rest of its edit.
                self.branch = self.state.branch
            self._check_workspace()
            self._preflight()
            if self.log is None:  # created only once every check passed: a refusal leaves nothing
                self.log = EventLog.open(path)
        except BaseException:
            if self.log is not None:
                self.log.close()
                self.log = None
            if created:  # we made the state directory: take it away again (we still hold the lock)
                self.lock.path.unlink(missing_ok=True)
                try:
                    self.state_dir.rmdir()
                except OSError:
                    pass  # something else was put there meanwhile: leave it
            self.lock.release()
            raise

    def _load_config(self) -> config_mod.Config:
        return config_mod.override(config_mod.load(self.root), self.overrides, "run's options")

    def _rollback_under_way(self) -> bool:
        """The last event ends an experiment that was not kept: its rollback (the side effect
        after it) may have been cut short."""
        if self.log is None or not self.state.seq:
            return False
        last = next(self.log.events(since=self.state.seq - 1), None)
        exp = self.state.experiments.get(last.experiment) if last is not None else None
        return exp is not None and exp.terminal and exp.state != "kept"

    def _check_profile(self) -> None:
        old, new = self.state.profile, self.cfg.workload.profile
        if old and new and old != new:
            raise ConfigError(f"workload.profile changed from {old!r} to {new!r}: results would not be "
                              "comparable; start a new workspace instead")

    def _agent_leftovers_possible(self) -> bool:
        """Whether uncommitted changes may be an agent CLI's (it edits the worktree itself):
        it was proposing when we died (interrupted or not), or its experiment ended without a
        commit (rejected) and that end is the last event: we died before rolling it back."""
        last = self.state.experiments.get(self.state.next_n() - 1)
        if last is None or last.proposer != "command" or last.commit:
            return False
        if not last.terminal:
            return True
        tail = list(self.log.events(since=self.state.seq - 1)) if self.log is not None else []
        return bool(tail) and tail[-1].aggregate == f"experiment:{last.n}"

    def _preflight(self) -> None:
        """What can be checked before any run, so that a typo costs no baseline run: the commands'
        programs exist, and the offline proposer has constants to tune."""
        run = self.cfg.run
        for key, argv in (("prepare_command", run.prepare_argv), ("command", run.argv)):
            if not argv:
                continue
            program = argv[0]
            problem = _program_problem(program, self.root)
            if not problem and key == "command" and "/" in program and not Path(program).is_absolute() \
                    and not self.ws.repo.git.ls_files("--", program):
                problem = f"{program}: not committed (a run sees only the files of its commit)"
            if problem:
                raise ConfigError(f"{config_mod.CONFIG_NAME}: run.{key}: {problem}; nothing was run")
        files = self.ws.read_files()  # the editable files are there (WorkspaceError if not)
        if self.cfg.proposer.kind == "offline" and self.state.current() is None:
            from .proposers.offline import find_constants
            if not any(find_constants(text, path) for path, text in files.items()):
                raise WorkspaceError(
                    f"the offline proposer has nothing to tune: {', '.join(files)} has no top-level "
                    "UPPERCASE numeric constant (like `LEARNING_RATE = 0.04`); add some, or set "
                    "proposer.kind to anthropic or command")

    def _check_workspace(self) -> None:
        cur = self.state.current()
        ours = set(HUMAN_FILES) | (set(self.cfg.run.editable) if cur is not None else set())
        foreign = [p for p in self.ws.changes().paths if p not in ours]
        if self._agent_leftovers_possible():
            foreign = []  # an agent CLI's edits, from before we died: judged or rolled back
        if foreign:
            raise WorkspaceError(f"{self.root}: uncommitted changes the daemon did not make: "
                                 f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}; "
                                 "commit or stash them first")
        best = self.state.best_commit or self.ws.best() or self.ws.head()
        head = self.ws.head()
        known = {e.commit for e in self.state.experiments.values() if e.commit}
        known |= set(self.ws.all_exp_refs().values())  # ours, even where the log lost its events
        if cur is not None:  # committed by us just before a crash, not yet in the log
            known.add(self.ws.exp_ref(cur.n))
            if cur.files is not None and self.state.best_commit and head != self.state.best_commit \
                    and self.ws.commit_matches(head, cur.files, parent=self.state.best_commit):
                known.add(head)  # killed between `git commit` and setting its ref
        if self.state.adopted:
            known.add(self.state.adopted)  # adopted before a restart, its baseline not measured yet
        self._adopt_head, self._adopt_remeasure = None, False
        if head != best and head not in known and self._agent_leftovers_possible():
            known.add(head)  # an agent CLI's own commit, from before we died: kept aside, rolled back
        if head != best and head not in known:
            # A person's own commit, made while no daemon ran: theirs, so it is adopted (never
            # refused, never reset away). Unless it changes only the human's files, the recorded
            # metric no longer describes the code: the baseline is measured again on it first.
            self._adopt_head = head
            self._adopt_remeasure = any(p not in HUMAN_FILES for p in self.ws.changed_paths(best, head))

    # ------------------------------------------------------------------ recording

    def _record(self, aggregate: str, trigger: str, source: str, dest: str, payload: dict) -> None:
        faults.point(f"pre:{trigger}")
        # No secret is ever stored (a run's log tail, an agent's description or error ...);
        # a proposal's files are the commit itself and must stay byte for byte.
        payload = {k: v if k == "files" else secrets.redact_obj(v) for k, v in payload.items()}
        event = self._append(aggregate, trigger, source, dest, payload)
        apply(self.state, event)
        self.alerts.observe(event, self.state)
        structlog.contextvars.bind_contextvars(experiment=event.experiment, state=dest, trigger=trigger)
        small = {k: v for k, v in payload.items()
                 if k in ("commit", "metric", "reason", "description", "kind", "request", "retry_at",
                          "exit_code", "cost_usd", "outcome", "error", "lifecycle") and v not in (None, "")}
        log.info(f"{aggregate} {trigger}: {source} -> {dest}", seq=event.seq, **small)
        self._send_status()
        faults.point(f"post:{trigger}")

    def _append(self, aggregate: str, trigger: str, source: str, dest: str, payload: dict):
        """Append one event; while the disk is full, wait and retry the very same append.

        Retrying is safe: a failed append left no row (one transaction per event) and the side
        effect that follows it has not happened. Meanwhile we serve nothing but the watchdog:
        nothing else can be recorded, so nothing else may be done.
        """
        delay, waiting_since = DISK_FULL_RETRY_S[0], None
        while True:
            try:
                event = self.log.append(aggregate, trigger, source, dest, payload)
            except (sqlite3.OperationalError, OSError) as exc:
                if not _disk_full(exc):
                    raise
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    log.error("disk full: cannot record the next event; waiting for space",
                              trigger=trigger, path=str(self.log.path), error=str(exc))
                    self.notifier.status(f"blocked: disk full ({self.log.path.parent}); "
                                         f"retrying {aggregate} {trigger}")
                end = time.monotonic() + delay
                while time.monotonic() < end:
                    self.watchdog.tick()
                    time.sleep(min(TICK_S, max(0.0, end - time.monotonic())))
                delay = min(delay * 2, DISK_FULL_RETRY_S[1])
                continue
            if waiting_since is not None:
                log.info("disk space is back; event recorded", trigger=trigger,
                         waited_s=round(time.monotonic() - waiting_since, 1))
            return event

    def _send_status(self) -> None:
        self.notifier.status(self._status())
        self._status_sent = time.monotonic()

    def _status(self) -> str:
        elapsed = time.monotonic() - self._run_started if self._run is not None else None
        shown = str(progress.read(self._run.log_path)) if self._run is not None else ""
        return status_line(self.state, elapsed, self.cfg.run.budget_seconds, shown)

    def live_line(self) -> str | None:
        """The run in flight (the experiment's, or prepare_command's), for a person watching the
        terminal: elapsed/budget and what the run's own output says; None when nothing runs."""
        run = self._run
        if run is None:
            return None
        cur = self.state.current()
        if cur is not None and cur.state == "training":
            return self._status()
        last = progress.last_lines(progress.tail(run.log_path, 4096), count=1, width=100)
        return f"{self.machines.daemon.state} {fmt_duration(time.monotonic() - self._run_started)}" + (
            f" · {last}" if last else "")

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        self.open()
        kind, why = sandbox.expected(self.cfg.sandbox.mode)
        if kind != "bwrap":
            log.warning("runs will not be fully contained", sandbox=kind, why=why)
        self.machines = Machines(self._record, self.state.daemon)
        try:
            self._install_signals()
            self._start_observer()
            self._boot()
            self.notifier.ready(self._status())
            self._loop()
            self._settle_skip()
            return 0
        except UserError:
            raise  # the user's to fix: one line and its own exit code (cli.main)
        except Exception as exc:  # a bug or an unforeseen condition, not a user's mistake
            self._failed(exc)
            return Exit.FAILED  # not in RestartPreventExitStatus: systemd restarts us
        finally:
            self._shutdown()

    def _failed(self, exc: Exception) -> None:
        """Say where we were, in daemon.log / the journal and in the event log, then let run()
        exit non-zero: systemd's Restart=on-failure starts us again and _boot reconciles."""
        cur = self.state.current()
        daemon_state = self.machines.daemon.state
        where = {"experiment": cur.n if cur else None, "state": cur.state if cur else daemon_state,
                 "daemon": daemon_state}
        self.error = f"{type(exc).__name__}: {exc}"
        log.error("daemon failed unexpectedly; exiting", error=self.error, exc_info=exc, **where)
        try:
            self.machines.daemon.fire("note", kind="failure", error=self.error, **where)
        except Exception as again:  # the log itself may be what failed: daemon.log has it all
            log.error("could not record the failure in the event log", error=f"{type(again).__name__}: {again}")

    def _install_signals(self) -> None:
        def on_stop(signum, frame):
            self._flags.add("stop")
            self._stop_reason = self._stop_reason or f"signal {signal.Signals(signum).name}"
            self._wake.set()

        def on_hup(signum, frame):
            self._flags.add("reload")
            self._wake.set()

        for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup)):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _start_observer(self) -> None:
        """File events wake the main loop: inbox requests and program.md edits (no busy poll)."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        daemon, root = self, str(self.root)
        inbox = self.state_dir / INBOX_NAME
        inbox.mkdir(exist_ok=True)

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.event_type in ("opened", "closed_no_write"):
                    return  # a read, not a change: our own reads of program.md would wake us forever
                for path in (event.src_path, getattr(event, "dest_path", "") or ""):
                    path = os.fsdecode(path)
                    folder, name = os.path.split(path)
                    if folder == root and name == "program.md":
                        daemon._flags.add("program")
                        daemon._wake.set()
                    elif folder == str(inbox) and name.endswith(".json"):
                        daemon._flags.add("inbox")
                        daemon._wake.set()

        self._observer = Observer()
        self._observer.schedule(Handler(), root, recursive=False)
        self._observer.schedule(Handler(), str(inbox), recursive=False)
        self._observer.daemon = True
        self._observer.start()
        self._flags.add("inbox")  # requests written while we were down

    def _shutdown(self) -> None:
        try:
            if self._run is not None:
                self._run.kill("stop")
        finally:
            if self._observer is not None:
                self._observer.stop()
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self.notifier.stopping(self._status())
            self.alerts.close()  # a short while for "stopped" to go out
            try:
                self._checkpoint()
            finally:
                self.log.close()
                self.lock.release()

    def _boot(self) -> None:
        st = self.state
        program_path = self.root / "program.md"
        program = program_path.read_bytes() if program_path.exists() else b""
        self._program_text = program.decode("utf-8", errors="replace")
        self.machines.daemon.fire(
            "boot", pid=os.getpid(), version=__version__, profile=self.cfg.workload.profile or st.profile,
            program_hash=st.program_hash or _sha256(program),
            config_hash=_sha256((self.root / config_mod.CONFIG_NAME).read_bytes()), branch=self.branch,
            **({"program_missing": True} if not program_path.exists() else {}),
            **({"overrides": self.overrides} if self.overrides else {}))
        if self.overrides:
            log.warning("config overridden for this run (autoresearch.toml unchanged)", overrides=self.overrides)
        if not program_path.exists():
            log.warning("program.md is missing (deleted or never committed): an agent gets no instructions "
                        "from you; restore it with `git checkout <commit> -- program.md` or write a new one")
        # Reconcile the world with the folded state.
        self.ws.clear_stale_locks()
        kill_tagged(self._run_tag())
        mine = self._adopt_head
        if mine:
            # A person's commit (see _check_workspace), recorded as such. With `remeasure`, best
            # moves to it only once its baseline is kept; until then it is `state.adopted`.
            self.machines.daemon.fire("note", kind="adopted_user_commit", commit=mine,
                                      previous=st.best_commit or self.ws.best(), remeasure=self._adopt_remeasure)
            log.warning(f"your commit {mine[:7]} is adopted: "
                        + ("the baseline is measured on it, then the loop goes on from it"
                           if self._adopt_remeasure else "it changes only your files; the loop goes on from it"))
        best = st.best_commit or self.ws.best() or self.ws.head()
        if self.ws.best() != best:
            self.ws.set_best(best)
        self._reconcile_numbers()
        cur = st.current()
        # An evaluation in flight is simply run again (from the run's saved outputs), not the run.
        if cur is not None and cur.state not in ("interrupted", "evaluating"):
            self.machines.experiment(cur.n, cur.state).fire(
                "interrupt", reason="daemon restarted while the experiment was in flight", graceful=False)
        if cur is not None and mine:
            # It was made on the old code, which the person's commit replaced.
            self.machines.experiment(cur.n, "interrupted").fire(
                "reject", reason=f"superseded by your commit {mine[:7]} (made while the daemon was stopped)")
            self.machines.forget(cur.n)
            cur = None
        base = st.adopted or best  # what the loop goes on from
        if cur is None and (self.ws.head() != base or self.ws.changes().paths):
            self._reset(base)
        if st.paused:
            # Paused before this restart or reboot: stay paused. Recorded here, before the
            # inbox is read, so that a `resume` queued while the daemon was down applies.
            self.machines.daemon.fire("pause", request="", restored=True)
            log.warning("paused before this start; waiting for `autoresearch resume`",
                        workspace=str(self.root))
        new_hash = _sha256(program)
        if st.program_hash and new_hash != st.program_hash:
            self.machines.daemon.fire("note", kind="program_changed", old_hash=st.program_hash,
                                      new_hash=new_hash, added=0, removed=0, while_stopped=True)

    def _reconcile_numbers(self) -> None:
        """Git holds evidence of every experiment: the log and git are checked against each other.

        A missing ref of a logged experiment is created; an existing ref is never moved; a ref
        (or an anchor) the log does not know is reported by name, kept, and its number taken:
        the next experiment is numbered above everything either knows.
        """
        st, refs = self.state, self.ws.all_exp_refs()
        for exp in st.experiments.values():
            if not exp.commit or exp.kind != "experiment":
                continue
            ref = refs.get(exp.n)
            if ref is None:
                self.ws.set_exp_ref(exp.n, exp.commit)
            elif ref != exp.commit:
                log.warning("experiment ref differs from the log; kept as it is", experiment=exp.n,
                            ref=f"refs/autoresearch/exp/{exp.n}", ref_commit=ref, logged_commit=exp.commit)
        unknown = [n for n in refs if n not in st.experiments]
        anchored = max((n for _, _, n in self._anchors if n is not None), default=-1)
        floor = max(max(refs, default=-1), anchored) + 1
        if unknown:
            log.warning("experiment refs the log does not know (kept; their numbers are not reused)",
                        refs=[f"refs/autoresearch/exp/{n}" for n in unknown])
        if floor > st.next_n():
            self.machines.daemon.fire("note", kind="numbering", next_n=floor,
                                      unknown_refs=[f"refs/autoresearch/exp/{n}" for n in unknown],
                                      anchored_experiment=anchored if anchored >= 0 else None)

    def _checkpoint(self) -> None:
        """Make the main database file hold everything, then anchor the log's head in git."""
        if self.log is None or not self.state.seq:
            return
        # Neither is needed for the log to be true (the WAL holds every event until a checkpoint
        # succeeds; an older anchor is still right): a full disk here is logged, never fatal.
        try:
            self.log.checkpoint()
            if not self.lock.path.exists():
                self.lock.write_pid()  # someone deleted it: readers still want the PID
            self.ws.anchor(self.state.seq, self.state.hash, max(self.state.experiments, default=None))
        except (sqlite3.Error, OSError, WorkspaceError) as exc:
            log.error("could not checkpoint the log or anchor it in git; the next outcome retries",
                      seq=self.state.seq, error=str(exc))

    def _run_tag(self) -> str:
        return _sha256(str(self.root).encode())[:16]

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        d = self.machines.daemon
        try:
            while True:
                self._service()
                state = d.state
                if state == "starting":
                    d.fire("prepare")
                elif state == "preparing":
                    if self._check_model():
                        self._prepare()
                elif state == "baseline":
                    self._baseline_step()
                elif state == "running":
                    if self.state.current() is None and self._limits_reached():
                        return
                    self._experiment_step()
                elif state == "paused":
                    cur = self.state.current()
                    if cur is not None and (cur.state in ("committed", "training", "evaluating", "judging")
                                            or self._skip_request is not None):
                        self._experiment_step()  # pause lets the current run finish
                    elif self._session_over():
                        raise Stop()
                    else:
                        self._wait(lambda: d.state != "paused" or self._skip_request is not None
                                   or self._session_over())
                elif state == "blocked":
                    # Ends at retry_at, or earlier on `resume` (_handle_request); a skip does not end it.
                    retry_at = parse_utc(self.state.retry_at) if self.state.retry_at else time.time()
                    waited = self._wait(lambda: d.state != "blocked" or time.time() >= retry_at
                                        or self._session_over())
                    if waited == "skip":
                        self._settle_skip()
                    elif d.state == "blocked":
                        if self._session_over():
                            raise Stop()
                        d.fire("unblock")
                elif state == "exhausted":
                    log.info("caps reached; exiting", reason=self.state.reason)
                    return
                else:  # stopped
                    return
        except Stop:
            self._stop_now()

    def _stop_now(self) -> None:
        self._settle_skip()  # a skip asked before the stop is honoured, not turned into a re-run
        if self._run is not None:
            self._run.kill("stop")
            self._wait_run_gone()
        cur = self.state.current()
        if cur is not None and cur.state not in ("interrupted", "evaluating"):  # evaluating: resumes
            # graceful: a person's stop (or --for) is no crash; it never counts toward max_interrupts
            self.machines.experiment(cur.n, cur.state).fire(
                "interrupt", reason=f"daemon stopping ({self._stop_reason or 'stop requested'})", graceful=True)
        payload = {"reason": self._stop_reason or "stop requested"}
        if self._stop_request:
            payload["request"] = self._stop_request
        self.machines.daemon.fire("stop", **payload)

    def _wait_run_gone(self) -> None:
        end = time.monotonic() + 10
        while self._run is not None and self._run.poll() is None and time.monotonic() < end:
            self.watchdog.tick()
            time.sleep(0.05)
        self._run = None

    def _limits_reached(self) -> bool:
        """Config caps -> exhausted; this invocation's limits (--max-experiments, --for) -> stopped."""
        lim, st, d = self.cfg.limits, self.state, self.machines.daemon
        done = sum(1 for e in st.experiments.values() if e.kind == "experiment" and e.terminal)
        reason = ""
        if lim.max_experiments and done >= lim.max_experiments:
            reason = f"max_experiments {lim.max_experiments} reached"
        elif lim.max_cost_usd and st.cost_usd >= lim.max_cost_usd:
            reason = f"max_cost_usd {lim.max_cost_usd:g} reached (spent ${st.cost_usd:.2f})"
        elif lim.max_hours and st.first_time and time.time() - parse_utc(st.first_time) >= lim.max_hours * 3600:
            reason = f"max_hours {lim.max_hours:g} reached"
        if reason:
            d.fire("exhaust", reason=reason)
            return True
        if self._session_over():
            d.fire("stop", reason=self._stop_reason)
            return True
        return False

    def _session_over(self) -> bool:
        """This invocation's own limits (--max-experiments, --for); sets the stop reason."""
        if self.session_max_experiments is not None and self._session_experiments >= self.session_max_experiments:
            self._stop_reason = f"--max-experiments {self.session_max_experiments} done"
        elif self.session_deadline is not None and time.monotonic() >= self.session_deadline:
            self._stop_reason = "--for duration elapsed"
        else:
            return False
        return True

    # ------------------------------------------------------------------ servicing

    def _service(self) -> None:
        """Signals, inbox, program.md, config reload, watchdog. Called every tick."""
        self.watchdog.tick()
        if self.on_tick is not None:
            self.on_tick()  # e.g. the live line on a terminal (cli.py)
        if self._run is not None and time.monotonic() - self._status_sent >= STATUS_REFRESH_S:
            self._send_status()  # the run's clock in `systemctl status` moves on
        flags, self._flags = self._flags, set()
        if "reload" in flags:
            self._reload_config()
        if "program" in flags:
            self._program_changed()
        if "inbox" in flags:
            self._read_inbox()
        if "stop" in flags or self._stop_request:
            self._flags.add("stop")  # sticky until we are out
            raise Stop()

    def _wait(self, done: Callable[[], bool], timeout: float | None = None, *, skippable: bool = True) -> str:
        """Wait for `done()` while serving; "done" | "timeout" | "skip" (only if `skippable`:
        a skip request is pending). Raises Stop."""
        end = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while True:
            self._service()
            if done():
                return "done"
            if skippable and self._skip_request is not None:
                return "skip"
            if end is not None and time.monotonic() >= end:
                return "timeout"
            due = self.watchdog.seconds_until_due()
            # Poll fast at first (an instant run should not cost a whole tick), then relax.
            sleep = min(delay, TICK_S, due if due is not None else TICK_S)
            delay = min(delay * 2, TICK_S)
            if self._wake.wait(sleep):
                self._wake.clear()

    def _read_inbox(self) -> None:
        """Every request in the inbox, oldest first, gets exactly one answer in the log."""
        for path in sorted((self.state_dir / INBOX_NAME).glob("*.json")):
            try:
                request = json.loads(path.read_text())
                str(request["id"]), str(request["action"])
            except (OSError, ValueError, KeyError, TypeError):
                # Not a request of ours (they are written tmp + rename): nobody waits for an answer.
                log.warning("unreadable file in the inbox; removed", path=str(path))
                path.unlink(missing_ok=True)
                continue
            self._handle_request(request)
            path.unlink(missing_ok=True)

    def _handle_request(self, request: dict) -> None:
        """Apply a request, or record why not: the answer the CLI waits for."""
        d = self.machines.daemon
        rid, action = str(request["id"]), str(request["action"])
        ignored = ""
        if action in ("pause", "resume"):
            # `resume` while blocked retries now instead of at the end of the backoff.
            trigger = "unblock" if action == "resume" and d.state == "blocked" else action
            # The transition table says from which states; a request from any other is answered.
            if (trigger, d.state) in LEGAL["daemon"]:
                d.fire(trigger, request=rid)
                if d.state == "preparing" and self._prepared:
                    self._prepared_go_on()  # now, not after the run in flight: status says so
            else:
                ignored = f"daemon is {d.state}, not {'pausable' if action == 'pause' else 'paused or blocked'}"
        elif action == "stop":
            if self._stop_request:
                ignored = f"already stopping (request {self._stop_request})"
            else:
                self._stop_request, self._stop_reason = rid, "stop requested"
        elif action == "skip":
            ignored = self._accept_skip(rid, request.get("experiment"))
        else:
            ignored = f"unknown request {action!r}"
        if ignored:
            d.fire("note", kind="request", request=rid, action=action, outcome="ignored: " + ignored)

    def _accept_skip(self, rid: str, target: int | None) -> str:
        """Take a skip request for the experiment in flight; '' or why it does not apply."""
        cur = self.state.current()
        if target is not None and (cur is None or cur.n != target):
            return f"experiment {target} already ended"  # the CLI names the experiment it saw in flight
        if cur is None:
            return "no experiment in flight"
        if cur.kind == "baseline":
            return "the baseline cannot be skipped: every experiment is judged against it"
        if ("skip", cur.state) not in LEGAL["experiment"]:
            return f"experiment {cur.n} is {cur.state}"
        if self._skip_request is not None:
            return f"experiment {cur.n} is already being skipped (request {self._skip_request[0]})"
        if self._stop_request:
            return f"the daemon is stopping (request {self._stop_request})"
        self._skip_request = (rid, cur.n)
        if self._run is not None:
            self._run.kill("skip")
        return ""

    def _reload_config(self) -> None:
        """SIGHUP: the human's autoresearch.toml (never a run's copy of it) becomes the config.

        Under bubblewrap a run can neither write that file nor signal us. Without it (the
        fallback, mode off) it could do both, so while such a run is in flight a reload that
        weakens the sandbox is refused: send it again once the run has ended. Every reload
        records what changed and who owns the file that changed it.
        """
        self.notifier.reloading()
        path = self.root / config_mod.CONFIG_NAME
        run = self._run
        who = {"file": str(path), "run_in_flight": run is not None,
               "run_sandbox": run.sandbox.get("kind") if run is not None else None}
        try:
            who["file_uid"] = path.stat().st_uid
            cfg = self._load_config()  # this invocation's overrides still apply
            if cfg.workload.profile != self.cfg.workload.profile:
                raise ConfigError("workload.profile cannot change while the workspace has results")
            _check_strict(cfg)
            weaker = sandbox.weakening(self.cfg.sandbox, cfg.sandbox)
            if weaker and run is not None and who["run_sandbox"] != "bwrap":
                raise ConfigError(f"it weakens the sandbox ({'; '.join(weaker)}) while a run that could "
                                  f"have written {path.name} ({who['run_sandbox']}) is in flight; "
                                  "send the reload again once the run has ended")
        except (ConfigError, OSError) as exc:
            log.error("config reload rejected; keeping the old config", error=str(exc))
            self.machines.daemon.fire("note", kind="config_rejected", error=str(exc), **who)
            self.notifier.ready(self._status())
            return
        changed = config_mod.differences(self.cfg, cfg)
        self.cfg = cfg
        self.ws.editable = cfg.run.editable
        self.machines.daemon.fire("note", kind="config_reloaded", config_hash=_sha256(path.read_bytes()),
                                  changed=changed, **who)
        self.notifier.ready(self._status())

    def _program_changed(self) -> None:
        path = self.root / "program.md"
        try:
            if time.time() - path.stat().st_mtime < PROGRAM_SETTLE_S:
                self._flags.add("program")  # still being written: look again next tick
                return
            data = path.read_bytes()
        except FileNotFoundError:
            return
        new_hash = _sha256(data)
        if new_hash == self.state.program_hash:
            return
        text = data.decode("utf-8", errors="replace")
        added = removed = 0
        for line in difflib.unified_diff(self._program_text.splitlines(), text.splitlines(), lineterm="", n=0):
            if line.startswith("+") and not line.startswith("+++"):
                added += 1
            elif line.startswith("-") and not line.startswith("---"):
                removed += 1
        self._program_text = text
        self.machines.daemon.fire("note", kind="program_changed", old_hash=self.state.program_hash,
                                  new_hash=new_hash, added=added, removed=removed)

    # ------------------------------------------------------------------ preparing

    def _prepare(self) -> None:
        d = self.machines.daemon
        argv = self.cfg.run.prepare_argv
        if argv and not self._prepared:  # once per start; again only after it failed or was cut short
            self.notifier.extend_timeout(int((self.cfg.run.hard_deadline + 30) * 1e6))
            run = Run.start(argv, self.root, self.state_dir / "prepare.log", self.cfg.run.hard_deadline,
                            self.cfg.run.log_max_bytes, config_mod.SandboxConfig(mode="off"), None,  # it may download
                            self.cfg.run.metric_regex, None, env=self._run_env())
            self._run, self._run_started = run, time.monotonic()
            try:
                self._wait(lambda: run.poll() is not None, skippable=False)
            finally:
                if run.poll() is None:
                    run.kill("stop")
                self._run = None
            result = run.poll()
            self._prepared = result.exit_code == 0
            if d.state != "preparing":  # paused meanwhile: go on (or prepare again) on resume
                return
            if not self._prepared:
                lines = result.log_tail.strip().splitlines()
                self._block(f"prepare failed: {lines[-1] if lines else 'exit ' + str(result.exit_code)}")
                return
        self._prepared = True
        self._prepared_go_on()

    def _prepared_go_on(self) -> None:
        """preparing -> the baseline, or back to the loop once there is one."""
        self.machines.daemon.fire("resume_loop" if self.state.baseline_done else "begin_baseline")

    def _block(self, reason: str, retry_after: float | None = None) -> None:
        delay = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._failures += 1
        self.machines.daemon.fire("block", reason=reason, retry_at=utc_iso(time.time() + delay))

    def _run_env(self) -> dict[str, str]:
        env = {**os.environ, "AUTORESEARCH_RUN_TAG": self._run_tag()}
        if self.cfg.workload.profile:  # the data cache by its absolute path (a run's $HOME is its own)
            from .trainer.settings import cache_dir
            env["AUTORESEARCH_CACHE_DIR"] = str(cache_dir().absolute())
        return env

    # ------------------------------------------------------------------ experiments

    def _baseline_step(self) -> None:
        if self.state.current() is not None:
            self._experiment_step()
            return
        # A person's adopted commit (also the one made before the first run), else the best.
        target = self.state.adopted or self.ws.best() or self.ws.head()
        if self.ws.head() != target:
            self._reset(target)
        files = self.ws.read_files()
        parent = self.state.best_commit if self.state.best_commit != target else None
        self.machines.experiment(self.state.next_n()).fire(
            "adopt", commit=target, parent=parent, files=files, description="baseline",
            hashes={p: self.ws.file_hash(p) for p in files})

    def _experiment_step(self) -> None:
        """Advance the experiment in flight (or start one) by one transition."""
        cur = self.state.current()
        if cur is None:
            self.machines.experiment(self.state.next_n()).fire(
                "start", kind="experiment", proposer=self.cfg.proposer.kind)
            return
        model = self.machines.experiment(cur.n, cur.state)
        if self._skip_request is not None:
            self._skip(cur, model)
            return
        step = {
            "proposing": self._propose,
            "committed": self._launch,
            "training": self._train,
            "evaluating": self._evaluate,
            "judging": self._judge,
            "interrupted": self._resume_interrupted,
        }[cur.state]
        step(cur, model)
        if self.state.experiments[cur.n].terminal:
            self._finished(cur.n)

    def _finished(self, n: int) -> None:
        self.machines.forget(n)
        self._result = self._evaluation = None
        exp = self.state.experiments[n]
        self._checkpoint()  # the outcome is in the main file and anchored before its side effect
        if exp.kind == "experiment":
            self._session_experiments += 1  # --max-experiments counts outcomes, re-runs included
        if exp.kind == "experiment" or exp.state == "kept":
            self._failures = 0  # the loop made progress: a later block starts the backoff afresh
        if exp.state == "kept":
            if self.ws.best() != exp.commit:
                self.ws.set_best(exp.commit)
        else:
            self._reset(self.state.adopted or self.state.best_commit or self.ws.best())
        if exp.kind == "baseline":
            d = self.machines.daemon
            if exp.state == "kept":
                sigma = statistics.stdev(exp.metrics) if len(exp.metrics) > 1 else None
                threshold = max(self.cfg.judge.min_delta, 2 * sigma if sigma else 0.0)
                d.fire("baseline_done", n=exp.n, commit=exp.commit, metric=exp.metric, sigma=sigma,
                       threshold=threshold)
            elif d.state == "baseline":
                self._block(f"baseline run failed: {exp.reason}")

    def _baseline_failed(self, cur, model, failure: str, log_tail: str) -> None:
        """Nothing is measured until the baseline runs: block, then run this same experiment again
        (not a new number per attempt). The reason carries the run's last lines: they say why."""
        tail = progress.last_lines(log_tail)
        model.fire("fail", reason=f"{failure}: {tail}" if tail else failure, runs=cur.runs)
        self._reset(cur.commit)  # whatever the run left in the worktree
        self._session_experiments += 1  # an outcome in this invocation (--max-experiments)
        exp = self.state.experiments[cur.n]
        if self.machines.daemon.state == "baseline":
            self._block(f"baseline run failed ({exp.failed_runs}x): {exp.failure}")

    def _skip(self, cur, model) -> None:
        (rid, n), self._skip_request = self._skip_request, None
        if self._run is not None:
            self._run.kill("skip")
            self._wait_run_gone()
        if cur is None or cur.n != n or ("skip", cur.state) not in LEGAL["experiment"]:
            self.machines.daemon.fire("note", kind="request", request=rid, action="skip",
                                      outcome=f"ignored: experiment {n} already ended")
            return
        model.fire("skip", reason="skipped by user", request=rid)
        self._finished(cur.n)

    def _settle_skip(self) -> None:
        """Apply a pending skip now (blocked, stopping, exiting): it must not go unanswered."""
        if self._skip_request is not None:
            cur = self.state.current()
            self._skip(cur, self.machines.experiment(cur.n, cur.state) if cur is not None else None)

    def _resume_interrupted(self, cur, model) -> None:
        if cur.interrupts > self.cfg.limits.max_interrupts:
            model.fire("give_up", reason=f"interrupted {cur.interrupts} times")
        elif cur.commit:
            model.fire("retry", attempt=cur.runs + 1)
        elif self._commit_lost(cur):
            # Its commit exists but the log lost the events after its start (repair): a new
            # proposal must not take its number, and the ref is never moved.
            model.fire("give_up", reason=f"its events after the start were lost; its commit is kept at "
                                         f"refs/autoresearch/exp/{cur.n}")
        else:
            model.fire("repropose")

    def _commit_lost(self, cur) -> bool:
        """Git holds experiment `cur`'s commit although the log records no commit, and the log
        has no proposal that commit is known to be (then `_commit` would reuse it)."""
        ref = self.ws.exp_ref(cur.n)
        if ref is None:
            return False
        return cur.files is None or not self.ws.commit_matches(ref, cur.files, parent=self.state.best_commit)

    # -- proposing

    def _context(self, n: int) -> ProposalContext:
        st = self.state
        rows = [HistoryRow(e.n, "baseline" if e.kind == "baseline" else e.state, e.metric,
                           _history_description(e), e.commit, e.files, self._change(e))
                for e in sorted(st.experiments.values(), key=lambda e: e.n) if e.terminal]
        failure = st.experiments.get(st.last_failure_n) if st.last_failure_n is not None else None
        kind = self.cfg.proposer.kind
        deadline_s = {"anthropic": self.cfg.anthropic.deadline_seconds,
                      "command": self.cfg.command.deadline_seconds}.get(kind, 60.0)
        return ProposalContext(
            workspace=self.root, n=n, program=self._program_text, editable=self.cfg.run.editable,
            files=self.ws.read_files(), history=tuple(rows), best_metric=st.best_metric,
            direction=self.cfg.run.direction, last_failure=failure.log_tail if failure else None,
            harness_dir=_harness_dir(self.cfg), deadline=time.monotonic() + deadline_s)

    def _change(self, exp) -> str:
        """What a finished experiment changed against its parent, for the prompt's history
        (cached: a finished experiment's change never changes; '' when unknown)."""
        if exp.n not in self._changes:
            text = ""
            if exp.kind == "experiment" and exp.commit and exp.parent:
                try:
                    text = change_summary(self.ws.files_at(exp.parent), self.ws.files_at(exp.commit))
                except Exception:  # noqa: BLE001 - a commit git no longer has: the change is unknown
                    text = ""
            self._changes[exp.n] = text
        return self._changes[exp.n]

    def _duplicate_of(self, files: dict[str, str], n: int) -> int | None:
        """The earlier experiment that already ran exactly these editable files, if any.

        Compared by git blob id, so no old content is read. Only experiments that ran to an
        outcome count (kept, discarded with a metric, crashed): a skipped or rejected one never
        measured anything."""
        editable = tuple(self.cfg.run.editable)
        wanted = tuple(blob_sha(files[p]) if p in files else None for p in editable)
        for e in sorted(self.state.experiments.values(), key=lambda e: e.n):
            ran = e.state == "crashed" or (e.state in ("kept", "discarded") and e.metric is not None)
            if e.n == n or not e.commit or not ran:
                continue
            key = (e.commit, editable)
            if key not in self._fingerprints:
                try:
                    self._fingerprints[key] = self.ws.blob_ids(e.commit, editable)
                except Exception:  # noqa: BLE001 - a commit git no longer has: nothing to compare
                    self._fingerprints[key] = None
            if self._fingerprints[key] == wanted:
                return e.n
        return None

    def _propose(self, cur, model) -> None:
        best = self.state.best_commit
        if cur.files is not None:  # recorded before a crash: re-apply it, never ask again
            self._commit(cur, model, best)
            return
        head = self.ws.head()
        if head != best:
            # Only an agent CLI's own commit, left by a crash while it ran, puts HEAD elsewhere
            # here (ours are recorded first): kept reachable, like a rejected one, then rolled back.
            self.ws.set_rejected_ref(cur.n, head)
        if head != best or self.ws.branch != self.branch \
                or [p for p in self.ws.changes().paths if p not in HUMAN_FILES]:
            self._reset(best)
        if not self._check_model():  # the config now names another model, and it is retired
            return
        human = {p: (self.root / p).read_bytes() for p in HUMAN_FILES if (self.root / p).exists()}
        ctx = self._context(cur.n)
        proposer = self._make_proposer(self.cfg)
        outcome = self._in_thread(lambda: proposer.propose(ctx), ctx)
        if outcome is None:  # skipped: handled on the next step
            return
        proposal, error = outcome
        if isinstance(error, NoEdit):
            self._spend(model, error)
            if self.cfg.proposer.fallback == "reject" or proposer.name == "offline":
                model.fire("reject", reason=f"no edit: {error.reason}")
                if proposer.name == "offline":
                    self._search_exhausted(error)
                return
            self._reset(best)  # whatever the agent left behind
            try:
                proposal = self._make_proposer(self.cfg, "offline").propose(ctx)
            except NoEdit as fallback_error:
                model.fire("reject", reason=f"no edit: {error.reason}; offline fallback: {fallback_error.reason}")
                return
            proposal.meta.update(fallback_from=proposer.name, fallback_reason=error.reason)
        elif isinstance(error, ProposerUnavailable):
            self._spend(model, error)
            auth = isinstance(error, ProposerAuthError)
            self._block(f"{'API key rejected' if auth else 'proposer unavailable'}: {error.reason}",
                        retry_after=600 if auth else error.retry_after)
            return
        elif error is not None:
            self._block(f"proposer failed: {type(error).__name__}: {error}")
            return
        violations = self._scope_violations(proposal, best, human)
        if violations:
            extra = {}
            head = self.ws.head()
            if head != best:  # the agent's own commit: kept reachable, never on the branch
                self.ws.set_rejected_ref(cur.n, head)
                extra["agent_commit"] = head
            model.fire("reject", reason="out of scope: " + "; ".join(violations[:10]),
                       description=proposal.description, **extra)
            for p, data in human.items():  # give the human's files back if an agent CLI touched them
                path = self.root / p
                if not path.exists() or path.read_bytes() != data:
                    path.write_bytes(data)
            return
        files = proposal.files if proposal.files is not None else self.ws.read_files()
        model.fire("proposed", description=" ".join(proposal.description.split())[:300], files=files,
                   proposer=proposal.proposer, usage=proposal.usage, cost_usd=proposal.cost_usd,
                   meta=proposal.meta)
        self._commit(self.state.experiments[cur.n], model, best)

    def _check_model(self) -> bool:
        """Look the anthropic proposer's model up through the Models API: once per start, and
        again when the config names another one. Recorded (`status` shows it) and logged; a
        retired model blocks with the reason. False when blocked.

        An answer the API cannot give (an outage, a gateway without /v1/models) is recorded as
        `unknown` and does not block: the proposals' own retry policy deals with outages.
        """
        if self.cfg.proposer.kind != "anthropic" or self._model_checked == self.cfg.anthropic.model:
            return True
        from .proposers.anthropic import lookup_model

        model = self.cfg.anthropic.model
        self.watchdog.tick()
        try:
            info = lookup_model(self.cfg.anthropic)
        except ProposerAuthError as exc:
            self._block(f"API key rejected: {exc.reason}", retry_after=exc.retry_after)
            return False
        except ProposerUnavailable as exc:
            info = {"id": model, "lifecycle": "unknown", "error": exc.reason}
        self.machines.daemon.fire("note", kind="model", model=model, **info)
        lifecycle = info["lifecycle"]
        if lifecycle == "retired":
            self._block(f"model {model} is retired (Models API): set anthropic.model in "
                        f"{config_mod.CONFIG_NAME} to a current model, e.g. {config_mod.AnthropicConfig.model}",
                        retry_after=600.0)
            return False
        if lifecycle != "active":
            log.warning(f"model {model} is {lifecycle}",
                        **{k: info[k] for k in ("retires_at", "error") if info.get(k)})
        self._model_checked = model
        return True

    def _search_exhausted(self, error: NoEdit) -> None:
        """The offline search has nothing left to try: stop for good rather than spin on rejections."""
        d = self.machines.daemon
        if d.state in ("running", "paused"):
            d.fire("exhaust", reason=f"offline search exhausted: {error.reason}")

    def _scope_violations(self, proposal: Proposal, best: str, human: dict[str, bytes]) -> list[str]:
        """The scope guard: only the editable files may differ from best, and only by a proposer
        that edits the worktree itself (in-memory proposals must leave it untouched)."""
        changes = self.ws.changes(base=best)
        violations = [str(v) for v in self.ws.scope_violations(changes) if v.path not in HUMAN_FILES]
        if self.ws.branch != self.branch:
            violations.insert(0, f"left the branch {self.branch} (HEAD is "
                                 f"{self.ws.branch or 'detached'})")
        if proposal.files is None:
            for p, data in human.items():
                path = self.root / p
                if not path.exists() or path.read_bytes() != data:
                    violations.append(f"modified: {p}")
        else:
            touched = [p for p in changes.paths if p not in HUMAN_FILES]
            if touched:
                violations.append("an in-memory proposer changed the worktree: " + ", ".join(touched))
            violations += [f"not editable: {p}" for p in proposal.files if p not in self.cfg.run.editable]
        return violations

    def _spend(self, model, error) -> None:
        if any(error.usage.values()) or error.cost_usd:
            model.fire("spend", usage=error.usage, cost_usd=error.cost_usd, reason=error.reason)

    def _in_thread(self, fn: Callable[[], Proposal], ctx: ProposalContext):
        """Run `fn` in a worker thread while the main loop keeps serving.

        Returns (proposal, None) or (None, exception); None when skipped.
        """
        box: dict[str, Any] = {}

        def work():
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed over to the main loop
                box["error"] = exc

        worker = threading.Thread(target=work, name="proposer", daemon=True)
        worker.start()
        try:
            outcome = self._wait(lambda: not worker.is_alive(),
                                 timeout=max(1.0, ctx.deadline - time.monotonic() + 30))
        except Stop:
            ctx.cancel.set()
            raise
        if outcome == "skip":
            ctx.cancel.set()
            return None
        if outcome == "timeout":
            ctx.cancel.set()
            return None, ProposerUnavailable("the proposal deadline passed without an answer")
        return box.get("result"), box.get("error")

    def _commit(self, cur, model, best: str) -> None:
        files = cur.files
        at_best = self.ws.files_at(best, list(files))
        if all(at_best.get(p) == text for p, text in files.items()):
            model.fire("reject", reason="the proposal changes nothing")
            return
        same = self._duplicate_of({**self.ws.files_at(best), **files}, cur.n)
        if same is not None:
            model.fire("reject", reason=f"duplicate of experiment {same}: the same editable files "
                                        "(by hash) already ran; not run again")
            return
        sha = self.ws.exp_ref(cur.n)
        if sha and self.ws.commit_matches(sha, files, parent=best):
            if self.ws.head() != sha:  # committed before a crash: reuse it
                self._reset(sha)
        else:
            if self.ws.head() != best:
                self._reset(best)
            self.ws.write_files(files)
            sha = self.ws.commit(f"exp {cur.n}: {cur.description or 'proposal'}")
            self.ws.set_exp_ref(cur.n, sha)
        added, removed = self.ws.numstat(best, sha)
        model.fire("commit", commit=sha, parent=best, added=added, removed=removed,
                   hashes={p: _sha256(t.encode()) for p, t in files.items()})

    # -- training and judging

    def _launch(self, cur, model) -> None:
        if self.ws.head() != cur.commit:
            self._reset(cur.commit)
        for path, digest in cur.hashes.items():
            try:
                actual = self.ws.file_hash(path)
            except FileNotFoundError:
                actual = "missing"
            if actual != digest:
                model.fire("reject", reason=f"{path} changed between commit and launch")
                return
        self._start_run(cur, model, "launch")

    def _start_run(self, cur, model, trigger: str) -> None:
        attempt = cur.runs + 1
        log_path = self.state_dir / "runs" / (f"{cur.n}.log" if attempt == 1 else f"{cur.n}-{attempt}.log")
        sb = self.cfg.sandbox
        kind, why = sandbox.expected(sb.mode)
        model.fire(trigger, log=str(log_path.relative_to(self.root)), attempt=attempt, sandbox=kind,
                   sandbox_why=why)
        if kind != "bwrap":
            log.warning("this run is not fully contained", sandbox=kind, why=why)
        # The run's own checkout of its commit: the human's worktree, .git and the state
        # directory are not the run's to see (under bwrap) or to be its working directory.
        human = {p: (self.root / p).read_bytes() for p in HUMAN_FILES if (self.root / p).exists()}
        checkout = self.ws.run_checkout(RUN_SLOT, cur.commit, extra=human)
        layout = sandbox.Layout(checkout=checkout, hide=(self.root, Path(self.ws.repo.common_dir)),
                                read_only=self._run_read_only(), conceal=self._hidden_from_training(),
                                home=os.environ.get("HOME") or "/tmp/home")
        self._run = Run.start(self.cfg.run.argv, checkout, log_path, self.cfg.run.hard_deadline,
                              self.cfg.run.log_max_bytes,
                              sb, layout,
                              self.cfg.run.metric_regex, self.cfg.run.memory_regex or None,
                              env=self._run_env())
        self._run_started = time.monotonic()
        self._send_status()

    def _run_read_only(self) -> tuple[Path, ...]:
        """Host paths a run reads besides its checkout and the Python install: the data cache,
        a dataset directory named by workload.data, sandbox.read_only."""
        paths = [Path(p) for p in self.cfg.sandbox.read_only]
        if self.cfg.workload.profile:
            from .trainer.settings import cache_dir
            paths.append(cache_dir())
        if self.cfg.workload.data.startswith("dir:"):
            paths.append(Path(self.cfg.workload.data[4:]))
        return tuple(paths)

    def _hidden_from_training(self) -> tuple[Path, ...]:
        """What the training run must not see although the data cache is visible: each prepared
        entry's validation split and the downloaded corpora (which hold it as text)."""
        if not self.cfg.workload.profile:
            return ()
        from .trainer import VAL_DIR
        from .trainer.prepare import move_val
        from .trainer.settings import cache_dir
        root = cache_dir()
        for old in root.glob("*/val.bin"):  # an entry prepared before the split had its directory
            move_val(old.parent)
        return (*sorted(root.glob(f"*/{VAL_DIR}")), root / "downloads")

    def _eval_argv(self) -> list[str] | None:
        """The evaluation step: [eval] command, else the built-in workload's evaluator, else none."""
        if self.cfg.eval.command:
            return self.cfg.eval.argv
        if self.cfg.workload.profile:
            return [sys.executable, "-m", "autoresearch.trainer.evaluate"]
        return None

    def _train(self, cur, model) -> None:
        run = self._run
        if run is None:  # cannot happen after _boot's interrupt; kept as a guard
            model.fire("interrupt", reason="run lost", graceful=False)
            return
        if self._wait(lambda: run.poll() is not None) == "skip":
            return  # _experiment_step handles the skip on the next turn
        result = self._result = run.poll()
        self._run = None
        self._evaluation = None
        evaluated = self._eval_argv() is not None and not _failure(result, need_metric=False)
        model.fire("trained" if evaluated else "finish", exit_code=result.exit_code, signal=result.signal, timed_out=result.timed_out,
                   killed=result.killed, metric=_finite_or_none(result.metric),
                   metric_text=None if result.metric is None else repr(result.metric),
                   memory_gb=result.memory_gb, duration_s=round(result.duration_s, 3),
                   log_tail=result.log_tail[-4000:], log_truncated=result.log_truncated,
                   sandbox=result.sandbox)

    def _evaluate(self, cur, model) -> None:
        """The evaluation step, in a sandbox of its own: the run's checkout read-only, the human's
        config and evaluation files put back over whatever the run left, the validation split
        visible. Started afresh after a restart (the run's outputs are still in its checkout)."""
        if self._run is None:
            if cur.evaluations > self.cfg.limits.max_interrupts:
                self._evaluation = (f"evaluation interrupted {cur.evaluations} times", None, "")
                model.fire("evaluated", exit_code=None, metric=None, duration_s=0.0, log_tail="",
                           failure=self._evaluation[0])
                return
            self._start_evaluation(cur, model)
        run = self._run
        if self._wait(lambda: run.poll() is not None) == "skip":
            return
        result = run.poll()
        self._run = None
        failure = _failure(result)
        if failure:
            reason = _fail_line(result.log_tail)
            failure = f"evaluation: {reason}" if reason else f"evaluation failed: {failure}"
        self._evaluation = (failure, result.metric, result.log_tail)
        model.fire("evaluated", exit_code=result.exit_code, signal=result.signal, timed_out=result.timed_out,
                   killed=result.killed, metric=_finite_or_none(result.metric),
                   duration_s=round(result.duration_s, 3), log_tail=result.log_tail[-4000:],
                   failure=failure, sandbox=result.sandbox)

    def _start_evaluation(self, cur, model) -> None:
        checkout = self.state_dir / "slots" / str(RUN_SLOT)  # as the training run left it
        # The human's evaluation files: from the best commit (the baseline's own commit is the human's).
        best = self.state.best_commit or (cur.commit if cur.kind == "baseline" else self.ws.best())
        files = {p: data for p in self.cfg.eval.files if (data := self.ws.blob_at(best, p)) is not None}
        missing = [p for p in self.cfg.eval.files if p not in files]
        for p in HUMAN_FILES:
            if (self.root / p).exists():
                files[p] = (self.root / p).read_bytes()
        if checkout.is_dir():
            for rel, data in files.items():
                _place(checkout, rel, data)
        attempt = cur.evaluations + 1
        log_path = self.state_dir / "runs" / (f"{cur.n}-eval.log" if attempt == 1 else f"{cur.n}-eval-{attempt}.log")
        sb = self.cfg.sandbox
        kind, why = sandbox.expected(sb.mode)
        model.fire("evaluate", log=str(log_path.relative_to(self.root)), attempt=attempt, sandbox=kind,
                   sandbox_why=why, files={p: _sha256(files[p]) for p in self.cfg.eval.files if p in files},
                   missing=missing)
        layout = sandbox.Layout(checkout=checkout, hide=(self.root, Path(self.ws.repo.common_dir)),
                                read_only=self._run_read_only(), writable=False,
                                home=os.environ.get("HOME") or "/tmp/home")
        deadline = self.cfg.eval.deadline_seconds or self.cfg.run.hard_deadline
        argv = self._eval_argv()
        if not checkout.is_dir():  # the run's outputs are gone: nothing to evaluate
            argv = [sys.executable, "-c", "print('FAIL: the run\'s checkout is gone'); raise SystemExit(2)"]
        self._run = Run.start(argv, checkout if checkout.is_dir() else self.state_dir, log_path, deadline,
                              self.cfg.run.log_max_bytes,
                              sb, layout,
                              self.cfg.run.metric_regex, None, env=self._run_env())
        self._run_started = time.monotonic()
        self._send_status()

    def _judge(self, cur, model) -> None:
        result = self._result
        evaluation = self._evaluation
        if result is None and evaluation is None:  # cannot happen after _boot's interrupt; kept as a guard
            model.fire("interrupt", reason="result lost", graceful=False)
            return
        if evaluation is not None:  # the run was evaluated: its figure is the evaluation's
            failure, metric, tail = evaluation
            if not failure and _disagrees(cur.printed, metric):
                failure = f"{UNTRUSTED} (printed {cur.printed:.6f}, trusted {metric:.6f})"
                if cur.kind != "baseline":
                    model.fire("discard", metric=metric, reason=failure, printed=cur.printed)
                    return
        else:
            failure, metric, tail = _failure(result), result.metric, result.log_tail
        if failure and cur.kind == "baseline":
            self._baseline_failed(cur, model, failure, tail)
            return
        if failure:
            model.fire("crash", reason=failure)
            return
        if cur.kind == "baseline":
            if len(cur.metrics) < self.cfg.judge.noise_runs + 1:
                self._start_run(cur, model, "rerun")
            else:
                model.fire("keep", metric=statistics.fmean(cur.metrics), reason="baseline")
            return
        best = self.state.best_metric
        threshold = max(self.cfg.judge.min_delta, self.state.threshold)
        sign = 1 if self.cfg.run.direction == "minimize" else -1
        gain = sign * (best - metric) if best is not None else math.inf
        if gain > threshold:
            model.fire("keep", metric=metric, reason=f"improved by {gain:.6f} (threshold {threshold:g})")
        elif self.cfg.judge.simplicity and abs(gain) <= threshold and cur.added < cur.removed:
            model.fire("keep", metric=metric,
                       reason=f"equal within {threshold:g} and {cur.removed - cur.added} fewer lines")
        else:
            model.fire("discard", metric=metric, reason=f"no improvement ({metric:.6f} vs best {best:.6f})")

    # ------------------------------------------------------------------ git helper

    def _reset(self, sha: str) -> None:
        """Hard reset to `sha`, keeping the human's program.md and config as they are."""
        human = {p: (self.root / p).read_bytes() for p in HUMAN_FILES if (self.root / p).exists()}
        if self.ws.branch != self.branch:  # an agent switched branches or detached HEAD
            self.ws.checkout_branch(self.branch)
        self.ws.reset_hard(sha)
        for p, data in human.items():
            path = self.root / p
            if not path.exists() or path.read_bytes() != data:
                tmp = self.state_dir / f".{p}.tmp"  # not in the worktree: a kill here leaves no stray file
                tmp.write_bytes(data)
                os.replace(tmp, path)
