"""Opening and boot: everything checked before a start, and the world reconciled with the log.

`Daemon._open` calls the checks (profile, workspace, preflight) before anything is written, so
that a refusal leaves no trace; `boot` runs once the lock is held and the machines exist: it
records the start, kills runs orphaned by a kill -9 of an earlier daemon, adopts a person's
commit, restores refs and numbering, interrupts what was cut short (every experiment in flight,
whatever slot it held) and puts the human's worktree back at the best.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from . import __version__, config as config_mod
from .errors import ConfigError, WorkspaceError
from .runner import kill_tagged, scrubbed_env
from .workspace import HUMAN_FILES, sha256_hex

if TYPE_CHECKING:
    from .daemon import Daemon

log = structlog.get_logger("autoresearch.daemon")



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


def rollback_under_way(d: "Daemon") -> bool:
    """The last event is an experiment's outcome, and the reset of the human's worktree after it
    may have been cut short: not kept (an agent CLI's leftovers rolled back), or kept and the
    worktree half-way to it (HEAD not moved yet, every changed file already the best's)."""
    if d.log is None or not d.state.seq:
        return False
    last = next(d.log.events(since=d.state.seq - 1), None)
    exp = d.state.experiments.get(last.experiment) if last is not None else None
    if exp is None or not exp.terminal:
        return False
    if exp.state != "kept":
        return True
    best = d.state.best_commit
    if not best or d.ws.head() == best:
        return False
    changed = [p for p in d.ws.changes().paths if p not in HUMAN_FILES]
    target = d.ws.files_at(best, changed)
    # Only what the reset itself writes: a person's own edit is never reset away.
    return bool(changed) and all(
        target.get(p) is not None and (d.root / p).is_file() and (d.root / p).read_text() == target[p]
        for p in changed)



def check_profile(d: "Daemon") -> None:
    old, new = d.state.profile, d.cfg.workload.profile
    if old and new and old != new:
        raise ConfigError(f"workload.profile changed from {old!r} to {new!r}: results would not be "
                          "comparable; start a new workspace instead")



def agent_leftovers_possible(d: "Daemon") -> bool:
    """Whether uncommitted changes may be an agent CLI's (it edits the worktree itself):
    it was proposing when we died (interrupted or not), or its experiment ended without a
    commit (rejected) and that end is the last event: we died before rolling it back."""
    if any(e.proposer == "command" and not e.commit for e in d.state.in_flight()):
        return True
    last = d.state.experiments.get(d.state.next_n() - 1)
    if last is None or last.proposer != "command" or last.commit or not last.terminal:
        return False
    tail = list(d.log.events(since=d.state.seq - 1)) if d.log is not None else []
    return bool(tail) and tail[-1].aggregate == f"experiment:{last.n}"



def preflight(d: "Daemon") -> None:
    """What can be checked before any run, so that a typo costs no baseline run: the commands'
    programs exist, and the offline proposer has constants to tune."""
    run = d.cfg.run
    for key, argv in (("prepare_command", run.prepare_argv), ("command", run.argv)):
        if not argv:
            continue
        program = argv[0]
        problem = _program_problem(program, d.root)
        if not problem and key == "command" and "/" in program and not Path(program).is_absolute() \
                and not d.ws.repo.git.ls_files("--", program):
            problem = f"{program}: not committed (a run sees only the files of its commit)"
        if problem:
            raise ConfigError(f"{config_mod.CONFIG_NAME}: run.{key}: {problem}; nothing was run")
    files = d.ws.read_files()  # the editable files are there (WorkspaceError if not)
    if d.cfg.proposer.kind == "offline" and d.state.current() is None:
        from .proposers.offline import find_constants
        if not any(find_constants(text, path) for path, text in files.items()):
            raise WorkspaceError(
                f"the offline proposer has nothing to tune: {', '.join(files)} has no top-level "
                "UPPERCASE numeric constant (like `LEARNING_RATE = 0.04`); add some, or set "
                "proposer.kind to anthropic or command")



def check_workspace(d: "Daemon") -> None:
    live = d.state.in_flight()
    ours = set(HUMAN_FILES) | (set(d.cfg.run.editable) if live else set())
    foreign = [p for p in d.ws.changes().paths if p not in ours]
    if agent_leftovers_possible(d):
        foreign = []  # an agent CLI's edits, from before we died: judged or rolled back
    if foreign:
        raise WorkspaceError(f"{d.root}: uncommitted changes the daemon did not make: "
                             f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}; "
                             "commit or stash them first")
    best = d.state.best_commit or d.ws.best() or d.ws.head()
    head = d.ws.head()
    known = {e.commit for e in d.state.experiments.values() if e.commit}
    known |= set(d.ws.all_exp_refs().values())  # ours, even where the log lost its events
    for cur in live:  # committed by us just before a crash, not yet in the log
        known.add(d.ws.exp_ref(cur.n))
        if cur.files is not None and d.state.best_commit and head != d.state.best_commit \
                and d.ws.commit_matches(head, cur.files, parent=cur.parent or d.state.best_commit):
            known.add(head)  # (logs from before slots: experiments were committed on the branch)
    if d.state.adopted:
        known.add(d.state.adopted)  # adopted before a restart, its baseline not measured yet
    d.adopt_head, d.adopt_remeasure = None, False
    if head != best and head not in known and agent_leftovers_possible(d):
        known.add(head)  # an agent CLI's own commit, from before we died: kept aside, rolled back
    if head != best and head not in known:
        # A person's own commit, made while no daemon ran: theirs, so it is adopted (never
        # refused, never reset away). Unless it changes only the human's files, the recorded
        # metric no longer describes the code: the baseline is measured again on it first.
        d.adopt_head = head
        d.adopt_remeasure = any(p not in HUMAN_FILES for p in d.ws.changed_paths(best, head))



def boot(d: "Daemon") -> None:
    st = d.state
    program_path = d.root / "program.md"
    program = program_path.read_bytes() if program_path.exists() else b""
    d.program_text = program.decode("utf-8", errors="replace")
    d.machines.daemon.fire(
        "boot", pid=os.getpid(), version=__version__, profile=d.cfg.workload.profile or st.profile,
        program_hash=st.program_hash or sha256_hex(program),
        config_hash=sha256_hex((d.root / config_mod.CONFIG_NAME).read_bytes()), branch=d.branch,
        **({"program_missing": True} if not program_path.exists() else {}),
        **({"overrides": d.overrides} if d.overrides else {}))
    if d.overrides:
        log.warning("config overridden for this run (autoresearch.toml unchanged)", overrides=d.overrides)
    if not program_path.exists():
        log.warning("program.md is missing (deleted or never committed): an agent gets no instructions "
                    "from you; restore it with `git checkout <commit> -- program.md` or write a new one")
    # Reconcile the world with the folded state.
    d.ws.clear_stale_locks()
    kill_tagged(d.run_tag())
    mine = d.adopt_head
    if mine:
        # A person's commit (see _check_workspace), recorded as such. With `remeasure`, best
        # moves to it only once its baseline is kept; until then it is `state.adopted`.
        d.machines.daemon.fire("note", kind="adopted_user_commit", commit=mine,
                                  previous=st.best_commit or d.ws.best(), remeasure=d.adopt_remeasure)
        log.warning(f"your commit {mine[:7]} is adopted: "
                    + ("the baseline is measured on it, then the loop goes on from it"
                       if d.adopt_remeasure else "it changes only your files; the loop goes on from it"))
    best = st.best_commit or d.ws.best() or d.ws.head()
    if d.ws.best() != best:
        d.ws.set_best(best)
    reconcile_numbers(d)
    head = d.ws.head()
    for cur in st.in_flight():
        # An evaluation in flight is simply run again (from the run's saved outputs), not the
        # run; a recorded run end is judged from the log. Anything else was cut short.
        if cur.state not in ("interrupted", "evaluating", "judging"):
            d.machines.experiment(cur.n, cur.state).fire(
                "interrupt", reason="daemon restarted while the experiment was in flight", graceful=False)
        if cur.proposer == "command" and not cur.commit and head not in (best, mine, st.adopted):
            d.ws.set_rejected_ref(cur.n, head)  # an agent CLI's own commit: kept reachable, rolled back
        if mine and cur.state in ("interrupted", "evaluating", "judging"):
            # It was made on the old code, which the person's commit replaced.
            exp = st.experiments[cur.n]
            m = d.machines.experiment(exp.n, exp.state)
            if exp.state != "interrupted":
                m.fire("interrupt", reason="superseded by your commit", graceful=True)
            m.fire("reject", reason=f"superseded by your commit {mine[:7]} (made while the daemon was stopped)")
            d.machines.forget(cur.n)
    base = st.adopted or best  # what the loop goes on from
    if d.ws.head() != base or d.ws.branch != d.branch \
            or [p for p in d.ws.changes().paths if p not in HUMAN_FILES]:
        d.reset(base)  # the human's worktree stays at the best: runs have their own checkouts
    if st.paused:
        # Paused before this restart or reboot: stay paused. Recorded here, before the
        # inbox is read, so that a `resume` queued while the daemon was down applies.
        d.machines.daemon.fire("pause", request="", restored=True)
        log.warning("paused before this start; waiting for `autoresearch resume`",
                    workspace=str(d.root))
    new_hash = sha256_hex(program)
    if st.program_hash and new_hash != st.program_hash:
        d.machines.daemon.fire("note", kind="program_changed", old_hash=st.program_hash,
                                  new_hash=new_hash, added=0, removed=0, while_stopped=True)



def reconcile_numbers(d: "Daemon") -> None:
    """Git holds evidence of every experiment: the log and git are checked against each other.

    A missing ref of a logged experiment is created; an existing ref is never moved; a ref
    (or an anchor) the log does not know is reported by name, kept, and its number taken:
    the next experiment is numbered above everything either knows.
    """
    st, refs = d.state, d.ws.all_exp_refs()
    for exp in st.experiments.values():
        if not exp.commit or exp.kind != "experiment":
            continue
        ref = refs.get(exp.n)
        if ref is None:
            d.ws.set_exp_ref(exp.n, exp.commit)
        elif ref != exp.commit:
            log.warning("experiment ref differs from the log; kept as it is", experiment=exp.n,
                        ref=f"refs/autoresearch/exp/{exp.n}", ref_commit=ref, logged_commit=exp.commit)
    unknown = [n for n in refs if n not in st.experiments]
    anchored = max((n for _, _, n in d.anchors if n is not None), default=-1)
    floor = max(max(refs, default=-1), anchored) + 1
    if unknown:
        log.warning("experiment refs the log does not know (kept; their numbers are not reused)",
                    refs=[f"refs/autoresearch/exp/{n}" for n in unknown])
    if floor > st.next_n():
        d.machines.daemon.fire("note", kind="numbering", next_n=floor,
                                  unknown_refs=[f"refs/autoresearch/exp/{n}" for n in unknown],
                                  anchored_experiment=anchored if anchored >= 0 else None)
