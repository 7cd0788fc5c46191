"""The coordinator: one place that decides what happens next, for every experiment in flight.

A reactor. Nothing here waits: a handler starts work (a run through the executor, a proposal
through the pool) and returns. Each turn of the daemon's main loop calls `step()`, which
  1. takes what completed since the last turn (runs that ended, proposals that are ready),
     recording each as events, keyed by experiment number;
  2. decides from the folded state and the free slots: advance each experiment in flight by
     the transitions that need no waiting (commit, launch, judge, retry), start new
     experiments while slots and lookahead allow, end the loop when the limits say so.
The event log has one writer (the daemon's `_record`, called from this one thread), and every
transition is recorded before its side effect, as before.

Slots: `[slots] count` experiments train at once, each in its own git worktree
(.autoresearch/slots/<k>), and `lookahead` more are proposed ahead so that a freed slot
launches at once. The human's worktree stays at the best commit: experiments are committed
with git plumbing off the worktree, and the branch moves only when one is kept. Agent CLIs
(the command proposer) edit the human's worktree, so one proposes at a time and the worktree
is put back to the best only when none is at work.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from . import config as config_mod, gpus, sandbox
from .clock import parse_utc, utc_iso
from . import executor as executor_mod
from .executor import RunSpec
from .judge import judge, run_failure
from .machine import LEGAL
from .proposers.base import InFlight, NoEdit, Proposal, ProposerAuthError, ProposerUnavailable
from .proposers.pool import ProposalPool
from .proposers.prompt import change_summary
from .runner import kill_tagged
from .state import RUNNING, TRIALS, Experiment
from .workspace import HUMAN_FILES, blob_sha, sha256_hex

if TYPE_CHECKING:
    from .daemon import Daemon

log = structlog.get_logger("autoresearch.coordinator")

BACKOFF_S = (5, 15, 30, 60, 120, 300, 600)  # blocked: wait before retrying
PREPARE = "prepare"  # the executor key of run.prepare_command's run (experiments use their number)



def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _fail_line(tail: str) -> str:
    """The evaluator's own reason (its last FAIL: line), if it gave one."""
    lines = [ln for ln in tail.splitlines() if ln.startswith("FAIL: ")]
    return lines[-1][6:].strip() if lines else ""


def _place(root: Path, rel: str, data: bytes) -> None:
    """Write `data` at root/rel, replacing whatever a run left there (a symlink is replaced,
    never followed: the run's files are not to be trusted)."""
    import shutil
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


def _history_description(exp: Experiment) -> str:
    """An experiment's line in the agent's history: its description, and why a rejected one was
    rejected (out of scope, a duplicate...), which the agent needs in order not to repeat it."""
    if exp.state == "rejected" and exp.description and exp.reason:
        return f"{exp.description} (rejected: {exp.reason})"
    return exp.description or exp.reason


class Stop(Exception):
    """Unwinds the current turn when the daemon is to stop now."""


