"""Shared by the crash matrix, the soak and bench/chaos.py: the invariant checker and helpers.

`check_invariants(root)` returns the list of violated invariants (issues 6 and 12), empty when all hold:
  1. `verify` passes (gap-free sequence, intact hash chain, the log reaches its git anchors);
  2. the folded state agrees with git: HEAD is the best commit (or a person's adopted one: the
     human's worktree stays at the best, runs have their own checkouts under
     .autoresearch/slots/<k>), every recorded experiment ref exists and matches, the best ref is
     the last kept commit (a kept merge moves it like any experiment); an experiment still
     evaluating has its slot's checkout at its commit;
  3. every experiment has exactly one terminal event, as its last event (or none, where repair
     recorded a gap after its last event); numbers are contiguous (except a jump the log records:
     numbers git had taken); at no point of the history were more than slots.count +
     slots.lookahead experiments in flight (queued merges aside), nor two runs holding one slot,
     nor a run in a slot beyond the count;
  4. `autoresearch results` prints exactly report.results_tsv(fold(log));
  5. no process carrying the workspace's run tag (or a run's `<tag>.<n>`) survives; no git lock file is left;
  6. (with an `ApiLog`) no API request for an experiment after its `proposed` event was recorded.
"""

from __future__ import annotations

import re
import os
import subprocess
import threading
import time
from pathlib import Path

from autoresearch import config as config_mod, gpus
from autoresearch.clock import parse_utc
from autoresearch.eventlog import verify_path
from autoresearch.report import results_tsv
from autoresearch.state import RUNNING, TERMINAL, TRIALS, State, apply, fold
from autoresearch.workspace import HUMAN_FILES

from daemon_fixtures import cli, events, tagged_processes

# A command proposer (an "agent CLI") whose edit depends on the experiment number in its
# prompt, so a scenario can reach reject, crash and discard deterministically:
#   exp 1: creates a file outside scope (reject); exp 2: a syntax error (crash);
#   exp 3: a worse constant (discard); later: a better constant each time (keep).
SCRIPTED_AGENT = r'''
import pathlib, re, sys
n = int(re.search(r"^# Experiment (\d+)", sys.stdin.read(), re.M).group(1))
train = pathlib.Path("train.py")
text = train.read_text()
if n == 1:
    pathlib.Path("notes.txt").write_text("not in scope\n")
elif n == 2:
    train.write_text(text + "\nthis line is not python\n")
elif n == 3:
    train.write_text(re.sub(r"^WARMUP = .*$", "WARMUP = 0.9", text, flags=re.M))
else:
    train.write_text(re.sub(r"^WARMUP = .*$", f"WARMUP = {0.1 - 0.01 * n:.4f}", text, flags=re.M))
print(f"scripted edit for experiment {n}")
'''


class ApiLog:
    """Wraps a fake-Anthropic responder and notes (experiment n, wall time) of every request."""

    def __init__(self, respond):
        self.respond = respond
        self.calls: list[tuple[int, float]] = []
        self._lock = threading.Lock()

    def __call__(self, req):
        n = int(re.search(r"^# Experiment (\d+)", req.text(0), re.M).group(1))
        with self._lock:
            self.calls.append((n, time.time()))
        return self.respond(req)


