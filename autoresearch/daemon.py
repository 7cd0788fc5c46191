"""The daemon's process shell: lock, signals, sd_notify and the watchdog, file watching, the
request inbox, the event log's one writer, and the main loop.

One thread does all the work (the "main loop"). Each turn it serves signals, the inbox,
program.md changes and the systemd watchdog, then lets the coordinator (coordinator.py) take
what completed and decide what to start; then it sleeps until something wakes it (a run ended,
a proposal is ready, a file changed, a signal) or a short tick passes. Anything slow (a training
run, an agent's API call) happens in a child process or a worker thread; nothing in the main
loop waits for one. If the main loop itself hangs, the watchdog stops being pinged and systemd
restarts us: that is the point of pinging from here and from nowhere else.

Every transition is recorded in the event log before the side effect that follows it
(machine.py). After a crash, `_open` folds the log and `boot.boot` reconciles git, refs, slot
checkouts and leftover processes with the folded state.
"""

from __future__ import annotations

import difflib
import errno
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import structlog

from . import boot as boot_mod, config as config_mod, faults, gpus, progress, secrets
from .alerts import Alerts
from .control import INBOX_NAME, WorkspaceLock
from .coordinator import Coordinator, Stop
from .errors import ConfigError, CorruptLogError, Exit, UserError, WorkspaceError
from .eventlog import EventLog, verify_path
from .machine import LEGAL, Machines
from .notify import Notifier, WatchdogTimer
from .report import fmt_duration, status_line
from . import sandbox
from .state import State, apply
from .workspace import HUMAN_FILES, STATE_DIR, Workspace, sha256_hex

log = structlog.get_logger("autoresearch.daemon")
logging.getLogger("transitions").setLevel(logging.WARNING)  # our own events say it all

EVENTS_NAME = "events.sqlite"
TICK_S = 0.25  # longest sleep of the main loop between services
STATUS_REFRESH_S = 5.0  # STATUS= while a run is in flight: its elapsed time, this often
DISK_FULL_RETRY_S = (0.5, 30.0)  # first and longest wait between appends while the disk is full
PROGRAM_SETTLE_S = 0.2  # an editor's save may take several writes; record the settled text once



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


def harness_dir(cfg: config_mod.Config) -> Path | None:
    if not cfg.workload.profile:
        return None  # not the built-in workload
    from .trainer import harness_dir as trainer_harness
    return trainer_harness()


def _disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL, or ENOSPC/EDQUOT from the OS: space may come back, so waiting helps."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _check_strict(cfg: config_mod.Config) -> None:
    """sandbox.mode = "strict" is a promise: no run without bubblewrap, so no start either."""
    if cfg.sandbox.mode == "strict":
        kind, why = sandbox.expected("strict")
        if kind != "bwrap":
            raise ConfigError(f"sandbox.mode = 'strict' but bubblewrap cannot run here: {why}")


