"""Controlling a running daemon from outside: requests, their answers, stops, session limits.

Real daemon processes and the real CLI; the fixture workload's "sleep:N" mode keeps a run in
flight long enough to act on it.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from autoresearch.control import INBOX_NAME, submit_request
from autoresearch.daemon import Daemon
from autoresearch.proposers.base import ProposerUnavailable

from daemon_fixtures import (REPO, TRAIN, ScriptedProposer, cli, current, edited, events, factory, has_event,
                             kill9, make_workspace, mode, mode_env, spawn_daemon, state, tagged_processes, wait_for)


def _answers(root, rid):
    """Every event that answers request `rid` (exactly one is expected)."""
    return [e for e in events(root) if e.payload.get("request") == rid]


def _inbox(root):
    return sorted(p.name for p in (root / ".autoresearch" / INBOX_NAME).glob("*.json"))


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            kill9(proc)


def _training_experiment(root, mode):
    """Wait for the baseline, then make runs long and wait for experiment >= 1 to train."""
    wait_for(lambda: has_event(root, "baseline_done"), timeout=60)
    mode.write_text("sleep:60")
    return wait_for(lambda: (cur := current(root, "training")) and cur.n >= 1 and tagged_processes(root)
                    and cur, timeout=60)


# ---------------------------------------------------------------- item 1: pause; resume; skip


def test_pause_resume_skip_during_a_run(tmp_path, mode):
    """The three commands used to kill the daemon (AttributeError in _prepare) and left `status`
    saying `preparing` for the rest of the run."""
    root = make_workspace(tmp_path / "ws", run={"prepare_command": "python -c pass"})
    proc = spawn_daemon(root, env=mode_env(mode))
    try:
        victim = _training_experiment(root, mode)
        assert cli("pause", str(root)).returncode == 0
        out = cli("resume", str(root))
        assert out.returncode == 0, out.stderr
        status = json.loads(cli("status", str(root), "--json").stdout)
        assert status["daemon"] == "running" and status["current"]["state"] == "training", status
        assert "training" in cli("status", str(root)).stdout
        out = cli("skip", str(root), str(victim.n))  # that one; the one proposed ahead goes on
        assert out.returncode == 0, out.stdout + out.stderr
        assert "skip -> discarded" in out.stdout
        assert state(root).experiments[victim.n].state == "discarded"
        wait_for(lambda: current(root, "training", victim.n + 1), timeout=60)
        assert proc.poll() is None
        assert cli("stop", str(root)).returncode == 0
        assert proc.wait(timeout=20) == 0
    finally:
        _stop(proc)
    # Preparation ran once in this start: not again on resume, and never beside a run.
    preps = [e for e in events(root) if e.trigger == "prepare"]
    assert len(preps) == 1
    assert '"level": "error"' not in (root / ".autoresearch" / "daemon.log").read_text()


def test_an_unexpected_exception_is_logged_and_exits_non_zero(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    out = cli("run", str(root), "--max-experiments", "2",
              env=mode_env(mode, AUTORESEARCH_FAIL_AT="pre:launch@2"))  # experiment 1's launch
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("autoresearch: error:")]
    assert len(line) == 1 and "injected failure at pre:launch" in line[0] and "daemon.log" in line[0]
    assert tagged_processes(root) == []
    logged = [json.loads(ln) for ln in (root / ".autoresearch" / "daemon.log").read_text().splitlines()]
    failure = [r for r in logged if r["level"] == "error" and r["event"].startswith("daemon failed")]
    assert len(failure) == 1
    f = failure[0]
    assert f["experiment"] == 1 and f["state"] == "committed" and f["daemon"] == "running"
    assert "InjectedFailure" in f["exception"] and "Traceback" in f["exception"]
    note = has_event(root, "note", kind="failure")
    assert note and "injected failure" in note.payload["error"] and note.payload["experiment"] == 1
    status = cli("status", str(root))
    assert "failed:" in status.stdout and "injected failure" in status.stdout
    # What systemd's Restart= does next: start again; the experiment is re-run from its commit.
    out = cli("run", str(root), "--max-experiments", "1", env=mode_env(mode))
    assert out.returncode == 0, out.stderr
    exp = state(root).experiments[1]
    assert exp.terminal and exp.interrupts == 1  # the failure was abnormal: it counts
    assert "failed:" not in cli("status", str(root)).stdout


# ---------------------------------------------------------------- item 2: one answer per request


def test_two_skips_and_two_stops_in_the_inbox_each_get_an_answer(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    state_dir = root / ".autoresearch"
    proc = spawn_daemon(root, env=mode_env(mode))
    try:
        victim = _training_experiment(root, mode)
        os.kill(proc.pid, signal.SIGSTOP)
        skips = [submit_request(state_dir, "skip", experiment=victim.n) for _ in range(2)]
        os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: all(_answers(root, rid) for rid in skips), timeout=15)
        first, second = (_answers(root, rid) for rid in skips)
        assert len(first) == 1 and first[0].trigger == "skip" and first[0].dest == "discarded"
        assert len(second) == 1 and second[0].payload["outcome"].startswith("ignored: ")
        assert f"experiment {victim.n}" in second[0].payload["outcome"]
        wait_for(lambda: current(root, "training", victim.n + 1), timeout=60)
        os.kill(proc.pid, signal.SIGSTOP)
        stops = [submit_request(state_dir, "stop") for _ in range(2)]
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        _stop(proc)
    first, second = (_answers(root, rid) for rid in stops)
    assert len(first) == 1 and first[0].trigger == "stop" and first[0].dest == "stopped"
    assert len(second) == 1 and second[0].payload["outcome"].startswith("ignored: ")
    assert _inbox(root) == []


def test_a_skip_then_a_stop_in_the_inbox_skips_then_stops(tmp_path, mode):
    root = make_workspace(tmp_path / "ws", slots={"lookahead": 0})  # one in flight: nothing else to interrupt
    state_dir = root / ".autoresearch"
    proc = spawn_daemon(root, env=mode_env(mode))
    try:
        victim = _training_experiment(root, mode)
        os.kill(proc.pid, signal.SIGSTOP)
        skip = submit_request(state_dir, "skip", experiment=victim.n)
        time.sleep(0.01)  # request files are read in the order they were written
        stop = submit_request(state_dir, "stop")
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        _stop(proc)
    [skipped], [stopped] = _answers(root, skip), _answers(root, stop)
    assert skipped.trigger == "skip" and skipped.aggregate == f"experiment:{victim.n}"
    assert stopped.trigger == "stop" and stopped.seq > skipped.seq
    assert state(root).current() is None  # nothing left interrupted: the skip was honoured


def test_a_skip_aimed_at_an_experiment_that_ended_is_answered(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    proc = spawn_daemon(root, env=mode_env(mode))
    try:
        victim = _training_experiment(root, mode)
        os.kill(proc.pid, signal.SIGSTOP)
        stale = submit_request(root / ".autoresearch", "skip", experiment=victim.n - 1)
        os.kill(proc.pid, signal.SIGCONT)
        [answer] = wait_for(lambda: _answers(root, stale), timeout=15)
        assert answer.payload["outcome"] == f"ignored: experiment {victim.n - 1} already ended"
        assert current(root, "training", victim.n)  # the run in flight was left alone
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        _stop(proc)


def test_the_cli_says_truly_where_an_unanswered_request_is(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    proc = spawn_daemon(root, env=mode_env(mode))
    try:
        _training_experiment(root, mode)
        os.kill(proc.pid, signal.SIGSTOP)  # a daemon that does not answer
        out = cli("pause", str(root), "--timeout", "1")
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert "stays in its inbox" in out.stderr and len(_inbox(root)) == 1  # true: it is there
        # The daemon dies while a `skip` waits for it: said at once, and the skip is withdrawn
        # (skip and stop need a running daemon); the queued pause stays for the next start.
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        waiting = subprocess.Popen([sys.executable, "-m", "autoresearch.cli", "skip", str(root), "--timeout", "30"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        wait_for(lambda: len(_inbox(root)) == 2, timeout=15)
        t0 = time.monotonic()
        kill9(proc)
        _, err = waiting.communicate(timeout=20)
        assert time.monotonic() - t0 < 5, err
        assert waiting.returncode != 0 and "Traceback" not in err and err.count("\n") == 1, err
        assert "exited" in err and "withdrawn" in err and "stays in its inbox" not in err
        [left] = _inbox(root)
        assert json.loads((root / ".autoresearch" / INBOX_NAME / left).read_text())["action"] == "pause"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            kill9(proc)
        for pid in tagged_processes(root):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- item 3: a person's stop is no crash


def test_graceful_stops_do_not_count_as_interruptions(tmp_path, mode):
    """With max_interrupts = 0 a single interruption gives the experiment up; a person's stops
    (SIGTERM, Ctrl-C, `autoresearch stop`) must not."""
    # One in flight (no proposal ahead), so that each stop interrupts exactly experiment n.
    root = make_workspace(tmp_path / "ws", limits={"max_interrupts": 0}, slots={"lookahead": 0})
    n = None
    for how in ("SIGTERM", "SIGINT", "stop"):
        proc = spawn_daemon(root, env=mode_env(mode))
        try:
            if n is None:
                n = _training_experiment(root, mode).n
            else:
                wait_for(lambda: current(root, "training", n) and tagged_processes(root), timeout=60)
            if how == "stop":
                assert cli("stop", str(root)).returncode == 0
            else:
                proc.send_signal(getattr(signal, how))
            assert proc.wait(timeout=20) == 0
        finally:
            _stop(proc)
        exp = state(root).experiments[n]
        assert exp.state == "interrupted" and exp.interrupts == 0, (how, exp)
    stops = [e for e in events(root) if e.trigger == "interrupt"]
    assert len(stops) == 3 and all(e.payload["graceful"] is True for e in stops)
    mode.write_text("")
    # --max-experiments counts outcomes in this invocation: the re-run of n is the one.
    out = cli("run", str(root), "--max-experiments", "1", env=mode_env(mode))
    assert out.returncode == 0, out.stderr
    st = state(root)
    assert st.experiments[n].state in ("kept", "discarded") and sorted(st.experiments) == list(range(n + 1))


def test_a_lost_run_still_counts(tmp_path, mode):
    root = make_workspace(tmp_path / "ws", limits={"max_interrupts": 0}, slots={"lookahead": 0})
    proc = spawn_daemon(root, env=mode_env(mode))
    try:
        n = _training_experiment(root, mode).n
    finally:
        kill9(proc)
    mode.write_text("")
    out = cli("run", str(root), "--max-experiments", "1", env=mode_env(mode))
    assert out.returncode == 0, out.stderr
    exp = state(root).experiments[n]
    assert exp.state == "crashed" and exp.reason == "interrupted 1 times"
    [interrupt] = [e for e in events(root) if e.trigger == "interrupt"]
    assert interrupt.payload["graceful"] is False


def test_old_logs_count_only_abnormal_interruptions():
    """Logs written before the `graceful` field: a stop's interrupt is recognised by its reason."""
    from autoresearch.eventlog import Event
    from autoresearch.state import fold

    def ev(seq, trigger, dest, **payload):
        return Event(seq, "2026-01-01T00:00:00Z", "experiment:1", trigger, "", dest, payload, f"h{seq}")

    st = fold([ev(1, "start", "proposing"),
               ev(2, "interrupt", "interrupted", reason="daemon stopping (signal SIGTERM)"),
               ev(3, "repropose", "proposing"),
               ev(4, "interrupt", "interrupted", reason="daemon restarted while the experiment was in flight")])
    assert st.experiments[1].interrupts == 1