def _git(root: Path, *args: str) -> str | None:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def check_invariants(root: Path, api: ApiLog | None = None) -> list[str]:
    root = Path(root)
    problems: list[str] = []
    report = verify_path(root / ".autoresearch" / "events.sqlite", anchors(root))
    if not report.ok:
        problems.append(f"1 verify: {report}")
    evs = events(root)
    st = fold(evs)

    # 2. git agrees with the fold. The human's worktree stays at the best: runs have their own checkouts.
    head = _git(root, "rev-parse", "HEAD")
    best_ref = _git(root, "rev-parse", "--verify", "-q", "refs/autoresearch/best")
    if head not in {st.best_commit, st.adopted} - {None}:
        problems.append(f"2 HEAD {head} is not the best {st.best_commit} (adopted: {st.adopted})")
    last_kept = None
    for e in evs:  # the best moves on baseline_done, on a kept experiment or merge, on an adopted user
        # commit (one that changes more than the human's files: only once its baseline is done)
        if e.trigger == "baseline_done" or (e.trigger == "note" and e.payload.get("kind") == "adopted_user_commit"
                                            and not e.payload.get("remeasure")):
            last_kept = e.payload["commit"]
        elif e.trigger == "keep" and st.experiments[e.experiment].kind in TRIALS:
            last_kept = st.experiments[e.experiment].commit
    if best_ref != st.best_commit or (last_kept is not None and best_ref != last_kept):
        problems.append(f"2 best ref {best_ref} vs folded best {st.best_commit} vs last kept {last_kept}")
    for exp in st.experiments.values():
        if exp.kind in TRIALS and exp.commit:
            ref = _git(root, "rev-parse", "--verify", "-q", f"refs/autoresearch/exp/{exp.n}")
            if ref != exp.commit:
                problems.append(f"2 exp {exp.n}: ref {ref} != recorded commit {exp.commit}")
    for exp in st.in_flight():  # left evaluating by a stop: evaluated again from its run's checkout
        if exp.state == "evaluating":
            slot = root / ".autoresearch" / "slots" / str(exp.slot or 0)
            at = _git(slot, "rev-parse", "HEAD") if slot.is_dir() else None
            if at != exp.commit:
                problems.append(f"2 exp {exp.n} evaluating: slot {exp.slot} checkout at {at}, not {exp.commit}")
    # The human's files (program.md, the config) are theirs to edit at any time; nothing else may differ.
    dirty = [line for line in (_git(root, "status", "--porcelain") or "").splitlines()
             if line.split(maxsplit=1)[-1] not in HUMAN_FILES]
    if dirty:
        problems.append(f"2 worktree not clean: {dirty!r}")

    # 3. one terminal state each, none counted twice, none vanished.
    ns = sorted(st.experiments)
    floors = {e.payload["next_n"] for e in evs if e.trigger == "note" and e.payload.get("kind") == "numbering"}
    for a, b in zip([-1] + ns, ns):
        if b != a + 1 and b not in floors:
            problems.append(f"3 experiment numbers not contiguous: {ns}")
            break
    by_exp: dict[int, list] = {}
    for e in evs:
        if e.experiment is not None:
            by_exp.setdefault(e.experiment, []).append(e)
    for n, seq in by_exp.items():
        ends = [e for e in seq if e.dest in TERMINAL]
        if len(ends) > 1 or (ends and ends[-1] is not seq[-1]):
            problems.append(f"3 exp {n}: terminal events {[e.trigger for e in ends]} in {[e.trigger for e in seq]}")
    problems += _flight_problems(root, evs)

    # 4. results == the projection of the log.
    out = cli("results", str(root), timeout=60)
    if out.returncode != 0 or out.stdout != results_tsv(st):
        problems.append(f"4 results differ from the log's projection (rc {out.returncode}): {out.stderr[-300:]}")

    # 5. no survivor, no lock.
    alive = tagged_processes(root)
    if alive:
        problems.append(f"5 run processes survived: {alive}")
    locks = [str(p.relative_to(root)) for p in (root / ".git").rglob("*.lock")]
    if locks:
        problems.append(f"5 stale git locks: {locks}")

    # 6. a recorded reply is never requested again.
    if api is not None:
        for e in evs:
            if e.trigger == "proposed":
                later = [t for n, t in api.calls if n == e.experiment and t > parse_utc(e.time)]
                if later:
                    problems.append(f"6 exp {e.experiment}: {len(later)} API request(s) after `proposed`")
    return problems


