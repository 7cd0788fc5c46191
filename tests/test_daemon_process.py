"""The daemon as a real process: kill -9, SIGTERM, SIGHUP, sd_notify, inbox requests, single instance."""

import re
import signal
import socket
import time

import pytest

from autoresearch.eventlog import verify_path

from daemon_fixtures import (cli, current, events, git, has_event, kill9, make_workspace, mode, mode_env, spawn_daemon,
                             state, tagged_processes, wait_for)


def test_kill9_during_a_run_then_restart_reruns_it(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    mode.write_text("sleep:30")
    proc = spawn_daemon(root, "--max-experiments", "1", env=mode_env(mode))
    try:
        wait_for(lambda: current(root, "training", 0) and tagged_processes(root), timeout=60)
    finally:
        kill9(proc)
    assert tagged_processes(root)  # the orphaned run is still there...
    mode.write_text("")
    out = cli("run", str(root), "--max-experiments", "1", env=mode_env(mode))
    assert out.returncode == 0, out.stderr
    assert tagged_processes(root) == []  # ...and the restart killed it
    st = state(root)
    base = st.experiments[0]
    assert base.state == "kept" and base.interrupts == 1 and base.runs == 2
    assert st.experiments[1].terminal and sorted(st.experiments) == [0, 1]
    assert [e.trigger for e in events(root) if e.aggregate == "experiment:0"] == [
        "adopt", "launch", "interrupt", "retry", "launch", "finish", "keep"]
    assert verify_path(root / ".autoresearch" / "events.sqlite").ok
    assert git(root, "status", "--porcelain") == ""


def test_kill9_between_git_commit_and_its_event_is_reconciled(tmp_path):
    root = make_workspace(tmp_path / "ws")
    out = cli("run", str(root), "--max-experiments", "1", env={"AUTORESEARCH_CRASH_AT": "pre:commit"})
    assert out.returncode == -signal.SIGKILL
    exp = state(root).experiments[1]
    assert exp.state == "proposing" and exp.files and exp.commit is None
    ref = git(root, "rev-parse", "refs/autoresearch/exp/1")  # git did its part; the log did not
    out = cli("run", str(root), "--max-experiments", "1")
    assert out.returncode == 0, out.stderr
    st = state(root)
    exp = st.experiments[1]
    assert exp.commit == ref and exp.terminal and exp.interrupts == 1  # the same commit, reused
    triggers = [e.trigger for e in events(root) if e.aggregate == "experiment:1"]
    assert triggers.count("commit") == 1 and triggers.count("proposed") == 1  # not proposed again
    assert git(root, "rev-parse", "HEAD") == st.best_commit


def test_sigterm_during_a_run_is_graceful(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    mode.write_text("sleep:60")
    proc = spawn_daemon(root, env=mode_env(mode))
    wait_for(lambda: current(root, "training", 0) and tagged_processes(root), timeout=60)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert time.monotonic() - t0 < 10
    assert tagged_processes(root) == []
    st = state(root)
    assert st.daemon == "stopped" and st.experiments[0].state == "interrupted"
    mode.write_text("")
    out = cli("run", str(root), "--max-experiments", "1", env=mode_env(mode))
    assert out.returncode == 0
    assert state(root).experiments[0].state == "kept"


def test_control_requests_take_effect_within_a_second(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    proc = spawn_daemon(root, env=mode_env(mode))
    timings = {}

    def request(action, *args):
        t0 = time.monotonic()
        out = cli(action, str(root), *args)
        timings[action] = time.monotonic() - t0
        assert out.returncode == 0, out.stdout + out.stderr

    try:
        wait_for(lambda: has_event(root, "baseline_done"), timeout=60)
        request("pause")
        assert has_event(root, "pause", "daemon", "paused")
        mode.write_text("sleep:60")  # from now on every run lasts long enough to be skipped
        request("resume")
        assert has_event(root, "resume", "daemon", "preparing")
        victim = wait_for(lambda: current(root, "training"), timeout=60)
        pids = wait_for(lambda: tagged_processes(root), timeout=10)
        request("skip", str(victim.n))  # that one (the next, proposed ahead, goes on)
        skipped = has_event(root, "skip")
        assert skipped.dest == "discarded" and skipped.payload["reason"] == "skipped by user"
        assert skipped.aggregate == f"experiment:{victim.n}"
        wait_for(lambda: not set(pids) & set(tagged_processes(root)), timeout=10)  # its group is gone
        wait_for(lambda: current(root, "training", victim.n + 1), timeout=60)
        request("stop")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            kill9(proc)
    # Each figure includes starting a Python CLI process; the daemon's own part is a fraction.
    assert max(timings.values()) < 1.5, timings
    st = state(root)
    assert st.daemon == "stopped" and tagged_processes(root) == []
    assert st.current().state == "interrupted"  # stopped mid-run: re-run on resume
    print("control latencies (s):", {k: round(v, 3) for k, v in timings.items()})


def test_a_request_without_a_daemon_is_a_clear_error(tmp_path):
    root = make_workspace(tmp_path / "ws")
    for action in ("pause", "stop", "skip"):  # never run: nothing to queue for
        out = cli(action, str(root))
        assert out.returncode == 3 and "no daemon is running" in out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_a_pause_outlives_a_restart_and_a_queued_resume_ends_it(tmp_path, mode):
    root = make_workspace(tmp_path / "ws", slots={"lookahead": 0})  # at most one in flight
    proc = spawn_daemon(root, env=mode_env(mode))

    def running(st):
        return [e for e in st.in_flight() if e.state in ("training", "evaluating", "judging")]
    try:
        wait_for(lambda: has_event(root, "baseline_done"), timeout=60)
        assert cli("pause", str(root)).returncode == 0
        # Every run in flight finishes and is judged; a proposal that was under way when the pause
        # came is recorded and waits, committed (nothing is launched while paused).
        wait_for(lambda: not running(state(root)) and not tagged_processes(root), timeout=60)
        time.sleep(0.5)
        assert not running(state(root)), "a run was launched while paused"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            kill9(proc)
    st = state(root)
    done, ended = len(st.experiments), sum(e.terminal for e in st.experiments.values())
    # A restart (a reboot, systemd's Restart=) stays paused: no experiment starts.
    out = cli("run", str(root), "--for", "2s", env=mode_env(mode))
    assert out.returncode == 0, out.stderr
    restored = [e for e in events(root) if e.trigger == "pause"][-1]
    assert restored.payload.get("restored") is True and restored.source == "starting"
    assert len(state(root).experiments) == done and state(root).paused
    assert not any(e.trigger == "launch" and e.seq > restored.seq for e in events(root))
    # `resume` while no daemon runs is queued, and the next start acts on it: one outcome (the
    # experiment that waited, if one did, else a new one), then nothing left in flight.
    out = cli("resume", str(root))
    assert out.returncode == 0 and "queued" in out.stdout, out.stderr
    out = cli("run", str(root), "--max-experiments", "1", env=mode_env(mode))
    assert out.returncode == 0, out.stderr
    st = state(root)
    assert not st.paused and sum(e.terminal for e in st.experiments.values()) == ended + 1
    assert len(st.experiments) <= done + 1 and st.current() is None


def test_sighup_with_a_broken_config_keeps_the_old_one(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    mode.write_text("sleep:60")
    proc = spawn_daemon(root, env=mode_env(mode))
    try:
        wait_for(lambda: current(root, "training"), timeout=60)
        good = (root / "autoresearch.toml").read_text()
        (root / "autoresearch.toml").write_text(good + "\n[run\n")
        proc.send_signal(signal.SIGHUP)
        note = wait_for(lambda: has_event(root, "note", kind="config_rejected"), timeout=10)
        assert "not valid TOML" in note.payload["error"]
        assert proc.poll() is None and current(root, "training")  # the run goes on undisturbed
        (root / "autoresearch.toml").write_text(good.replace("deadline_seconds = 30.0", "deadline_seconds = 31.0"))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: has_event(root, "note", kind="config_reloaded"), timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_a_program_md_edit_is_logged_without_disturbing_the_run(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    mode.write_text("sleep:5")
    proc = spawn_daemon(root, env=mode_env(mode))
    try:
        wait_for(lambda: current(root, "training", 0), timeout=60)
        (root / "program.md").write_text("# program\nTry the learning rate first.\n")
        note = wait_for(lambda: has_event(root, "note", kind="program_changed"), timeout=5)
        assert (note.payload["added"], note.payload["removed"]) == (1, 1)
        assert note.payload["old_hash"] != note.payload["new_hash"]
        assert current(root, "training", 0)  # the current run was not disturbed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_a_second_daemon_process_refuses(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    mode.write_text("sleep:60")
    proc = spawn_daemon(root, env=mode_env(mode))
    try:
        wait_for(lambda: current(root, "training"), timeout=60)
        out = cli("run", str(root))
        assert out.returncode == 3
        assert f"another daemon (pid {proc.pid}) is running" in out.stderr and "Traceback" not in out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_sd_notify_ready_status_watchdog_stopping(tmp_path, mode):
    root = make_workspace(tmp_path / "ws")
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    mode.write_text("sleep:7")
    proc = spawn_daemon(root, "--max-experiments", "0",
                        env=mode_env(mode, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="1000000"))
    messages = []  # (arrival time, datagram)
    end = time.monotonic() + 60
    try:
        while time.monotonic() < end and proc.poll() is None:
            try:
                messages.append((time.monotonic(), sock.recv(65536).decode()))
            except socket.timeout:
                pass
    finally:
        if proc.poll() is None:
            kill9(proc)
        sock.close()
    texts = [m for _, m in messages]
    ready = next(i for i, m in enumerate(texts) if "READY=1" in m)
    assert any(m.startswith("STATUS=") and "baseline (exp 0) training" in m for m in texts[ready:])
    # During the run STATUS= is refreshed (every 5 s), so its clock is not stuck at 0:00.
    assert any(re.search(r"^STATUS=baseline \(exp 0\) training 0:0[4-8]/", m) for m in texts), texts
    assert "STOPPING=1" in texts[-1]
    # WATCHDOG_USEC = 1 s -> one ping every 0.5 s from the main loop, also during the 7 s run.
    pings = [t for t, m in messages if "WATCHDOG=1" in m]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(pings) >= 7 and max(gaps) < 0.8, gaps
    assert min(gaps) > 0.4, gaps  # rate-limited, not a flood


def test_journal_fields_are_queryable(tmp_path):
    """Under systemd (INVOCATION_ID set, a journal socket present) every log line is a journal
    record whose keys are fields: `journalctl -u autoresearch@lab EXPERIMENT=1 STATE=kept` works."""
    from journal_fixtures import FakeJournal

    root = make_workspace(tmp_path / "ws")
    journal = FakeJournal(tmp_path / "journal.sock")
    proc = spawn_daemon(root, "--max-experiments", "1",
                        env={"INVOCATION_ID": "0" * 32, "AUTORESEARCH_JOURNAL_SOCKET": journal.path})
    records = []
    try:
        while True:
            try:
                records.append(journal.receive())
            except (TimeoutError, socket.timeout):
                if proc.poll() is not None:
                    break
    finally:
        if proc.poll() is None:
            kill9(proc)
        journal.close()
    assert proc.returncode == 0
    kept = [r for r in records if r.get("TRIGGER") in (b"keep", b"discard") and r.get("EXPERIMENT") == b"1"]
    assert kept and kept[0]["STATE"] in (b"kept", b"discarded") and b"experiment:1" in kept[0]["MESSAGE"]
    assert all(r.get("SYSLOG_IDENTIFIER") == b"autoresearch" for r in records)
    assert any(r.get("STATE") == b"stopped" for r in records)