class Daemon:
    def __init__(self, root: Path | str, *, max_experiments: int | None = None,
                 run_for: float | None = None, proposer_factory: Callable | None = None,
                 overrides: dict[str, Any] | None = None):
        self.root = Path(root).absolute()
        self.overrides = dict(overrides or {})  # config keys replaced for this invocation (run --proposer)
        self.session_max_experiments = max_experiments
        self.session_deadline = time.monotonic() + run_for if run_for else None
        self.make_proposer = proposer_factory or make_proposer
        self.notifier = Notifier(unset_environment=True)  # runs must not talk to systemd as us
        self.watchdog = WatchdogTimer(self.notifier)
        self.alerts = Alerts(lambda: self.cfg.notify, self.root)  # [notify] command: queued, never waited for
        self.wake = threading.Event()  # set by signal handlers, file events, ended runs, ready proposals
        self._flags: set[str] = set()  # "stop", "reload", "program", "inbox": set by handlers
        self.stop_reason = ""
        self.stop_request: str | None = None
        self.error = ""  # the unexpected exception that ended run(), if one did
        self._status_sent = 0.0  # when STATUS= was last sent (monotonic)
        self.coordinator: Coordinator | None = None
        self.program_text = ""
        self._observer = None
        self._old_handlers: dict = {}
        self.on_tick: Callable[[], None] | None = None  # called by the main loop on every turn
        self.log: EventLog | None = None
        self.adopt_head: str | None = None  # a person's commit found at open (boot adopts it)
        self.adopt_remeasure = False
        self._recording: tuple[int | None, str] | None = None  # the transition being recorded

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
            self.anchors = self.ws.anchors()
            anchors = [(seq, digest) for seq, digest, _ in self.anchors]
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
            if boot_mod.rollback_under_way(self):
                self.reset(self.state.best_commit or self.ws.best() or self.ws.head())
            boot_mod.check_profile(self)
            if self.state.branch and self.branch != self.state.branch and boot_mod.agent_leftovers_possible(self):
                # An agent CLI switched branches just before we died: the workspace's branch is
                # the one the log recorded; the agent's is rolled back like the rest of its edit.
                self.branch = self.state.branch
            boot_mod.check_workspace(self)
            boot_mod.preflight(self)
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


    def _record(self, aggregate: str, trigger: str, source: str, dest: str, payload: dict) -> None:
        # What was being done, should it fail: the failure names this experiment, not another in flight.
        self._recording = (int(aggregate.split(":")[1]) if aggregate.startswith("experiment:") else None, source)
        faults.point(f"pre:{trigger}")
        # No secret is ever stored (a run's log tail, an agent's description or error ...);
        # a proposal's files are the commit itself and must stay byte for byte.
        payload = {k: v if k == "files" else secrets.redact_obj(v) for k, v in payload.items()}
        event = self._append(aggregate, trigger, source, dest, payload)
        apply(self.state, event)
        self.alerts.observe(event, self.state)
        # Each line names its own experiment (several are in flight: nothing is bound process-wide).
        small = {k: v for k, v in payload.items()
                 if k in ("commit", "metric", "reason", "description", "kind", "request", "retry_at",
                          "exit_code", "cost_usd", "outcome", "error", "lifecycle") and v not in (None, "")}
        log.info(f"{aggregate} {trigger}: {source} -> {dest}", seq=event.seq, experiment=event.experiment,
                 state=dest, trigger=trigger, **small)
        self.send_status()
        self._recording = None
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


    def send_status(self) -> None:
        self.notifier.status(self.status())
        self._status_sent = time.monotonic()

    def run_views(self) -> dict[int, tuple[float, str]]:
        """Each run in flight: experiment -> (seconds since launch, what its own output says)."""
        if self.coordinator is None:
            return {}
        return {n: (elapsed, str(progress.read(log_path)))
                for n, (elapsed, log_path) in self.coordinator.runs().items() if isinstance(n, int)}

    def status(self) -> str:
        return status_line(self.state, self.run_views(), self.cfg.run.budget_seconds)

    def live_line(self) -> str | None:
        """The runs in flight (the experiments', or prepare_command's), for a person watching the
        terminal: elapsed/budget and what each run's own output says; None when nothing runs."""
        if self.coordinator is None:
            return None
        runs = self.coordinator.runs()
        if not runs:
            return None
        if any(isinstance(n, int) for n in runs):
            return self.status()
        elapsed, log_path = next(iter(runs.values()))
        last = progress.last_lines(progress.tail(log_path, 4096), count=1, width=100)
        return f"{self.machines.daemon.state} {fmt_duration(elapsed)}" + (f" · {last}" if last else "")

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        self.open()
        kind, why = sandbox.expected(self.cfg.sandbox.mode)
        if kind != "bwrap":
            log.warning("runs will not be fully contained", sandbox=kind, why=why)
        self.machines = Machines(self._record, self.state.daemon)
        try:
            self.coordinator = self._make_coordinator()
            self._install_signals()
            self._start_observer()
            boot_mod.boot(self)
            self.notifier.ready(self.status())
            self._loop()
            return 0
        except UserError:
            raise  # the user's to fix: one line and its own exit code (cli.main)
        except Exception as exc:  # a bug or an unforeseen condition, not a user's mistake
            self._failed(exc)
            return Exit.FAILED  # not in RestartPreventExitStatus: systemd restarts us
        finally:
            self._shutdown()

    def _make_coordinator(self) -> Coordinator:
        """The slots: how many, and which GPU each gets. Runs on different GPU models do not
        compare under a time budget: refused unless the config allows it. (With a remote
        executor the runs are not on this machine's GPUs: [ray] accelerator_type says the model.)"""
        remote = self.cfg.executor.kind != "local"
        visible = [] if remote else gpus.visible()
        problem = gpus.check_models(visible, self.cfg.slots)
        if problem:
            raise ConfigError(f"{config_mod.CONFIG_NAME}: {problem}")
        count = config_mod.slot_count(self.cfg, visible)
        return Coordinator(self, count, gpus.slot_gpus(visible, self.cfg.slots), visible)

    def _failed(self, exc: Exception) -> None:
        """Say where we were, in daemon.log / the journal and in the event log, then let run()
        exit non-zero: systemd's Restart=on-failure starts us again and boot reconciles."""
        live = self.state.in_flight()
        daemon_state = self.machines.daemon.state
        n, state = self._recording if self._recording and self._recording[0] is not None else \
            ((live[0].n, live[0].state) if live else (None, daemon_state))
        where = {"experiment": n, "state": state, "daemon": daemon_state, "in_flight": [e.n for e in live]}
        self.error = f"{type(exc).__name__}: {exc}"
        log.error("daemon failed unexpectedly; exiting", error=self.error, exc_info=exc, **where)
        try:
            self.machines.daemon.fire("note", kind="failure", error=self.error, **where)
        except Exception as again:  # the log itself may be what failed: daemon.log has it all
            log.error("could not record the failure in the event log", error=f"{type(again).__name__}: {again}")

    def _install_signals(self) -> None:
        def on_stop(signum, frame):
            self._flags.add("stop")
            self.stop_reason = self.stop_reason or f"signal {signal.Signals(signum).name}"
            self.wake.set()

        def on_hup(signum, frame):
            self._flags.add("reload")
            self.wake.set()

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
                        daemon.wake.set()
                    elif folder == str(inbox) and name.endswith(".json"):
                        daemon._flags.add("inbox")
                        daemon.wake.set()

        self._observer = Observer()
        self._observer.schedule(Handler(), root, recursive=False)
        self._observer.schedule(Handler(), str(inbox), recursive=False)
        self._observer.daemon = True
        self._observer.start()
        self._flags.add("inbox")  # requests written while we were down


    def _shutdown(self) -> None:
        try:
            if self.coordinator is not None:
                self.coordinator.kill_all()
        finally:
            if self._observer is not None:
                self._observer.stop()
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self.notifier.stopping(self.status())
            self.alerts.close()  # a short while for "stopped" to go out
            try:
                self.checkpoint()
            finally:
                self.log.close()
                self.lock.release()

    def checkpoint(self) -> None:
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

    def run_tag(self, n=None) -> str:
        """AUTORESEARCH_RUN_TAG: the workspace's (every run of it carries it), with `.<n>` for
        experiment n's runs, so that orphans are found per run and per workspace (kill_tagged)."""
        tag = sha256_hex(str(self.root).encode())[:16]
        return tag if n is None else f"{tag}.{n}"

    # ------------------------------------------------------------------ the loop

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        """Serve, let the coordinator take a turn, sleep until woken or a tick passes."""
        delay = 0.002
        try:
            while True:
                self._service()
                seq = self.state.seq
                if self.coordinator.step():
                    return
                if self.state.seq != seq:
                    delay = 0.002  # something happened: look again soon
                    continue
                due = self.watchdog.seconds_until_due()
                # Poll fast at first (an instant run should not cost a whole tick), then relax.
                sleep = min(delay, TICK_S, due if due is not None else TICK_S)
                delay = min(delay * 2, TICK_S)
                if self.wake.wait(sleep):
                    self.wake.clear()
                    delay = 0.002
        except Stop:
            self._stop_now()

    def _stop_now(self) -> None:
        self.coordinator.stop_now()
        payload = {"reason": self.stop_reason or "stop requested"}
        if self.stop_request:
            payload["request"] = self.stop_request
        self.machines.daemon.fire("stop", **payload)

    def session_over(self) -> bool:
        """This invocation's own limits (--max-experiments, --for) are reached; sets the stop reason."""
        if self.session_max_experiments is not None and \
                self.coordinator.session_outcomes >= self.session_max_experiments:
            self.stop_reason = f"--max-experiments {self.session_max_experiments} done"
        elif self.session_deadline is not None and time.monotonic() >= self.session_deadline:
            self.stop_reason = "--for duration elapsed"
        else:
            return False
        return True

    def session_limit_left(self, live: int) -> float:
        """How many more experiments this invocation may start, with `live` in flight."""
        if self.session_max_experiments is None:
            return float("inf")
        return self.session_max_experiments - self.coordinator.session_outcomes - live

    # ------------------------------------------------------------------ servicing

    def _service(self) -> None:
        """Signals, inbox, program.md, config reload, watchdog. Called every turn."""
        self.watchdog.tick()
        if self.on_tick is not None:
            self.on_tick()  # e.g. the live line on a terminal (cli.py)
        if self.coordinator.runs() and time.monotonic() - self._status_sent >= STATUS_REFRESH_S:
            self.send_status()  # the runs' clocks in `systemctl status` move on
        flags, self._flags = self._flags, set()
        if "reload" in flags:
            self._reload_config()
        if "program" in flags:
            self._program_changed()
        if "inbox" in flags:
            self._read_inbox()
        if "stop" in flags or self.stop_request:
            self._flags.add("stop")  # sticky until we are out
            raise Stop()

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
                if d.state == "preparing" and self.coordinator.prepared:
                    self.coordinator.prepared_go_on()  # now, not after the run in flight: status says so
            else:
                ignored = f"daemon is {d.state}, not {'pausable' if action == 'pause' else 'paused or blocked'}"
        elif action == "stop":
            if self.stop_request:
                ignored = f"already stopping (request {self.stop_request})"
            else:
                self.stop_request, self.stop_reason = rid, "stop requested"
        elif action == "skip":
            ignored = self.coordinator.accept_skip(rid, request.get("experiment"), request.get("seen"))
        else:
            ignored = f"unknown request {action!r}"
        if ignored:
            d.fire("note", kind="request", request=rid, action=action, outcome="ignored: " + ignored)


    def _reload_config(self) -> None:
        """SIGHUP: the human's autoresearch.toml (never a run's copy of it) becomes the config.

        Under bubblewrap a run can neither write that file nor signal us. Without it (the
        fallback, mode off) it could do both, so while such a run is in flight a reload that
        weakens the sandbox is refused: send it again once the run has ended. Every reload
        records what changed and who owns the file that changed it.
        """
        self.notifier.reloading()
        path = self.root / config_mod.CONFIG_NAME
        kinds = {self.state.experiments[n].sandbox for n in self.coordinator.runs() if isinstance(n, int)}
        who = {"file": str(path), "run_in_flight": bool(self.coordinator.runs()),
               "run_sandbox": (sorted(kinds - {"bwrap"}) or sorted(kinds) or [None])[0]}
        try:
            who["file_uid"] = path.stat().st_uid
            cfg = self._load_config()  # this invocation's overrides still apply
            if cfg.workload.profile != self.cfg.workload.profile:
                raise ConfigError("workload.profile cannot change while the workspace has results")
            _check_strict(cfg)
            weaker = sandbox.weakening(self.cfg.sandbox, cfg.sandbox)
            if weaker and who["run_in_flight"] and who["run_sandbox"] != "bwrap":
                raise ConfigError(f"it weakens the sandbox ({'; '.join(weaker)}) while a run that could "
                                  f"have written {path.name} ({who['run_sandbox']}) is in flight; "
                                  "send the reload again once the run has ended")
        except (ConfigError, OSError) as exc:
            log.error("config reload rejected; keeping the old config", error=str(exc))
            self.machines.daemon.fire("note", kind="config_rejected", error=str(exc), **who)
            self.notifier.ready(self.status())
            return
        changed = config_mod.differences(self.cfg, cfg)
        self.cfg = cfg
        self.ws.editable = cfg.run.editable
        self.machines.daemon.fire("note", kind="config_reloaded", config_hash=sha256_hex(path.read_bytes()),
                                  changed=changed, **who)
        self.notifier.ready(self.status())

    def _program_changed(self) -> None:
        path = self.root / "program.md"
        try:
            if time.time() - path.stat().st_mtime < PROGRAM_SETTLE_S:
                self._flags.add("program")  # still being written: look again next tick
                return
            data = path.read_bytes()
        except FileNotFoundError:
            return
        new_hash = sha256_hex(data)
        if new_hash == self.state.program_hash:
            return
        text = data.decode("utf-8", errors="replace")
        added = removed = 0
        for line in difflib.unified_diff(self.program_text.splitlines(), text.splitlines(), lineterm="", n=0):
            if line.startswith("+") and not line.startswith("+++"):
                added += 1
            elif line.startswith("-") and not line.startswith("---"):
                removed += 1
        self.program_text = text
        self.machines.daemon.fire("note", kind="program_changed", old_hash=self.state.program_hash,
                                  new_hash=new_hash, added=added, removed=removed)

    # ------------------------------------------------------------------ preparing


    # ------------------------------------------------------------------ what runs get

    def run_env(self) -> dict[str, str]:
        env = {**os.environ, "AUTORESEARCH_RUN_TAG": self.run_tag()}
        if self.cfg.workload.profile:  # the data cache by its absolute path (a run's $HOME is its own)
            from .trainer.settings import cache_dir
            env["AUTORESEARCH_CACHE_DIR"] = str(cache_dir().absolute())
        return env

    # ------------------------------------------------------------------ experiments


    def run_read_only(self) -> tuple[Path, ...]:
        """Host paths a run reads besides its checkout and the Python install: the data cache,
        a dataset directory named by workload.data, sandbox.read_only."""
        paths = [Path(p) for p in self.cfg.sandbox.read_only]
        if self.cfg.workload.profile:
            from .trainer.settings import cache_dir
            paths.append(cache_dir())
        if self.cfg.workload.data.startswith("dir:"):
            paths.append(Path(self.cfg.workload.data[4:]))
        return tuple(paths)

    def hidden_from_training(self) -> tuple[Path, ...]:
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

    def eval_argv(self) -> list[str] | None:
        """The evaluation step: [eval] command, else the built-in workload's evaluator, else none."""
        if self.cfg.eval.command:
            return self.cfg.eval.argv
        if self.cfg.workload.profile:
            return [sys.executable, "-m", "autoresearch.trainer.evaluate"]
        return None


    # ------------------------------------------------------------------ the human's worktree

    def human_files(self) -> dict[str, bytes]:
        """program.md and autoresearch.toml as they are now (the human's, never the agent's)."""
        return {p: (self.root / p).read_bytes() for p in HUMAN_FILES if (self.root / p).exists()}

    def restore_human_files(self, human: dict[str, bytes]) -> None:
        """Give the human's files back as they were (an agent CLI may have touched them)."""
        for p, data in human.items():
            path = self.root / p
            if not path.exists() or path.read_bytes() != data:
                tmp = self.state_dir / f".{p}.tmp"  # not in the worktree: a kill here leaves no stray file
                tmp.write_bytes(data)
                os.replace(tmp, path)

    def reset(self, sha: str) -> None:
        """The branch and the human's worktree to `sha` (hard), keeping program.md and the config."""
        human = self.human_files()
        if self.ws.branch != self.branch:  # an agent switched branches or detached HEAD
            self.ws.checkout_branch(self.branch)
        self.ws.reset_hard(sha)
        self.restore_human_files(human)
