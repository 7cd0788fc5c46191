"""Loop overhead per experiment with an instant workload.

    python bench/loop.py [--experiments 40]

Runs the real daemon (offline proposer, real git, real runs, durable event
log) on a fixture whose train.py prints its metric at once, and reports, per
experiment, the wall time from one experiment's `start` event to the next
one's minus the run itself (the run's own duration as the runner measured
it). That is propose + commit + launch + judge + rollback + bookkeeping, less
what the daemon overlaps with the run: with `[slots] lookahead = 1` (the
default) the next proposal and its commit are made while a run trains, so
over the whole run it is the wall time per experiment minus the run.

Beside it, measured in the same run on the same disk: the bookkeeping of the original
autoresearch loop done by hand, per experiment, in a copy of the same workspace: edit
train.py, `git commit -am`, append a line to results.tsv, `git reset --hard HEAD~1` (a
discard), with the git CLI. Absolute times differ between machines; the target is the
ratio: the daemon's overhead (durable events, hash chain, proposer, sandboxed launch,
judging) <= 8 x that bare git bookkeeping.
"""

import argparse
import os
import shutil
import subprocess
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import structlog  # noqa: E402

from autoresearch.clock import parse_utc  # noqa: E402
from autoresearch.daemon import Daemon  # noqa: E402
from autoresearch.eventlog import EventLog  # noqa: E402
from daemon_fixtures import make_workspace  # noqa: E402


TARGET = 8.0


def git_bookkeeping(src: Path, cycles: int) -> list[float]:
    """Per cycle, ms: what the original loop does around a run, straight with the git CLI."""
    ws = src.parent / "by-hand"
    shutil.copytree(src, ws, ignore=shutil.ignore_patterns(".autoresearch"))
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=ws, env=env, check=True, stdout=subprocess.DEVNULL)

    train, out = ws / "train.py", []
    original = train.read_text()
    for i in range(cycles):
        t0 = time.perf_counter()
        train.write_text(f"{original}# change {i}\n")
        git("commit", "-q", "-am", f"change {i}")
        with open(ws / "results.tsv", "a") as fh:
            fh.write(f"{i}\t1.0\t0.5\tdiscard\tchange {i}\n")
        git("reset", "-q", "--hard", "HEAD~1")
        out.append((time.perf_counter() - t0) * 1000)
    shutil.rmtree(ws)
    return out


def run_daemon(root: Path, experiments: int) -> tuple[list, float]:
    """Run the real daemon in-process for `experiments` experiments; (its events, wall seconds)."""
    t0 = time.perf_counter()
    Daemon(root, max_experiments=experiments).run()
    wall = time.perf_counter() - t0
    log = EventLog.open(root / ".autoresearch" / "events.sqlite", create=False)
    events = list(log.events())
    log.close()
    return events, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", type=int, default=40)
    args = ap.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # no console noise
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.1f}; {date.today().isoformat()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_workspace(Path(tmp) / "ws")
        by_hand = git_bookkeeping(root, 10)  # before and after the daemon: load drifts
        events, wall = run_daemon(root, args.experiments)
        by_hand += git_bookkeeping(root, 10)
    overhead, runs, phases = measure(events)
    print(f"{len(overhead)} experiments, {wall:.1f} s wall in all; the run itself: median {statistics.median(runs):.0f} ms")
    med, ref = statistics.median(overhead), statistics.median(by_hand)
    ratio = med / ref
    print(f"loop overhead per experiment (excluding the run): median {med:.0f} ms, "
          f"p90 {sorted(overhead)[int(len(overhead) * 0.9)]:.0f} ms")
    print(f"the original loop's bookkeeping by hand (commit, results.tsv, reset --hard; git CLI): "
          f"median {ref:.0f} ms -> ours = {ratio:.1f} x (target <= {TARGET:.0f}: "
          f"{'meets' if ratio <= TARGET else 'MISSES'})")
    print("  phases (median ms): " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in phases.items()))


def measure(events: list) -> tuple[list[float], list[float], dict[str, list[float]]]:
    """Per experiment: the loop's overhead (ms, the run excluded), the run's own duration (ms), phases."""
    by_n: dict[int, dict] = {}
    for e in events:
        if e.experiment is not None:
            slot = by_n.setdefault(e.experiment, {})
            slot.setdefault(e.trigger, parse_utc(e.time))
            if e.trigger == "finish":
                slot["run"] = e.payload["duration_s"]
    starts = sorted(n for n, s in by_n.items() if "start" in s)
    # Phases of one experiment; the next one's proposal and commit may overlap its run (lookahead).
    overhead, phases = [], {"propose": [], "commit": [], "judge": [], "outcome -> next launch": []}
    for a, b in zip(starts, starts[1:]):
        s = by_n[a]
        if "run" not in s:
            continue
        overhead.append((by_n[b]["start"] - s["start"] - s["run"]) * 1000)
        phases["propose"].append((s["proposed"] - s["start"]) * 1000)
        phases["commit"].append((s["commit"] - s["proposed"]) * 1000)
        end = s.get("keep") or s.get("discard") or s.get("crash")
        phases["judge"].append((end - s["finish"]) * 1000)
        if "launch" in by_n[b]:  # the worktree put back, the next run's checkout, its launch recorded
            phases["outcome -> next launch"].append((by_n[b]["launch"] - end) * 1000)
    runs = [by_n[n]["run"] * 1000 for n in starts if "run" in by_n[n]]
    return overhead, runs, phases


if __name__ == "__main__":
    main()