class Coordinator:
    def __init__(self, daemon: "Daemon", slots: int, slot_gpus: list[str | None], visible: list):
        self.d = daemon
        self.remote = daemon.cfg.executor.kind != "local"  # runs elsewhere: the executor places them
        self.slot_gpus = [] if self.remote else slot_gpus  # slot k -> its CUDA_VISIBLE_DEVICES (None: as the daemon's)
        self.visible = [] if self.remote else visible  # the GPUs nvidia-smi shows (gpus.visible)
        # With kind = "ray" the slots are what the cluster offers (executor.slots, as nodes come and go).
        self.executor = executor_mod.make(daemon.cfg, slots, wake=daemon.wake, prepare=self._prepare_job())
        self.pool = ProposalPool(lambda kind: daemon.make_proposer(daemon.cfg), wake=daemon.wake)  # the configured one
        self._slot_runs: dict[int, Any] = {}  # slot -> executor key while a process uses its checkout
        self._asked: dict[int, tuple[str, dict[str, bytes], Any]] = {}  # n -> (parent, human files, ctx)
        self._skips: list[tuple[str, int]] = []  # (request id, experiment) accepted, applied next turn
        self._settled: set[int] = set()  # experiments whose outcome's side effects are done
        self.prepared = False  # prepare_command succeeded in this process: once per start
        self._failures = 0  # consecutive blocks, for the backoff
        self.session_outcomes = 0  # experiments that reached an outcome in this invocation
        self._wind_down = ""  # why no new experiment starts (caps, search exhausted); ends when none is left
        self._model_checked: str | None = None
        self._proposer_answered = False  # a proposal came back since the start or the last block
        self._editing: int | None = None  # the experiment whose proposer edits the human's worktree now
        self._worktree_stale = False  # the human's worktree is to go back to the best (deferred while an agent edits it)
        self._changes: dict[int, str] = {}  # experiment -> prompt.change_summary (cache)
        self._fingerprints: dict[tuple, tuple | None] = {}  # (commit, editable) -> blob ids (cache)

    @property
    def slots(self) -> int:
        return self.executor.slots

    def _prepare_job(self) -> tuple[list[str], dict[str, bytes], dict[str, str]]:
        """run.prepare_command as a remote executor runs it on each node: with the human's files
        (the workload reads its profile from autoresearch.toml) and the runs' environment."""
        if self.d.cfg.executor.kind == "local":
            return [], {}, {}
        return list(self.d.cfg.run.prepare_argv), self.d.human_files(), self.d.run_env()

    # ------------------------------------------------------------------ shared with the shell
    @property
    def cfg(self):
        return self.d.cfg

    @property
    def ws(self):
        return self.d.ws

    @property
    def state(self):
        return self.d.state

    @property
    def machines(self):
        return self.d.machines

    def _exp_model(self, exp: Experiment):
        return self.machines.experiment(exp.n, exp.state)

    # ------------------------------------------------------------------ the turn

    def step(self) -> bool:
        """One turn: take completions, then decide. Never blocks. True when the loop is over."""
        self._apply_skips()  # first: a skipped run's end (killed by the skip) is not recorded as its outcome
        for key, result in self.executor.poll():
            self._run_ended(key, result)
        for note in getattr(self.executor, "notes", list)():  # a remote executor's verdicts on its nodes
            self.machines.daemon.fire("note", kind="node", **note)
        for n, outcome in self.pool.done():
            self._proposal_ready(n, outcome)
        for n, outcome in self.pool.dropped():  # answered after a skip or a stop: its tokens still count
            if self._editing == n:
                self._editing, self._worktree_stale = None, True
            usage, cost = getattr(outcome, "usage", None), getattr(outcome, "cost_usd", 0.0)
            if (usage and any(usage.values())) or cost:
                self.machines.daemon.fire("note", kind="late_spend", experiment=n, usage=usage, cost_usd=cost,
                                          reason="a proposal answered after its experiment ended")
        if self._worktree_stale:
            self._sync_worktree()
        return self._decide()

    def _decide(self) -> bool:
        d = self.machines.daemon
        state = d.state
        if state == "starting":
            d.fire("prepare")
            return False
        if state == "preparing":
            if self._check_model():
                self._prepare()
            self._advance_all()
            return False
        if state == "blocked":
            # Ends at retry_at, or earlier on `resume` (the shell's request handling).
            self._advance_all()  # runs in flight still end and are judged
            retry_at = parse_utc(self.state.retry_at) if self.state.retry_at else time.time()
            if time.time() >= retry_at or self.d.session_over():
                if self.d.session_over():
                    raise Stop()
                d.fire("unblock")
            return False
        if state in ("exhausted", "stopped"):
            return True
        if state == "paused":  # every run in flight finishes and is judged; nothing new starts
            self._advance_all()
            if self.d.session_over() and not self._busy():
                raise Stop()
            return False
        if state == "baseline":
            if not self.state.in_flight():
                self._adopt_baseline()
            self._advance_all()
            return False
        # running
        if not self._wind_down:
            self._wind_down = self._cap_reached()  # before anything new is asked for
        self._advance_all()
        return self._fill()

    def _busy(self) -> bool:
        """A run or a proposal is under way (what a graceful end waits for)."""
        return bool(self.executor.running()) or bool(self.pool.busy()) or any(
            e.state in (*RUNNING, "judging") for e in self.state.in_flight())

    def _may_start_work(self) -> bool:
        """Whether new work (a launch, a proposal) may start now: the daemon runs (or measures its
        baseline) and this invocation's --for has not run out. Otherwise what is under way ends
        and is judged, and nothing new starts."""
        if self.machines.daemon.state not in ("running", "baseline"):
            return False
        return not (self.d.session_deadline is not None and time.monotonic() >= self.d.session_deadline)

    def _advance_all(self) -> None:
        """Advance every experiment in flight, oldest first, as far as it goes without waiting."""
        for exp in self.state.in_flight():
            for _ in range(8):  # a few transitions per turn (commit -> launch ...); never a loop
                exp = self.state.experiments[exp.n]
                before = (exp.state, self.state.seq)
                if exp.terminal:
                    break
                work = self._may_start_work()  # asked each time: a transition may have blocked us
                self._advance(exp, work, work and not self._wind_down)
                exp = self.state.experiments[exp.n]
                if exp.terminal:
                    self._finished(exp.n)
                    break
                if (exp.state, self.state.seq) == before:
                    break

    def _advance(self, exp: Experiment, launch: bool, propose: bool) -> None:
        s = exp.state
        if s == "proposing":
            if exp.files is not None:  # recorded before a crash: re-apply it, never ask again
                self._commit(exp)
            elif exp.kind == "merge":  # its start survived a crash, its merged change did not
                if propose:
                    self._propose_merge(exp)
            elif exp.n not in self.pool.busy() and propose:
                self._ask(exp)
        elif s == "committed":
            if launch:
                slot = self._free_slot()
                if slot is not None:
                    self._launch(exp, slot)
        elif s == "training":
            if exp.n not in self.executor.running():  # cannot happen after boot's interrupt: a guard
                self._exp_model(exp).fire("interrupt", reason="run lost", graceful=False)
        elif s == "evaluating":
            if exp.n not in self.executor.running():  # after a restart: the evaluation runs again
                self._start_evaluation(exp)
        elif s == "judging":
            self._judge(exp)
        elif s == "interrupted":
            if launch:
                self._resume_interrupted(exp)

    def _free_slot(self) -> int | None:
        if self.executor.capacity() <= 0:
            return None
        held = {e.slot for e in self.state.in_flight() if e.state in RUNNING}
        for k in range(self.slots):
            if k not in held and k not in self._slot_runs:
                return k
        return None

    # ------------------------------------------------------------------ new experiments

    def _fill(self) -> bool:
        """Start experiments while slots and lookahead allow and the limits do not say stop.
        True when the loop is over (caps -> exhausted, this invocation's limits -> stopped)."""
        d = self.machines.daemon
        live = [e for e in self.state.in_flight() if e.kind != "baseline"]
        if self._wind_down:  # (caps are checked by _decide before anything is advanced)
            if self._busy():
                return False
            self._interrupt_queued(self._wind_down)
            d.fire("exhaust", reason=self._wind_down)
            log.info("caps reached; exiting", reason=self._wind_down)
            return True
        if self.d.session_over() or self.d.session_limit_left(len(live)) <= 0:
            if self._busy():
                return False
            if self.d.session_over() or not live:
                raise Stop()
            return False
        # Merges owed (recorded with their verdict, so a restart still owes them), before new experiments.
        for base, commit, n in list(self.state.merges_owed):
            if self.d.session_limit_left(len(live)) > 0:
                self._queue_merge(base, commit, n)
                live = [e for e in self.state.in_flight() if e.kind != "baseline"]
        lim = self.cfg.limits
        done = sum(1 for e in self.state.experiments.values() if e.kind in TRIALS and e.terminal)
        want = self.slots + self.cfg.slots.lookahead
        while len(live) < want and self.d.session_limit_left(len(live)) > 0:
            if lim.max_experiments and done + len(live) >= lim.max_experiments:
                break
            n = self.state.next_n()
            self.machines.experiment(n).fire("start", kind="experiment", proposer=self.cfg.proposer.kind)
            live.append(self.state.experiments[n])
            self._advance_all()
        return False

    def _cap_reached(self) -> str:
        """The config's caps (limits.*): why no new experiment may start, or ''."""
        lim, st = self.cfg.limits, self.state
        done = sum(1 for e in st.experiments.values() if e.kind in TRIALS and e.terminal)
        live = sum(1 for e in st.in_flight() if e.kind != "baseline")
        if lim.max_experiments and done >= lim.max_experiments and not live:
            return f"max_experiments {lim.max_experiments} reached"
        if lim.max_cost_usd and st.cost_usd >= lim.max_cost_usd:
            return f"max_cost_usd {lim.max_cost_usd:g} reached (spent ${st.cost_usd:.2f})"
        if lim.max_hours and st.first_time and time.time() - parse_utc(st.first_time) >= lim.max_hours * 3600:
            return f"max_hours {lim.max_hours:g} reached"
        return ""

    def _interrupt_queued(self, why: str) -> None:
        """Experiments that wait (a proposal not asked yet, a commit not launched) when the loop
        ends: interrupted gracefully, taken up again by the next start."""
        for exp in self.state.in_flight():
            if exp.state in ("proposing", "committed"):
                self.pool.cancel(exp.n)
                self._exp_model(exp).fire("interrupt", reason=f"daemon stopping ({why})", graceful=True)

    def _adopt_baseline(self) -> None:
        # A person's adopted commit (also the one made before the first run), else the best.
        target = self.state.adopted or self.ws.best() or self.ws.head()
        if self.ws.head() != target:
            self.d.reset(target)
        files = self.ws.read_files()
        parent = self.state.best_commit if self.state.best_commit != target else None
        self.machines.experiment(self.state.next_n()).fire(
            "adopt", commit=target, parent=parent, files=files, description="baseline",
            hashes={p: self.ws.file_hash(p) for p in files})

    # ------------------------------------------------------------------ preparing

    def _prepare(self) -> None:
        argv = self.cfg.run.prepare_argv
        if argv and not self.prepared and not self.executor.prepares_nodes:  # once per start; again only after it failed or was cut short
            if PREPARE in self.executor.running() or self.executor.capacity() <= 0:
                return
            self.d.notifier.extend_timeout(int((self.cfg.run.hard_deadline + 30) * 1e6))
            self.executor.submit(PREPARE, RunSpec(
                argv=tuple(argv), cwd=str(self.d.root), log_path=str(self.d.state_dir / "prepare.log"),
                deadline_s=self.cfg.run.hard_deadline, log_max_bytes=self.cfg.run.log_max_bytes,
                sandbox=config_mod.SandboxConfig(mode="off"), layout=None,  # it may download
                metric_regex=self.cfg.run.metric_regex, memory_regex=None, env=self.d.run_env(),
                tag=self.d.run_tag()))
            return
        self.prepared = True
        self.prepared_go_on()

    def prepared_go_on(self) -> None:
        """preparing -> the baseline, or back to the loop once there is one."""
        self.machines.daemon.fire("resume_loop" if self.state.baseline_done else "begin_baseline")

    def _prepare_ended(self, result) -> None:
        self.prepared = result.exit_code == 0
        if self.machines.daemon.state != "preparing":  # paused meanwhile: go on (or prepare again) on resume
            return
        if not self.prepared:
            lines = result.log_tail.strip().splitlines()
            self.block(f"prepare failed: {lines[-1] if lines else 'exit ' + str(result.exit_code)}")
            return
        self.prepared_go_on()

    def block(self, reason: str, retry_after: float | None = None) -> None:
        delay = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._failures += 1
        self._proposer_answered = False
        d = self.machines.daemon
        if ("block", d.state) in LEGAL["daemon"]:
            d.fire("block", reason=reason, retry_at=utc_iso(time.time() + delay))

    # ------------------------------------------------------------------ proposing

    def _ask(self, exp: Experiment) -> None:
        """Ask the proposer for experiment `exp` (in a worker thread: the pool)."""
        if not self._proposer_answered and self.pool.busy():
            return  # the first proposal after a start or a block runs alone: a bad key costs one request
        proposer = self.d.make_proposer(self.cfg)
        edits = bool(getattr(proposer, "edits_worktree", False))
        lane = "command" if edits else "memory"  # the pool runs one worktree editor at a time
        if not self.pool.may_start(lane) or (edits and self._editing is not None):
            return  # (the last one's outcome, ready or not, is taken first: it restores the worktree)
        best = self.state.best_commit
        if edits:  # an agent CLI edits the human's worktree: it starts from the best
            head = self.ws.head()
            if head != best:
                # Only an agent CLI's own commit, left by a crash while it ran, puts HEAD elsewhere
                # here (ours never touch it): kept reachable, like a rejected one, then rolled back.
                self.ws.set_rejected_ref(exp.n, head)
            if head != best or self.ws.branch != self.d.branch \
                    or [p for p in self.ws.changes().paths if p not in HUMAN_FILES]:
                self.d.reset(best)
        if not self._check_model():  # the config now names another model, and it is retired
            return
        human = self.d.human_files()
        ctx = self._context(exp.n, edits)
        self._asked[exp.n] = (best, human, ctx, proposer.name)
        if edits:
            self._editing = exp.n
        self.pool.want(exp.n, ctx, lane)

    def _proposal_ready(self, n: int, outcome) -> None:
        self._take_proposal(n, outcome)
        exp = self.state.experiments.get(n)
        if exp is not None and exp.terminal:
            self._finished(n)

    def _take_proposal(self, n: int, outcome) -> None:
        parent, human, ctx, name = self._asked.pop(n, (self.state.best_commit, {}, None, ""))
        if self._editing == n:
            self._editing = None
        exp = self.state.experiments.get(n)
        if exp is None or exp.state != "proposing":  # skipped or stopped meanwhile: dropped
            self._worktree_stale = True
            return
        model = self._exp_model(exp)
        proposal = outcome if isinstance(outcome, Proposal) else None
        error = None if proposal is not None else outcome
        if proposal is not None or isinstance(error, NoEdit):
            self._proposer_answered = True
        if isinstance(error, NoEdit):
            self._spend(model, error)
            if self.cfg.proposer.fallback == "reject" or name == "offline":
                model.fire("reject", reason=f"no edit: {error.reason}")
                if name == "offline":
                    self._search_exhausted(error)
                self._worktree_stale = True
                return
            self.d.reset(parent)  # whatever the agent left behind
            try:
                proposal = self.d.make_proposer(self.cfg, "offline").propose(ctx)
            except NoEdit as fallback_error:
                model.fire("reject", reason=f"no edit: {error.reason}; offline fallback: {fallback_error.reason}")
                return
            proposal.meta.update(fallback_from=name, fallback_reason=error.reason)
        elif isinstance(error, ProposerUnavailable):
            self._spend(model, error)
            auth = isinstance(error, ProposerAuthError)
            self._worktree_stale = True
            self.block(f"{'API key rejected' if auth else 'proposer unavailable'}: {error.reason}",
                       retry_after=600 if auth else error.retry_after)
            return
        elif error is not None:
            self._worktree_stale = True
            self.block(f"proposer failed: {type(error).__name__}: {error}")
            return
        violations = self._scope_violations(proposal, parent, human)
        if violations:
            extra = {}
            head = self.ws.head()
            if head != parent:  # the agent's own commit: kept reachable, never on the branch
                self.ws.set_rejected_ref(n, head)
                extra["agent_commit"] = head
            model.fire("reject", reason="out of scope: " + "; ".join(violations[:10]),
                       description=proposal.description, **extra)
            self.d.restore_human_files(human)  # give the human's files back if an agent CLI touched them
            self._worktree_stale = True
            return
        files = proposal.files if proposal.files is not None else self.ws.read_files()
        model.fire("proposed", description=" ".join(proposal.description.split())[:300], files=files,
                   proposer=proposal.proposer, usage=proposal.usage, cost_usd=proposal.cost_usd,
                   meta=proposal.meta, parent=parent)
        if proposal.files is None:
            self._worktree_stale = True  # the agent's edit is recorded: the worktree goes back to the best
            self._sync_worktree()
        self._commit(self.state.experiments[n])

    def _spend(self, model, error) -> None:
        if any(error.usage.values()) or error.cost_usd:
            model.fire("spend", usage=error.usage, cost_usd=error.cost_usd, reason=error.reason)

    def _search_exhausted(self, error: NoEdit) -> None:
        """The offline search has nothing left to try: no new experiment; the loop ends (exhausted)
        once those in flight have ended."""
        if not self._wind_down:
            self._wind_down = f"offline search exhausted: {error.reason}"

    def _scope_violations(self, proposal: Proposal, parent: str, human: dict[str, bytes]) -> list[str]:
        """The scope guard: only the editable files may differ from the parent, and only by a
        proposer that edits the worktree itself (in-memory proposals must leave it untouched)."""
        violations = []
        if proposal.files is None:
            changes = self.ws.changes(base=parent)
            violations = [str(v) for v in self.ws.scope_violations(changes) if v.path not in HUMAN_FILES]
            if self.ws.branch != self.d.branch:
                violations.insert(0, f"left the branch {self.d.branch} (HEAD is "
                                     f"{self.ws.branch or 'detached'})")
            for p, data in human.items():
                path = self.d.root / p
                if not path.exists() or path.read_bytes() != data:
                    violations.append(f"modified: {p}")
        else:
            violations += [f"not editable: {p}" for p in proposal.files if p not in self.cfg.run.editable]
        return violations

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
        self.d.watchdog.tick()
        try:
            info = lookup_model(self.cfg.anthropic)
        except ProposerAuthError as exc:
            self.block(f"API key rejected: {exc.reason}", retry_after=exc.retry_after)
            return False
        except ProposerUnavailable as exc:
            info = {"id": model, "lifecycle": "unknown", "error": exc.reason}
        self.machines.daemon.fire("note", kind="model", model=model, **info)
        lifecycle = info["lifecycle"]
        if lifecycle == "retired":
            self.block(f"model {model} is retired (Models API): set anthropic.model in "
                       f"{config_mod.CONFIG_NAME} to a current model, e.g. {config_mod.AnthropicConfig.model}",
                       retry_after=600.0)
            return False
        if lifecycle != "active":
            log.warning(f"model {model} is {lifecycle}",
                        **{k: info[k] for k in ("retires_at", "error") if info.get(k)})
        self._model_checked = model
        return True

    def _context(self, n: int, edits_worktree: bool = False):
        from .proposers.base import HistoryRow, ProposalContext
        from .daemon import harness_dir

        st = self.state
        rows = [HistoryRow(e.n, "baseline" if e.kind == "baseline" else e.state, e.metric,
                           _history_description(e), e.commit, e.files, self._change(e))
                for e in sorted(st.experiments.values(), key=lambda e: e.n) if e.terminal]
        in_flight = tuple(InFlight(e.n, e.state, e.description, e.files, self._change(e, live=True))
                          for e in st.in_flight() if e.n != n and e.kind != "baseline")
        failure = st.experiments.get(st.last_failure_n) if st.last_failure_n is not None else None
        kind = self.cfg.proposer.kind
        deadline_s = {"anthropic": self.cfg.anthropic.deadline_seconds,
                      "command": self.cfg.command.deadline_seconds}.get(kind, 60.0)
        best = st.best_commit
        # What the proposal starts from: the best (the worktree, for one that edits it: reset to it).
        files = self.ws.read_files() if edits_worktree or not best else self.ws.files_at(best)
        return ProposalContext(
            workspace=self.d.root, n=n, program=self.d.program_text, editable=self.cfg.run.editable,
            files=files, history=tuple(rows), best_metric=st.best_metric,
            direction=self.cfg.run.direction, last_failure=failure.log_tail if failure else None,
            harness_dir=harness_dir(self.cfg), deadline=time.monotonic() + deadline_s, in_flight=in_flight)

    def _change(self, exp: Experiment, live: bool = False) -> str:
        """What an experiment changed against its parent, for the prompt (cached once it has a
        commit: a commit's change never changes; '' when unknown)."""
        if exp.n in self._changes:
            return self._changes[exp.n]
        text = ""
        if exp.kind in TRIALS and exp.parent and (exp.commit or exp.files):
            try:
                after = self.ws.files_at(exp.commit) if exp.commit else exp.files
                text = change_summary(self.ws.files_at(exp.parent), after)
            except Exception:  # noqa: BLE001 - a commit git no longer has: the change is unknown
                text = ""
        if exp.commit or not live:
            self._changes[exp.n] = text
        return text

    # ------------------------------------------------------------------ committing

    def _commit(self, exp: Experiment) -> None:
        """Commit the recorded proposal onto its parent, off the worktree (git plumbing)."""
        model = self._exp_model(exp)
        files = exp.files
        parent = exp.parent or self.state.best_commit
        at_parent = self.ws.files_at(parent, list(files))
        if all(at_parent.get(p) == text for p, text in files.items()):
            model.fire("reject", reason="the proposal changes nothing")
            return
        full = {**self.ws.files_at(parent), **files}
        same = self._duplicate_of(full, exp.n)
        if same is not None:
            model.fire("reject", reason=f"duplicate of experiment {same}: the same editable files "
                                        "(by hash) already ran or are running; not run again")
            return
        sha = self.ws.exp_ref(exp.n)
        others = self._other_parents(exp)
        if not (sha and self.ws.commit_matches(sha, files, parent=parent, parents=others)):
            sha = self.ws.commit_files(files, parent, f"exp {exp.n}: {exp.description or 'proposal'}",
                                       parents=others)
            self.ws.set_exp_ref(exp.n, sha)
        added, removed = self.ws.numstat(parent, sha)
        model.fire("commit", commit=sha, parent=parent, added=added, removed=removed,
                   hashes={p: sha256_hex(t.encode()) for p, t in files.items()})

    def _other_parents(self, exp: Experiment) -> list[str]:
        """A merge's commit parents after its first (the merged experiment's commit)."""
        return [self.state.experiments[p].commit for p in exp.parents[1:]
                if p in self.state.experiments and self.state.experiments[p].commit]

    def _duplicate_of(self, files: dict[str, str], n: int) -> int | None:
        """An experiment that already ran, or is running, exactly these editable files.

        Compared by git blob id, so no old content is read. Counted: those that ran to an
        outcome (kept, discarded with a metric, crashed) and those committed and in flight; a
        skipped or rejected one never measured anything."""
        editable = tuple(self.cfg.run.editable)
        wanted = tuple(blob_sha(files[p]) if p in files else None for p in editable)
        for e in sorted(self.state.experiments.values(), key=lambda e: e.n):
            ran = e.state == "crashed" or (e.state in ("kept", "discarded") and e.metric is not None) \
                or (e.state in ("committed", *RUNNING, "judging") and e.kind in TRIALS)
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

    # ------------------------------------------------------------------ running

    def _launch(self, exp: Experiment, slot: int) -> None:
        human = self.d.human_files()
        # The run's own checkout of its commit: the human's worktree, .git and the state
        # directory are not the run's to see (under bwrap) or to be its working directory.
        checkout = self.ws.run_checkout(slot, exp.commit, extra=human)
        for path, digest in exp.hashes.items():
            try:
                actual = sha256_hex((checkout / path).read_bytes())
            except OSError:
                actual = "missing"
            if actual != digest:
                self._exp_model(exp).fire("reject", reason=f"{path} changed between commit and launch")
                return
        self._start_run(exp, "launch", slot, checkout)

    def _start_run(self, exp: Experiment, trigger: str, slot: int, checkout: Path | None = None) -> None:
        if checkout is None:
            checkout = self.ws.run_checkout(slot, exp.commit, extra=self.d.human_files())
        attempt = exp.runs + 1
        log_path = self.d.state_dir / "runs" / (f"{exp.n}.log" if attempt == 1 else f"{exp.n}-{attempt}.log")
        sb = self.cfg.sandbox
        kind, why = sandbox.expected(sb.mode)
        gpu = self._gpu(slot)
        self._exp_model(exp).fire(trigger, log=str(log_path.relative_to(self.d.root)), attempt=attempt,
                                  sandbox=kind, sandbox_why=why, slot=slot, device=self._device(gpu))
        if kind != "bwrap":
            log.warning("this run is not fully contained", experiment=exp.n, sandbox=kind, why=why)
        layout = sandbox.Layout(checkout=checkout, hide=(self.d.root, Path(self.ws.repo.common_dir)),
                                read_only=self.d.run_read_only(), conceal=self.d.hidden_from_training(),
                                home=os.environ.get("HOME") or "/tmp/home")
        self._submit(exp.n, slot, RunSpec(
            argv=tuple(self.cfg.run.argv), cwd=str(checkout), log_path=str(log_path),
            deadline_s=self.cfg.run.hard_deadline, log_max_bytes=self.cfg.run.log_max_bytes, sandbox=sb,
            layout=layout, metric_regex=self.cfg.run.metric_regex,
            memory_regex=self.cfg.run.memory_regex or None, env=self.d.run_env(),
            gpu=gpu, tag=self.d.run_tag(exp.n)))

    def _gpu(self, slot: int) -> str | None:
        return self.slot_gpus[slot] if slot < len(self.slot_gpus) else None

    def _device(self, gpu: str | None) -> dict:
        """Where a run on this slot runs, for its events (runs on different GPU models do not compare)."""
        if self.remote:  # the node and its GPUs are known when the run ends: the finish's `node`
            r = self.cfg.ray
            return {"kind": "ray", "num_gpus": r.num_gpus, "accelerator_type": r.accelerator_type or None}
        if gpu is not None:
            found = gpus.find(self.visible, gpu)
            return gpus.device_of(found) if found is not None else {"kind": "cuda", "id": gpu}
        if self.visible:  # one slot: the run sees every visible GPU
            return {**gpus.device_of(self.visible[0]), "count": len(self.visible)}
        return gpus.device_of(None)

    def _submit(self, key, slot: int, spec: RunSpec) -> None:
        self.executor.submit(key, spec)
        self._slot_runs[slot] = key
        self.d.send_status()

    def _run_ended(self, key, result) -> None:
        for slot, k in list(self._slot_runs.items()):
            if k == key:
                del self._slot_runs[slot]
        if key == PREPARE:
            self._prepare_ended(result)
            return
        exp = self.state.experiments.get(key)
        if exp is None or exp.state not in RUNNING:  # skipped or stopped meanwhile: not recorded
            kill_tagged(self.d.run_tag(key))  # whatever of it escaped its process group
            return
        model = self._exp_model(exp)
        if result.lost:  # its node or worker died: not the experiment's fault; it runs again
            model.fire("interrupt", reason=result.lost, graceful=True, node=result.where or None)
            return  # retried by this turn's _decide, once every result of this poll is recorded
        node = {"node": result.where} if result.where else {}
        if exp.state == "training":
            evaluated = self.d.eval_argv() is not None and not run_failure(
                {"exit_code": result.exit_code, "signal": result.signal, "timed_out": result.timed_out,
                 "killed": result.killed, "duration_s": result.duration_s}, need_metric=False)
            model.fire("trained" if evaluated else "finish", exit_code=result.exit_code, signal=result.signal,
                       timed_out=result.timed_out, killed=result.killed, metric=_finite_or_none(result.metric),
                       metric_text=None if result.metric is None else repr(result.metric),
                       memory_gb=result.memory_gb, duration_s=round(result.duration_s, 3),
                       log_tail=result.log_tail[-4000:], log_truncated=result.log_truncated,
                       sandbox=result.sandbox, **node)
        else:  # evaluating
            failure = run_failure({"exit_code": result.exit_code, "signal": result.signal,
                                   "timed_out": result.timed_out, "killed": result.killed,
                                   "metric": _finite_or_none(result.metric),
                                   "metric_text": None if result.metric is None else repr(result.metric),
                                   "duration_s": result.duration_s})
            if failure:
                reason = _fail_line(result.log_tail)
                failure = f"evaluation: {reason}" if reason else f"evaluation failed: {failure}"
            model.fire("evaluated", exit_code=result.exit_code, signal=result.signal, timed_out=result.timed_out,
                       killed=result.killed, metric=_finite_or_none(result.metric),
                       duration_s=round(result.duration_s, 3), log_tail=result.log_tail[-4000:],
                       failure=failure, sandbox=result.sandbox, **node)
        # Judged by this turn's _decide, once every result of this poll is recorded: advancing
        # now would take a run whose result is next in the list for lost.

    def _start_evaluation(self, exp: Experiment) -> None:
        """The evaluation step, in a sandbox of its own: the run's checkout read-only, the human's
        config and evaluation files put back over whatever the run left, the validation split
        visible. Started afresh after a restart (the run's outputs are still in its checkout)."""
        model = self._exp_model(exp)
        if exp.evaluations > self.cfg.limits.max_interrupts:
            model.fire("evaluated", exit_code=None, metric=None, duration_s=0.0, log_tail="",
                       failure=f"evaluation interrupted {exp.evaluations} times")
            return
        slot = exp.slot or 0
        if slot in self._slot_runs:
            return  # its checkout is still in use by a run being killed: next turn
        checkout = self.d.state_dir / "slots" / str(slot)  # as the training run left it
        # The human's evaluation files: from the best commit (the baseline's own commit is the human's).
        best = self.state.best_commit or (exp.commit if exp.kind == "baseline" else self.ws.best())
        files = {p: data for p in self.cfg.eval.files if (data := self.ws.blob_at(best, p)) is not None}
        missing = [p for p in self.cfg.eval.files if p not in files]
        files.update(self.d.human_files())
        if checkout.is_dir():
            for rel, data in files.items():
                _place(checkout, rel, data)
        attempt = exp.evaluations + 1
        log_path = self.d.state_dir / "runs" / (f"{exp.n}-eval.log" if attempt == 1 else f"{exp.n}-eval-{attempt}.log")
        sb = self.cfg.sandbox
        kind, why = sandbox.expected(sb.mode)
        model.fire("evaluate", log=str(log_path.relative_to(self.d.root)), attempt=attempt, sandbox=kind,
                   sandbox_why=why, files={p: sha256_hex(files[p]) for p in self.cfg.eval.files if p in files},
                   missing=missing)
        layout = sandbox.Layout(checkout=checkout, hide=(self.d.root, Path(self.ws.repo.common_dir)),
                                read_only=self.d.run_read_only(), writable=False,
                                home=os.environ.get("HOME") or "/tmp/home")
        argv = self.d.eval_argv()
        if not checkout.is_dir():  # the run's outputs are gone: nothing to evaluate
            argv = [sys.executable, "-c", "print('FAIL: the run\\'s checkout is gone'); raise SystemExit(2)"]
        gpu = self._gpu(slot)
        self._submit(exp.n, slot, RunSpec(
            argv=tuple(argv), cwd=str(checkout if checkout.is_dir() else self.d.state_dir), log_path=str(log_path),
            deadline_s=self.cfg.eval.deadline_seconds or self.cfg.run.hard_deadline,
            log_max_bytes=self.cfg.run.log_max_bytes, sandbox=sb, layout=layout,
            metric_regex=self.cfg.run.metric_regex, memory_regex=None, env=self.d.run_env(),
            gpu=gpu, tag=self.d.run_tag(exp.n)))

    # ------------------------------------------------------------------ judging

    def _judge(self, exp: Experiment) -> None:
        verdict = judge(exp, self.state, self.cfg)
        model = self._exp_model(exp)
        if verdict.trigger == "rerun":  # a noise run of the baseline, in the same slot
            slot = exp.slot or 0
            if slot in self._slot_runs or self.machines.daemon.state not in ("running", "baseline"):
                return
            self._start_run(exp, "rerun", slot)
            return
        if verdict.trigger == "fail":
            model.fire("fail", **verdict.payload())
            self.session_outcomes += 1  # an outcome in this invocation (--max-experiments)
            self.machines.forget(exp.n)
            exp = self.state.experiments[exp.n]
            if self.machines.daemon.state == "baseline":
                self.block(f"baseline run failed ({exp.failed_runs}x): {exp.failure}")
            return
        model.fire(verdict.trigger, **verdict.payload())  # a merge it owes is queued by _fill

    def _queue_merge(self, base: str, commit: str, n: int | None) -> None:
        """Gains found side by side compose: the change from `base` to `commit` (experiment n's)
        three-way merged onto the best. If it applies cleanly and changes the best, the merge is an
        experiment of its own (kind "merge", no proposer call), judged like any other. Either way
        the decision is recorded (a merge's start, or a note that it does not apply): it is owed
        until then, across restarts."""
        best, best_n = self.state.best_commit, self.state.best_n
        if self.machines.daemon.state != "running" or self._wind_down or not best:
            return
        changed = self._merged_change(base, commit, n)
        if not changed:
            self.machines.daemon.fire("note", kind="merge_refused", commit=commit, experiment_merged=n,
                                      reason="conflicts with the best" if changed is None else "nothing to add")
            return
        new = self.state.next_n()
        self.machines.experiment(new).fire("start", kind="merge", proposer="merge", parents=[best_n, n],
                                           parent=best, merging=[base, commit])
        self._propose_merge(self.state.experiments[new], changed)

    def _merged_change(self, base: str, commit: str, n: int | None) -> dict[str, str] | None:
        """The editable files the change from `base` to `commit` alters when merged onto the best
        ({} when it adds nothing, None when it conflicts)."""
        best = self.state.best_commit
        if commit == best:
            return {}
        merged = self.ws.merge_files(base, best, commit, self.cfg.run.editable)
        if merged is None:
            log.info("no merge: the change conflicts with the best", experiment=n)
            return None
        at_best = self.ws.files_at(best)
        return {p: t for p, t in merged.items() if at_best.get(p) != t}

    def _propose_merge(self, merge: Experiment, changed: dict[str, str] | None = None) -> None:
        """Record merge experiment `merge`'s change. After a kill between its start and this, the
        change is computed again, onto the best as it is now."""
        model = self._exp_model(merge)
        base, commit = (merge.merging + [None, None])[:2]
        n = merge.parents[-1] if merge.parents else None
        if changed is None:
            changed = self._merged_change(base, commit, n) if base and commit else None
        if not changed:
            model.fire("reject", reason="the merge was cut short before its change was recorded, "
                                        "and the change no longer merges onto the best")
            return
        other = self.state.experiments.get(n) if n is not None else None
        what = other.description if other is not None else commit[:7]
        best_n = self.state.best_n
        model.fire("proposed", description=f"merge of exp {n} into the best (exp {best_n}): {what}"[:300],
                   files=changed, proposer="merge", usage={}, cost_usd=0.0, meta={"merge_of": [best_n, n]},
                   parent=self.state.best_commit)

    # ------------------------------------------------------------------ endings

    def _finished(self, n: int) -> None:
        """The side effects of experiment n's outcome (once, whoever sees it first)."""
        if n in self._settled:
            return
        self._settled.add(n)
        self.machines.forget(n)
        self._asked.pop(n, None)
        exp = self.state.experiments[n]
        self.d.checkpoint()  # the outcome is in the main file and anchored before its side effect
        if exp.kind in TRIALS:
            self.session_outcomes += 1  # --max-experiments counts outcomes, re-runs included
        if exp.kind in TRIALS or exp.state == "kept":
            self._failures = 0  # the loop made progress: a later block starts the backoff afresh
        if exp.state == "kept":
            if self.ws.best() != exp.commit:
                self.ws.set_best(exp.commit)
            self._worktree_stale = True  # the branch and the human's worktree move to it
        elif exp.proposer == "command" and not exp.commit:
            self._worktree_stale = True  # whatever the agent left behind
        self._sync_worktree()
        if exp.kind == "baseline":
            d = self.machines.daemon
            if exp.state == "kept":
                sigma = statistics.stdev(exp.metrics) if len(exp.metrics) > 1 else None
                threshold = max(self.cfg.judge.min_delta, 2 * sigma if sigma else 0.0)
                d.fire("baseline_done", n=exp.n, commit=exp.commit, metric=exp.metric, sigma=sigma,
                       threshold=threshold)
            elif d.state == "baseline":
                self.block(f"baseline run failed: {exp.reason}")

    def _sync_worktree(self) -> None:
        """The human's worktree (and the branch) at the best, unless an agent CLI is editing it."""
        if self._editing is not None:
            return  # put back once the agent is done
        self._worktree_stale = False
        base = self.state.adopted or self.state.best_commit or self.ws.best()
        if base and (self.ws.head() != base or self.ws.branch != self.d.branch
                     or [p for p in self.ws.changes().paths if p not in HUMAN_FILES]):
            self.d.reset(base)

    def _resume_interrupted(self, exp: Experiment) -> None:
        model = self._exp_model(exp)
        if exp.interrupts > self.cfg.limits.max_interrupts:
            model.fire("give_up", reason=f"interrupted {exp.interrupts} times")
        elif exp.commit:
            model.fire("retry", attempt=exp.runs + 1)
        elif self._commit_lost(exp):
            # Its commit exists but the log lost the events after its start (repair): a new
            # proposal must not take its number, and the ref is never moved.
            model.fire("give_up", reason=f"its events after the start were lost; its commit is kept at "
                                         f"refs/autoresearch/exp/{exp.n}")
        else:
            model.fire("repropose")

    def _commit_lost(self, exp: Experiment) -> bool:
        """Git holds experiment `exp`'s commit although the log records no commit, and the log
        has no proposal that commit is known to be (then `_commit` would reuse it)."""
        ref = self.ws.exp_ref(exp.n)
        if ref is None:
            return False
        return exp.files is None or not self.ws.commit_matches(
            ref, exp.files, parent=exp.parent or self.state.best_commit, parents=self._other_parents(exp))

    # ------------------------------------------------------------------ requests

    def accept_skip(self, rid: str, target: int | None, seen: list[int] | None) -> str:
        """Take a skip request: `target` one experiment; None = every experiment in flight (those
        the person saw, when the CLI says which). '' or why it does not apply."""
        live = {e.n: e for e in self.state.in_flight()}
        if target is not None:
            exp = live.get(target)
            if exp is None:
                return f"experiment {target} is not in flight" if target not in self.state.experiments \
                    else f"experiment {target} already ended"
            targets = [exp]
        else:
            targets = [e for n, e in live.items() if seen is None or n in seen]
            if not targets:
                return "no experiment in flight" if not live else "the experiments you saw already ended"
        if self.d.stop_request:
            return f"the daemon is stopping (request {self.d.stop_request})"
        taken = []
        why = ""
        for exp in targets:
            if exp.kind == "baseline":
                why = "the baseline cannot be skipped: every experiment is judged against it"
            elif ("skip", exp.state) not in LEGAL["experiment"]:
                why = f"experiment {exp.n} is {exp.state}"
            elif any(n == exp.n for _, n in self._skips):
                why = f"experiment {exp.n} is already being skipped"
            else:
                taken.append(exp.n)
        if not taken:
            return why
        for n in taken:
            self._skips.append((rid, n))
            if n in self.executor.running():
                self.executor.cancel(n, "skip")
            self.pool.cancel(n)
        return ""

    def _apply_skips(self) -> None:
        skips, self._skips = self._skips, []
        for rid, n in skips:
            exp = self.state.experiments[n]
            if exp.terminal or ("skip", exp.state) not in LEGAL["experiment"]:
                self.machines.daemon.fire("note", kind="request", request=rid, action="skip",
                                          outcome=f"ignored: experiment {n} already ended")
                continue
            self._exp_model(exp).fire("skip", reason="skipped by user", request=rid)
            self._finished(n)

    def stop_now(self) -> None:
        """Stop: every run killed (bounded wait), every experiment in flight interrupted (a graceful
        interruption: re-run at the next start, never counted against max_interrupts)."""
        self._apply_skips()  # a skip asked before the stop is honoured, not turned into a re-run
        self.pool.close()
        self.executor.shutdown("stop")
        self._slot_runs.clear()
        why = self.d.stop_reason or "stop requested"
        for exp in self.state.in_flight():
            if exp.state == "judging":
                self._judge(exp)  # recorded already: judged now rather than at the next start
                exp = self.state.experiments[exp.n]
                if exp.terminal:
                    self._finished(exp.n)
                    continue
            if exp.state not in ("interrupted", "evaluating"):  # evaluating: runs again at the next start
                self._exp_model(exp).fire("interrupt", reason=f"daemon stopping ({why})", graceful=True)
        self._worktree_stale = True
        self._sync_worktree()

    def kill_all(self) -> None:
        """The process is exiting (a failure): no run may outlive it."""
        self.pool.close()
        self.executor.shutdown("stop", timeout=5.0)

    # ------------------------------------------------------------------ views

    def runs(self) -> dict[int, tuple[float, Path]]:
        """Runs in flight: experiment -> (seconds since launch, its log)."""
        now = time.monotonic()
        return {k: (now - info.started, Path(info.log_path)) for k, info in self.executor.running().items()}
