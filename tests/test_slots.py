"""Several experiments in flight (issue 12), tested from outside: real `autoresearch run`
processes on the fixture workload, the real CLI, /proc, git and the event log.

- crash recovery with 2 and 3 slots: kill -9 while every slot trains, damage the slot
  checkouts while stopped, restart: each experiment is interrupted and re-run from its recorded
  commit in a free slot, the killed daemon's runs are gone first, the checkouts are rebuilt;
- control per experiment on a running daemon: `status` (text, --json, the systemd STATUS line)
  shows every slot, `skip lab N` skips N alone, a bare `skip` every one in flight, `pause` lets
  the runs finish and launches nothing, and each daemon.log line names its own experiment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from chaos_fixtures import check_invariants
from daemon_fixtures import NotifySink, cli, events, git, kill9, kill_runs, make_workspace, mode, mode_env, spawn_daemon, state, \
    wait_for



def _tag(root: Path, n: int) -> bytes:
    """Experiment n's run tag: `<workspace tag>.<n>` (Daemon.run_tag)."""
    return f"{hashlib.sha256(str(root.absolute()).encode()).hexdigest()[:16]}.{n}".encode()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_pids(root: Path, n: int) -> list[int]:
    """Live processes of experiment n's run, found from /proc by its own tag (exactly, not by prefix)."""
    needle = b"\0AUTORESEARCH_RUN_TAG=" + _tag(root, n) + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in b"\0" + f.read() + b"\0" and _alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _training(root: Path, count: int):
    """{n: experiment} when `count` experiments are training (with their runs started), else None."""
    if not (root / ".autoresearch" / "events.sqlite").exists():
        return None
    live = {e.n: e for e in state(root).in_flight() if e.state == "training"}
    if len(live) == count and all(_run_pids(root, n) for n in live):
        return live
    return None


def _after(root: Path, seq: int, n: int) -> list:
    return [e for e in events(root) if e.seq > seq and e.experiment == n]


@pytest.mark.parametrize("count", [2, 3])
def test_kill9_with_every_slot_training_reruns_each_from_its_commit_in_a_free_slot(tmp_path, mode, count):
    root = make_workspace(tmp_path / "ws", slots={"count": count})
    slots = root / ".autoresearch" / "slots"
    out = cli("run", str(root), "--max-experiments", "0", env=mode_env(mode))  # the baseline
    assert out.returncode == 0, out.stderr[-2000:]
    mode.write_text("sleep:60")
    proc = spawn_daemon(root, env=mode_env(mode))
    try:
        training = wait_for(lambda: _training(root, count), timeout=60)
        wait_for(lambda: len(state(root).in_flight()) == count + 1, timeout=30)  # lookahead 1: one more ready
    finally:
        kill9(proc)
    before = state(root)
    killed = {e.n: e for e in before.in_flight()}
    assert sorted(e.slot for e in training.values()) == list(range(count))  # one slot each
    for e in training.values():  # each run in its own checkout, at its own commit
        assert git(slots / str(e.slot), "rev-parse", "HEAD") == e.commit
    orphans = {n: _run_pids(root, n) for n in training}
    assert all(orphans.values())  # the kill -9 left every run running (they are not its children)

    # While stopped: slot 0's checkout deleted, slot 1's no longer a worktree of ours and its
    # train.py damaged, slot 2's (with 3) edited and littered.
    shutil.rmtree(slots / "0")
    (slots / "1" / ".git").write_text("gitdir: /nonexistent\n")
    (slots / "1" / "train.py").write_text("raise SystemExit('damaged checkout')\n")
    if count == 3:
        (slots / "2" / "train.py").write_text("raise SystemExit('damaged checkout')\n")
        (slots / "2" / "stray.txt").write_text("left behind\n")

    mode.write_text("sleep:1")
    proc = spawn_daemon(root, "--max-experiments", str(len(killed)), env=mode_env(mode))
    try:
        # Before anything is re-run, the killed daemon's runs are gone (boot kills them by tag).
        wait_for(lambda: any(e.trigger == "launch" and e.seq > before.seq for e in events(root)), timeout=60)
        assert [p for pids in orphans.values() for p in pids if _alive(p)] == []
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            kill9(proc)
        kill_runs(root)

    after = state(root)
    last_in_slot: dict[int, int] = {}
    for n, old in killed.items():
        evs = _after(root, before.seq, n)
        triggers = [e.trigger for e in evs]
        assert triggers[0] == "interrupt" and not evs[0].payload["graceful"], triggers
        assert triggers[1] == ("retry" if old.commit else "repropose"), triggers
        launches = [e for e in evs if e.trigger == "launch"]
        assert len(launches) == 1 and 0 <= launches[0].payload["slot"] < count, triggers
        last_in_slot[launches[0].payload["slot"]] = n
        exp = after.experiments[n]
        assert exp.commit == old.commit or old.commit is None  # the recorded commit, not a new proposal
        assert "commit" not in triggers or old.commit is None
        if old.files is not None:  # a recorded proposal is re-applied as it was
            assert (exp.files, exp.description) == (old.files, old.description)
        assert exp.state in ("kept", "discarded"), (n, exp.state, exp.reason)  # never the damaged copy
        assert exp.interrupts == 1
    assert sorted(last_in_slot) == list(range(count))  # every slot was free, every slot was used
    listed = git(root, "worktree", "list", "--porcelain")
    for k, n in last_in_slot.items():  # rebuilt: a worktree of ours again, at its run's commit, clean
        checkout = slots / str(k)
        assert f"worktree {checkout}\n" in listed + "\n"
        assert git(checkout, "rev-parse", "HEAD") == after.experiments[n].commit
        assert git(checkout, "status", "--porcelain", "--untracked-files=all") == ""
    assert "prunable" not in listed
    out = cli("verify", str(root))
    assert out.returncode == 0, out.stderr
    assert check_invariants(root) == []