# ---------------------------------------------------------------- item 4: --max-experiments


def test_a_blocked_proposal_does_not_end_the_session(tmp_path, monkeypatch):
    import autoresearch.coordinator as coordinator_mod

    monkeypatch.setattr(coordinator_mod, "BACKOFF_S", (0.5,))
    root = make_workspace(tmp_path / "ws")
    proposer = ScriptedProposer([ProposerUnavailable("overloaded"), {"train.py": edited(TRAIN, WIDTH=96)}])
    d = Daemon(root, max_experiments=1, proposer_factory=factory(proposer))
    assert d.run() == 0
    st = state(root)
    assert has_event(root, "block") and has_event(root, "unblock")
    assert st.experiments[1].state in ("kept", "discarded") and sorted(st.experiments) == [0, 1]


def test_max_experiments_rejects_a_negative_count_and_says_what_it_counts(tmp_path):
    root = make_workspace(tmp_path / "ws")
    out = cli("run", str(root), "--max-experiments", "-1")
    assert out.returncode == 2 and out.stderr.startswith("autoresearch: error: ")
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert not (root / ".autoresearch" / "events.sqlite").exists()
    text = " ".join(cli("run", "--help").stdout.split())
    assert "reach an outcome in this invocation" in text


# ---------------------------------------------------------------- item 11: resume ends a block


