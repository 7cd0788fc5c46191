"""Short versions of the chaos runs (bench/chaos.py has the long ones): an API outage, an idle
daemon's CPU use."""

from __future__ import annotations

import signal
import sys
import time

from autoresearch.control import submit_request

from daemon_fixtures import REPO, has_event, kill9, make_workspace, spawn_daemon, wait_for

sys.path.insert(0, str(REPO / "bench"))
import chaos  # noqa: E402


def test_an_api_outage_blocks_pings_the_watchdog_and_burns_nothing(tmp_path):
    r = chaos.outage(tmp_path, 20.0, recover_timeout=60.0)
    print(r)
    assert r["problems"] == [] and r["alive_through_outage"] and r["exit_code"] == 0
    assert r["experiments_burned"] == 0 and r["daemon_state_at_end_of_outage"] in ("blocked", "running")
    assert r["watchdog_pings"] >= 10 and r["max_ping_gap_s"] < 1.6  # WATCHDOG_USEC = 2 s: a ping a second
    assert 1 <= r["blocks"] <= 2  # retried after 5 s, then after 15 s: a backoff, not every 5 s (4 blocks)
    assert r["recovered_after_s"] is not None


def test_an_idle_daemon_sleeps(tmp_path):
    """Paused, the daemon must not spin: its own reads of program.md once woke it forever."""
    root = make_workspace(tmp_path / "ws")
    proc = spawn_daemon(root)
    try:
        wait_for(lambda: has_event(root, "baseline_done"), timeout=60)
        submit_request(root / ".autoresearch", "pause")
        wait_for(lambda: has_event(root, "pause"), timeout=30)
        time.sleep(0.5)
        before = chaos._cpu_seconds(proc.pid)
        time.sleep(3.0)
        used = chaos._cpu_seconds(proc.pid) - before
        assert used < 0.3, f"{used:.2f} CPU seconds in 3 s while paused"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            kill9(proc)