def _flight_problems(root: Path, evs) -> list[str]:
    """Invariant 3 over the whole history, event by event: how many experiments were in flight at
    once, and which slot each run held. Read against the workspace's config as it is now."""
    try:
        cfg = config_mod.load(root)
    except Exception as exc:  # noqa: BLE001 - a config the test broke on purpose: say so, check the rest
        return [f"3 config unreadable, slots not checked: {exc}"]
    count = config_mod.slot_count(cfg, gpus.visible())
    most = count + cfg.slots.lookahead
    st, live, problems = State(), set(), []
    for e in evs:
        apply(st, e)
        if e.experiment is None:
            continue
        (live.discard if st.experiments[e.experiment].terminal else live.add)(e.experiment)
        # One whose terminal event repair could not keep (a gap after its last event) is not in flight.
        now = [st.experiments[n] for n in sorted(live)
               if not any(a > st.experiments[n].last_seq for a, _ in st.gaps)]
        trials = [x.n for x in now if x.kind == "experiment"]
        if len(trials) > most:
            problems.append(f"3 event {e.seq}: {len(trials)} experiments in flight {trials}, more than "
                            f"count {count} + lookahead {cfg.slots.lookahead}")
        held = [(x.slot or 0, x.n) for x in now if x.state in RUNNING]
        slots = [k for k, _ in held]
        if len(set(slots)) != len(slots) or any(k >= count for k in slots):
            problems.append(f"3 event {e.seq}: runs in flight (slot, experiment) {sorted(held)} with {count} slot(s)")
        if len(problems) >= 5:
            break  # the first few say it
    return problems


def anchors(root: Path) -> list[tuple[int, str]]:
    """(seq, hash) of every anchor of the log in git (refs/autoresearch/log), newest first."""
    out = _git(root, "log", "--first-parent", "--format=%B%x00", "refs/autoresearch/log") or ""
    found = []
    for body in out.split("\0"):
        fields = dict(line.split(": ", 1) for line in body.splitlines() if ": " in line)
        if "seq" in fields:
            found.append((int(fields["seq"]), fields["hash"]))
    return found


def exp_refs(root: Path) -> dict[str, str]:
    """refs/autoresearch/exp/* -> commit."""
    out = _git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/autoresearch/exp") or ""
    return dict(line.split() for line in out.splitlines())


def refs_overwritten(before: dict[str, str], root: Path) -> list[str]:
    """Experiment refs that moved or vanished since `before` (exp_refs taken earlier)."""
    after = exp_refs(root)
    return [f"{name}: {sha[:12]} -> {(after.get(name) or 'gone')[:12]}"
            for name, sha in before.items() if after.get(name) != sha]


def kept_or_discarded(root: Path) -> int:
    st = fold(events(root))
    return sum(1 for e in st.experiments.values() if e.kind in TRIALS and e.state in ("kept", "discarded"))


def git_killed_inside(workdir: Path, verb: str) -> dict:
    """A git that, the first time it runs `verb`, leaves what a kill -9 inside it leaves (git's
    locks; for reset, the worktree reset and HEAD not moved yet) and SIGKILLs the daemon."""
    marker = workdir / f"kill-in-{verb}"
    marker.write_text("")
    real = subprocess.run(["which", "git"], capture_output=True, text=True).stdout.strip()
    script = workdir / f"git-{verb}"
    action = ('for last in "$@"; do :; done\n      ' + real + ' show "$last:train.py" > train.py'
              if verb == "reset" else ': > "$gd/next-index-$$.lock"')
    script.write_text(f"""#!/bin/sh
if [ -e {marker} ]; then
  for a in "$@"; do
    if [ "$a" = {verb} ]; then
      rm -f {marker}
      gd=$({real} rev-parse --git-dir)
      {action}
      : > "$gd/index.lock"
      kill -9 $PPID
      exit 137
    fi
  done
fi
exec {real} "$@"
""")
    script.chmod(0o755)
    # GitPython's calls, and the plumbing run as `git` from PATH (gitsafe.run), both meet it.
    bindir = workdir / f"fake-git-{verb}"
    bindir.mkdir(exist_ok=True)
    (bindir / "git").unlink(missing_ok=True)
    (bindir / "git").symlink_to(script)
    return {"GIT_PYTHON_GIT_EXECUTABLE": str(script), "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