def test_resume_while_blocked_retries_now(tmp_path, mode):
    flag = tmp_path / "prepare-fails"
    flag.write_text("")
    prepare = f"python -c \"import os, sys; sys.exit(os.path.exists('{flag}'))\""
    root = make_workspace(tmp_path / "ws", run={"prepare_command": prepare})
    proc = spawn_daemon(root, env=mode_env(mode))
    try:
        # The second block waits 15 s (backoff): long enough to see that resume does not wait.
        wait_for(lambda: has_event(root, "boot") and len([e for e in events(root) if e.trigger == "block"]) == 2,
                 timeout=60)
        flag.unlink()
        t0 = time.monotonic()
        out = cli("resume", str(root))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "unblock -> preparing" in out.stdout
        wait_for(lambda: has_event(root, "baseline_done"), timeout=30)
        assert time.monotonic() - t0 < 12
        block = [e for e in events(root) if e.trigger == "block"][-1]
        unblock = [e for e in events(root) if e.trigger == "unblock"][-1]
        assert unblock.seq > block.seq and unblock.payload.get("request")
    finally:
        _stop(proc)


# ---------------------------------------------------------------- item 20: status shows the inbox


def test_status_shows_requests_still_in_the_inbox(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    assert cli("run", str(root), "--max-experiments", "0", env=mode_env(mode)).returncode == 0
    out = cli("pause", str(root))
    assert out.returncode == 0 and "queued" in out.stdout
    status = cli("status", str(root)).stdout
    line = [ln for ln in status.splitlines() if ln.startswith("requests:")]
    assert line and "pause" in line[0] and "not read yet" in line[0], status
    data = json.loads(cli("status", str(root), "--json").stdout)
    assert [r["action"] for r in data["requests"]] == ["pause"]
    assert cli("run", str(root), "--for", "1s", env=mode_env(mode)).returncode == 0
    assert "requests:" not in cli("status", str(root)).stdout
    assert json.loads(cli("status", str(root), "--json").stdout)["requests"] == []


def test_a_readers_probe_of_the_lock_never_turns_a_starting_daemon_away(tmp_path):
    """`status` and the other readers probe the workspace lock with a shared flock for an instant;
    a daemon starting in that instant must wait it out, not refuse as if another daemon ran."""
    import fcntl
    import threading

    from autoresearch.control import WorkspaceLock
    from autoresearch.errors import LockedError

    state_dir = tmp_path / ".autoresearch"
    state_dir.mkdir()
    probe = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a reader's probe, caught mid-way
    threading.Timer(0.05, lambda: os.close(probe)).start()
    lock = WorkspaceLock(state_dir)
    lock.acquire()  # refused before: "another daemon (pid unknown) is running"
    try:
        t0 = time.monotonic()
        with pytest.raises(LockedError):
            WorkspaceLock(state_dir).acquire()  # a daemon that holds it for good still refuses
        assert time.monotonic() - t0 < 2
    finally:
        lock.release()
