"""Disk full during an append: no partial event, no traceback, `blocked: disk full` with the
watchdog still pinged, and the daemon carries on when space returns.

The workspace lives on a small tmpfs mounted by the test (needs root, as on CI and the dev
machines; skipped elsewhere), filled to the last byte by a ballast file while a run is in
flight, so the append of that run's `finish` event gets a real SQLITE_FULL from the kernel's
ENOSPC -- no simulation.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from autoresearch.eventlog import verify_path

from chaos_fixtures import check_invariants
from daemon_fixtures import NotifySink, REPO, current, events, has_event, kill_runs, make_workspace, wait_for


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or 'not root'})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path):
    """Write `path` until the file system is full; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    written += f.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return written


def test_disk_full_during_an_append_waits_then_continues(tmp_path, small_disk):
    root = make_workspace(small_disk / "ws", slots={"lookahead": 0})  # nothing else recorded meanwhile
    mode = tmp_path / "mode"
    mode.write_text("")
    sink = NotifySink(tmp_path / "notify.sock")
    stderr, stdout = tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "AUTORESEARCH_TEST_MODE": str(mode),
           "NOTIFY_SOCKET": sink.path, "WATCHDOG_USEC": "1000000"}
    with open(stderr, "w") as err, open(stdout, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "autoresearch.cli", "run", str(root)], cwd=tmp_path,
                                stdout=out, stderr=err, env=env)
    ballast = small_disk / "ballast"
    try:
        wait_for(lambda: has_event(root, "baseline_done"), timeout=60)
        mode.write_text("sleep:2")
        cur = wait_for(lambda: current(root, "training"), timeout=60)
        before = events(root)[-1].seq
        _fill(ballast)
        # The run ends; its `finish` cannot be written: the daemon must wait, alive, pinging.
        wait_for(lambda: any("disk full" in m for _, m in sink.messages), timeout=30)
        t_full = time.monotonic()
        time.sleep(4)
        assert proc.poll() is None, "the daemon died on a full disk"
        st_events = events(root)
        assert st_events[-1].seq == before and verify_path(root / ".autoresearch" / "events.sqlite").ok
        pings = [t for t, m in sink.messages if "WATCHDOG=1" in m and t >= t_full]
        assert len(pings) >= 6, f"watchdog pings while the disk was full: {len(pings)}"
        ballast.unlink()  # space is back
        wait_for(lambda: any(e.trigger == "finish" and e.experiment == cur.n for e in events(root)), timeout=60)
        mode.write_text("")
        wait_for(lambda: any(e.aggregate == f"experiment:{cur.n}" and e.dest in ("kept", "discarded")
                             for e in events(root)), timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        sink.close()
        ballast.unlink(missing_ok=True)
        kill_runs(root)
    text = stderr.read_text()
    assert "Traceback" not in text, text[-3000:]
    waits = [line for line in stdout.read_text().splitlines() if "disk full: cannot record" in line]
    assert len(waits) == 1 and "database or disk is full" in waits[0], waits  # logged once, SQLITE_FULL
    print(waits[0])
    finishes = [e for e in events(root) if e.trigger == "finish" and e.aggregate == f"experiment:{cur.n}"]
    assert len(finishes) == 1 and finishes[0].seq == before + 1  # no partial, no duplicate event
    assert check_invariants(root) == []