# ---------------------------------------------------------------- control per experiment

def _ok(*args: str) -> str:
    out = cli(*args, timeout=60)
    assert out.returncode == 0, (args, out.returncode, out.stderr[-2000:])
    return out.stdout


def test_control_each_experiment_of_a_running_daemon(tmp_path, mode):
    root = make_workspace(tmp_path / "ws", slots={"count": 2})
    ws = str(root)
    _ok("run", ws, "--max-experiments", "0")  # the baseline
    notify = NotifySink(tmp_path / "notify.sock")
    mode.write_text("sleep:60")
    proc = spawn_daemon(root, env=mode_env(mode, NOTIFY_SOCKET=notify.path))
    try:
        two = wait_for(lambda: _training(root, 2), timeout=60)
        a, b = (two[n] for n in sorted(two))
        pids_b = _run_pids(root, b.n)

        # status: one line per slot (experiment, state, elapsed/budget, device); --json: in_flight.
        text = _ok("status", ws)
        for e in (a, b):
            assert re.search(rf"slot {e.slot}, cpu: exp {e.n} training \d+:\d\d/0:01", text), text
        data = json.loads(_ok("status", ws, "--json"))
        rows = {r["n"]: r for r in data["in_flight"]}
        assert len(rows) == 3 and data["current"]["n"] == a.n  # two training, the lookahead one waiting
        for e in (a, b):
            assert rows[e.n]["state"] == "training" and rows[e.n]["slot"] == e.slot
            assert rows[e.n]["device"] == {"kind": "cpu"}
            assert rows[e.n]["run"]["elapsed_s"] >= 0 and rows[e.n]["run"]["budget_s"] == 1.0
        waiting = [r for n, r in rows.items() if n not in (a.n, b.n)][0]
        assert waiting["state"] in ("proposing", "committed") and waiting["slot"] is None
        # The systemd STATUS line summarises the slots.
        wait_for(lambda: any(m.startswith("STATUS=3 in flight: ") and f"exp {a.n} training " in m
                             and f"exp {b.n} training " in m for _, m in notify.messages), timeout=15)

        # skip lab N: exactly N; the other run goes on untouched; the freed slot takes the next one.
        _ok("skip", ws, str(a.n))
        assert state(root).experiments[a.n].state == "discarded"
        wait_for(lambda: not _run_pids(root, a.n), timeout=10)
        c = wait_for(lambda: next((e for e in state(root).in_flight() if e.state == "training" and e.n != b.n),
                                  None), timeout=30)
        assert c.slot == a.slot and c.n == waiting["n"]
        assert _run_pids(root, b.n) == pids_b and state(root).experiments[b.n].state == "training"
        assert [e.trigger for e in _after(root, 0, b.n)][-1] == "launch"  # nothing happened to b

        # A bare skip: every experiment in flight (those the person saw), each one's run gone.
        seen = wait_for(lambda: [e.n for e in state(root).in_flight()][2:] and [e.n for e in state(root).in_flight()],
                        timeout=30)  # b and c training, the lookahead one ready
        mode.write_text("sleep:2")  # the runs launched after the skip are short
        _ok("skip", ws)
        st = state(root)
        assert all(st.experiments[n].state == "discarded" and st.experiments[n].reason == "skipped by user"
                   for n in seen), [(n, st.experiments[n].state) for n in seen]
        wait_for(lambda: not any(_run_pids(root, n) for n in seen), timeout=10)

        # pause: both runs finish and are judged; nothing new is launched or started.
        two = wait_for(lambda: (t := _training(root, 2)) and not set(t) & set(seen) and t, timeout=60)
        _ok("pause", ws)
        pause = [e for e in events(root) if e.trigger == "pause"][-1]
        wait_for(lambda: all(state(root).experiments[n].terminal for n in two), timeout=30)
        st = state(root)
        assert all(st.experiments[n].state in ("kept", "discarded") for n in two), [(n, st.experiments[n].state, st.experiments[n].reason) for n in two]
        time.sleep(1.5)  # a paused daemon stays idle
        later = [e for e in events(root) if e.seq > pause.seq]
        assert not [e for e in later if e.trigger in ("launch", "start")], [e.trigger for e in later]
        assert state(root).daemon == "paused" and not any(_run_pids(root, n) for n in state(root).experiments)
        _ok("resume", ws)
        wait_for(lambda: _training(root, 2), timeout=60)
        _ok("stop", ws, "--timeout", "60")
        assert proc.wait(timeout=60) == 0
    finally:
        notify.close()
        if proc.poll() is None:
            kill9(proc)
        kill_runs(root)

    # Every daemon.log line of an experiment names its own: two were in flight at once.
    lines = [json.loads(line) for line in (root / ".autoresearch" / "daemon.log").read_text().splitlines()]
    named = 0
    for line in lines:
        m = re.match(r"(experiment:(\d+)|daemon) ", line["event"])
        if m:
            named += 1
            assert line.get("experiment") == (int(m.group(2)) if m.group(2) else None), line
    assert named > 40
    order = [line.get("experiment") for line in lines if line["event"].startswith(("experiment:", "this run"))]
    first_b = order.index(b.n)
    assert a.n in order[first_b:]  # a's lines after b's launch: both in flight, each named its own
    assert check_invariants(root) == []


# ---------------------------------------------------------------- two runs ending in one turn

def test_runs_handed_out_by_one_poll_are_each_recorded_for_their_own_run(tmp_path):
    """Both slots' runs end before the coordinator polls: each end is recorded for its own run,
    and neither is taken for lost (interrupted, re-run, then given the first run's stale result
    while the re-run went on in a slot marked free). Found by the 3-slot kill test above."""
    from autoresearch.daemon import Daemon

    root = make_workspace(tmp_path / "ws", slots={"count": 2, "lookahead": 0})

    class Together(Daemon):
        def _make_coordinator(self):
            coordinator = super()._make_coordinator()
            executor, poll = coordinator.executor, coordinator.executor.poll
            # Hand out nothing while any run still runs: then every ended run at once.
            executor.poll = lambda: [] if any(run.poll() is None for run, _ in executor._runs.values()) else poll()
            return coordinator

    assert Together(root, max_experiments=4).run() == 0
    evs = events(root)
    assert [e for e in evs if e.trigger == "interrupt"] == []
    st = state(root)
    for n in range(1, 5):
        exp = st.experiments[n]
        assert exp.runs == 1 and exp.state in ("kept", "discarded"), (n, exp.state, exp.runs, exp.reason)
    assert check_invariants(root) == []
